"""PostgreSQL: statement-level triggers that NOTIFY, and a LISTENing socket.

Each watched operation gets ``AFTER ... FOR EACH STATEMENT`` triggers with a
transition table, on the watched table and on each of its partitions and
inheritance children (a statement on a child fires only the child's
statement triggers). What runs in a writer's transaction is split by the
rights it needs (see docs/security.rst):

- A *fast* watch has one trigger function per operation, ``SECURITY
  INVOKER``: it turns the rows into JSON with the writer's own rights and
  sends them with ``pg_notify``; a message longer than a notification is
  sent in pieces.
- A *durable* watch has two per operation, fired one after the other. The
  first (invoker) turns the rows into JSON and leaves them in
  transaction-local settings; the second (``SECURITY DEFINER``, no user
  value ever passes through a function of the user's in it) moves them into
  the journal, which only it and the app's role may write.

Every function is executable by its owner only, and is marked with a
comment so that we drop only what we created.

The package has a module per concern: :mod:`.catalog` (what the database
holds), :mod:`.rows` and :mod:`.bodies` (the SQL the triggers run),
:mod:`.ddl` (the statements, built without a connection), :mod:`.admin`
(install, status), :mod:`.journal` (what a listener reads, replay,
pruning), :mod:`.once` (claims), :mod:`.stream` (the LISTENing
connection), all over :mod:`.connection`.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ... import _payload
from ..._context import SETTING as CONTEXT_SETTING
from ..._items import Item
from ..base import Backend, Feed
from ..common import execute_on, parse_url
from . import journal
from .admin import PostgreSQLAdmin
from .common import (
    CHANNEL,
    MAX_MESSAGE_BYTES,
    MAX_ROW_BYTES,
    NOTIFY_LIMIT,
    PIECE_BYTES,
    ident,
)
from .connection import Database, connect_kwargs
from .journal import PostgreSQLFeed
from .once import PostgreSQLOnceStore

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_ROW_BYTES",
    "NOTIFY_LIMIT",
    "PIECE_BYTES",
    "PostgreSQLBackend",
]

#: Sends a durable message: journaled like a durable row event, and the
#: notification names its journal row, as a durable trigger's does.
_NOTIFY_DURABLE = (
    "WITH ins AS (INSERT INTO {} (body) VALUES (%(payload)s) RETURNING id, xid) "
    "SELECT pg_notify(%(channel)s, '{{\"v\": 1, \"J\": [' || id || ', ' || id "
    "|| '], \"x\": ' || xid || ', \"j\": ' || to_json(%(schema)s::text) || '}}') FROM ins"
)
#: What the triggers read (see ``bodies.CONTEXT``).
_SET_CONTEXT = "SELECT set_config(%(name)s, %(text)s, true)"
#: Sends a message in pieces, in order, in one statement; each piece is
#: unique (PostgreSQL folds equal notifications of a transaction).
_NOTIFY_PIECES = (
    "SELECT pg_notify(%(channel)s, p) "
    "FROM unnest(%(pieces)s::text[]) WITH ORDINALITY AS t(p, o) ORDER BY o"
)


class PostgreSQLBackend(Backend):
    """LISTEN/NOTIFY with statement-level triggers."""

    def __init__(self, url: sa.URL, listen_url: sa.URL, schema: str) -> None:
        super().__init__(
            url.render_as_string(hide_password=False),
            listen_url.render_as_string(hide_password=False),
            schema,
        )
        self.db = Database(url, self.where)
        #: psycopg2.connect() arguments for the listener's URL.
        self.connect_kwargs = connect_kwargs(listen_url)
        #: Our tables, quoted, by short name.
        self.tables = {
            n: ident(schema, f"dbnotify_{n}") for n in ("journal", "receivers", "claims")
        }
        self.admin = PostgreSQLAdmin(self.db, schema, self.listen_where, self.connect_kwargs)
        self.once = PostgreSQLOnceStore(self.db, self.tables)

    @classmethod
    def from_url(cls, url: sa.URL, listen_uri: str | None, schema: str) -> PostgreSQLBackend:
        listen_url = parse_url(listen_uri) if listen_uri else url
        if listen_url.get_backend_name() != "postgresql":
            raise ValueError("DBNOTIFY_LISTEN_URI must be a postgresql:// URL")
        return cls(url, listen_url, schema)

    # -- messages and the journal --------------------------------------------

    def notify(self, connection: Any, channel: str, payload: str, durable: bool = False) -> None:
        params: dict[str, Any] = {"channel": CHANNEL}
        if durable:
            statement = _NOTIFY_DURABLE.format(self.tables["journal"])
            params["payload"] = payload
            params["schema"] = self.schema
        else:
            size = len(payload.encode())
            if size > MAX_MESSAGE_BYTES:
                raise ValueError(
                    f"the message is {size} bytes as JSON; listeners take at most "
                    f"{MAX_MESSAGE_BYTES}: send it with durable=True, or send less"
                )
            statement = _NOTIFY_PIECES
            params["pieces"] = _payload.pieces(payload, NOTIFY_LIMIT, PIECE_BYTES)
        if connection is None:
            self.db.run(statement, params, failed="notify() failed")
        else:
            execute_on(connection, statement, params)

    def set_context(self, conn: Any, text: str) -> None:
        # Transaction-local: gone at commit or rollback, as it should be.
        conn.exec_driver_sql(_SET_CONTEXT, {"name": CONTEXT_SETTING, "text": text})

    def journal(self, since: int, limit: int) -> tuple[list[Item], int | None]:
        return journal.read(self.db, self.tables["journal"], since, limit)

    # -- the listener's side -------------------------------------------------

    def feed(self) -> Feed:
        return PostgreSQLFeed(self)

    def send_check(self, channel: str, token: str) -> None:
        self.db.run("SELECT pg_notify(%(c)s, %(t)s)", {"c": channel, "t": token}, rare=True)

    def release_idle(self, idle: float) -> None:
        self.db.release_idle(idle)

    def after_fork(self) -> None:
        self.db.after_fork()

    def close(self) -> None:
        self.db.close()
