"""MySQL and MariaDB: row triggers that append to a journal table, and a
polling listener.

Each watched operation gets an ``AFTER ... FOR EACH ROW`` trigger that
appends the change to ``dbnotify_journal`` in the writer's transaction,
as on SQLite; the listener reads the journal past what it has seen,
polling adaptively (MySQL has no way to wake a client). InnoDB gives out
ids before commit, so readers keep track of the ids still missing
(:mod:`.sequence`).

One module per concern: :mod:`.catalog` (what the database holds),
:mod:`.ddl` (the statements, built without a connection), :mod:`.admin`
(install, status), :mod:`.feed` (a listener's position, pruning),
:mod:`.stream` (the poll loop), :mod:`.once` (claims), :mod:`.context`,
all over :mod:`.connection`.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ..._items import Item
from ..base import Backend, Feed
from ..common import execute_on
from ..shaped import Rows
from . import context
from .admin import MySQLAdmin
from .catalog import qualified
from .connection import Database
from .ddl import NOW
from .feed import MySQLFeed
from .once import MySQLOnceStore

#: The drivers whose URLs we take; ours is PyMySQL whichever is named.
DRIVERS = ("pymysql", "mysqldb", "mysqlconnector", "mariadbconnector")


class MySQLBackend(Backend):
    """A journal table written by triggers, read by polling."""

    durable_by_nature = True
    journals_messages = True

    def __init__(self, url: sa.URL, timeout: float) -> None:
        uri = url.render_as_string(hide_password=False)
        super().__init__(uri, uri, url.database or "")
        self.db = Database(url, self.where, timeout)
        journal, shapes = (
            qualified(self.db.database, t) for t in ("dbnotify_journal", "dbnotify_shapes")
        )
        self.journal_table = journal
        self._notify = f"INSERT INTO {journal} (created_at, body) VALUES ({NOW}, %(payload)s)"

        def header(key: str) -> str | None:
            found = self.db.run(f"SELECT header FROM {shapes} WHERE name = %s", (key,))
            return str(found[0][0]) if found else None

        self.rows = Rows(header, float)
        self.admin = MySQLAdmin(self.db)
        self.once = MySQLOnceStore(self.db, self.rows)

    @classmethod
    def from_url(cls, url: sa.URL, timeout: float) -> MySQLBackend:
        driver = url.get_driver_name()
        if driver not in DRIVERS:
            raise ValueError(
                f"unsupported MySQL driver {driver!r}: use mysql+pymysql:// (or "
                "mysql+mysqldb://, mariadb+...); Flask-DBNotify itself always uses PyMySQL"
            )
        if not url.database:
            raise ValueError(
                "the MySQL URL names no database: add it, e.g. mysql+pymysql://user@host/app"
            )
        if "%" in url.database:
            # Our statements name the journal's database next to PyMySQL's
            # %s parameters.
            raise ValueError(
                f"the database name {url.database!r} holds a %: Flask-DBNotify cannot use it"
            )
        return cls(url, timeout)

    # -- messages and the journal --------------------------------------------

    def notify(self, connection: Any, channel: str, payload: str, durable: bool = False) -> None:
        params = {"payload": payload}
        if connection is None:
            self.db.run(self._notify.replace("%(payload)s", "%s"), (payload,))
        else:
            execute_on(connection, self._notify, params)

    def set_context(self, conn: Any, text: str) -> None:
        context.set_context(conn, text)

    def journal(self, since: int, limit: int) -> tuple[list[Item], int | None]:
        found = self.db.run(
            f"SELECT id, created_at, shape, body FROM {self.journal_table} WHERE id >= %s "
            "ORDER BY id LIMIT %s",
            (since, limit),
        )
        return self.rows.decode_many(found), (found[-1][0] if found else None)

    def feed(self) -> Feed:
        return MySQLFeed(self)

    def release_idle(self, idle: float) -> None:
        self.db.release_idle(idle)

    def after_fork(self) -> None:
        self.db.forget()

    def close(self) -> None:
        self.db.release_idle(0.0)
