"""SQLite: row triggers that append to a journal, and a polling listener.

SQLite has no NOTIFY, and Python's ``sqlite3`` no cross-process hook, so
each watched operation gets an ``AFTER ... FOR EACH ROW`` trigger that
appends the change to ``dbnotify_journal`` in the writer's transaction.
Writers are serialised, so journal ids follow commit order. The listener
reads past its cursor whenever ``PRAGMA data_version`` says another
connection committed; on Linux it sleeps on inotify and wakes the moment
the database or its WAL is written, so it is fast and idle at once.

One module per concern: :mod:`.catalog` (what the database holds),
:mod:`.ddl` (the statements, built without a connection), :mod:`.admin`
(install, status), :mod:`.journal` (rows back into events, a listener's
position, pruning), :mod:`.once` (claims), :mod:`.stream` (the poll
loop), all over :mod:`.connection`.
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa

from ..._items import Item
from ..base import Backend, Feed
from ..common import execute_on
from . import context, journal
from .admin import SQLiteAdmin
from .connection import Database
from .ddl import MAX_ROW_BYTES, NOW
from .feed import SQLiteFeed
from .once import SQLiteOnceStore

__all__ = ["MAX_ROW_BYTES", "SQLiteBackend"]

#: Every message is journaled on SQLite: durable or not, the same path.
_NOTIFY = f"INSERT INTO dbnotify_journal (created_at, body) VALUES ({NOW}, :payload)"


class SQLiteBackend(Backend):
    """A journal table written by triggers, read by polling."""

    durable_by_nature = True
    journals_messages = True

    def __init__(self, uri: str, path: str) -> None:
        super().__init__(uri, uri, "main")
        self.path = path
        self.db = Database(path)
        self.rows = journal.rows_of(self.db)
        self.admin = SQLiteAdmin(self.db)
        self.once = SQLiteOnceStore(self.db, self.rows)

    @classmethod
    def from_url(cls, url: sa.URL, root: str) -> SQLiteBackend:
        database = url.database or ""
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
            raise ValueError(
                "an in-memory SQLite database cannot be shared with a listener: "
                "use a file, e.g. sqlite:///app.db"
            )
        if database.startswith("file:"):
            raise ValueError("use a plain sqlite:///path URL, not a file: URI")
        # Relative paths are relative to the instance folder, as in
        # Flask-SQLAlchemy, so both name the same file.
        path = os.path.abspath(os.path.join(root, database))
        url = url.set(drivername="sqlite", database=path)
        return cls(url.render_as_string(hide_password=False), path)

    # -- messages and the journal --------------------------------------------

    def notify(self, connection: Any, channel: str, payload: str, durable: bool = False) -> None:
        params = {"payload": payload}
        if connection is None:
            self.db.run(_NOTIFY, params)
        else:
            execute_on(connection, _NOTIFY, params)

    def set_context(self, conn: Any, text: str) -> None:
        context.set_context(conn, text, self.where)

    def journal(self, since: int, limit: int) -> tuple[list[Item], int | None]:
        return journal.read(self.db, self.rows, since, limit)

    def feed(self) -> Feed:
        return SQLiteFeed(self)
