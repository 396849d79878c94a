"""A transaction's context on MySQL (``set_context()``): the session
variable ``@dbnotify_context``, which the triggers read for every row they
journal, set until the transaction ends. MySQL has no variable that lives
as long as a transaction: the commit and rollback hooks of the SQLAlchemy
connection set it back to NULL, so that it never reaches the next
transaction of a pooled connection."""

from __future__ import annotations

import contextlib
from typing import Any

import sqlalchemy as sa

from ..._context import autocommit_error
from .ddl import CONTEXT

_SET = f"SET {CONTEXT} = %(context)s"


def set_context(conn: sa.Connection, text: str) -> None:
    """Give the rows ``conn``'s transaction writes from now on the context
    ``text`` (JSON; '' for none)."""
    for event in ("commit", "rollback"):
        if not sa.event.contains(conn, event, clear):
            sa.event.listen(conn, event, clear)
    in_transaction(conn)
    conn.exec_driver_sql(_SET, {"context": text or None})


def in_transaction(conn: sa.Connection) -> None:
    """Begin ``conn``'s transaction if none is under way (as a statement
    would); ValueError for a connection in autocommit, whose statements
    would each commit without the context."""
    if not conn.in_transaction():
        conn.begin()
    dbapi: Any = conn.connection.dbapi_connection
    if getattr(dbapi, "get_autocommit", lambda: False)():
        raise autocommit_error()


def clear(conn: sa.Connection) -> None:
    """As ``conn``'s transaction ends (a commit or rollback hook): no context."""
    with contextlib.suppress(sa.exc.DBAPIError):
        conn.exec_driver_sql(_SET, {"context": None})
