"""A transaction's context on SQLite (``set_context()``).

The journal rows a transaction writes after the call get the context at
its commit, in their body: ``{"cx": CONTEXT, "r": VALUES}``. Writers are
serialised: once the call holds the write lock, every journal row past the
highest id it sees is this transaction's until it commits. The triggers
read nothing, so writes without a context pay nothing, and a commit that
bypasses the hook leaves no context behind for anyone.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ..._context import autocommit_error, keep, kept
from ...errors import DBNotifyError

#: Takes the write lock and changes nothing.
_LOCK = "UPDATE dbnotify_journal SET id = id WHERE 0"
_LAST = "SELECT coalesce(max(id), 0) FROM dbnotify_journal"
_APPLY = (
    "UPDATE dbnotify_journal SET body = json_object('cx', ?, 'r', json(body)) "
    "WHERE id > ? AND id <= ? AND shape IS NOT NULL"
)
#: Kept for the transaction (``_context.keep``): ``(last id, context)`` of
#: each set_context() call in it.
_KEY = "flask_dbnotify.sqlite_context"


def set_context(conn: sa.Connection, text: str, where: str) -> None:
    """Give the journal rows ``conn``'s transaction writes from now on the
    context ``text`` (JSON; '' for none) when it commits."""
    if not sa.event.contains(conn, "commit", apply):
        sa.event.listen(conn, "commit", apply)
    if not conn.in_transaction():
        conn.begin()  # as a statement would; a "begin" hook may send BEGIN
    dbapi: Any = conn.connection.dbapi_connection
    if dbapi.isolation_level is None and not dbapi.in_transaction:
        raise autocommit_error()
    try:
        conn.exec_driver_sql(_LOCK)
        last = conn.exec_driver_sql(_LAST).scalar_one()
    except sa.exc.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        raise DBNotifyError(
            f"{where} has no journal: run `flask dbnotify install-triggers`"
        ) from exc
    calls = kept(conn, _KEY)
    if calls is None:
        calls = []
        keep(conn, _KEY, calls)
    calls.append((last, text))


def apply(conn: sa.Connection) -> None:
    """Before ``conn`` commits (a ConnectionEvents.commit hook): write the
    contexts of its transaction into its journal rows."""
    calls = kept(conn, _KEY, pop=True)
    if calls is None:
        return
    end = conn.exec_driver_sql(_LAST).scalar_one()
    ends = [last for last, _ in calls[1:]] + [end]
    for (last, text), upto in zip(calls, ends, strict=True):
        if text and upto > last:
            conn.exec_driver_sql(_APPLY, (text, last, upto))
