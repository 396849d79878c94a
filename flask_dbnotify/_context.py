"""Who made a change: :meth:`DBNotify.set_context
<flask_dbnotify.DBNotify.set_context>` and ``event.context``.

A transaction's context is a small JSON object. The backend puts it
where its capture reads it in the same transaction (PostgreSQL triggers:
the transaction-local setting :data:`SETTING`; WAL capture: a
transactional logical message with the prefix :data:`SETTING`; SQLite: the
journal rows written after the call, at commit: see
``backends/sqlite/context.py``), and every row change captured after that
carries it, as the text ``"cx"`` of its body. Messages sent with
``notify(connection=...)`` carry it too: the connection remembers it for
its current transaction (:func:`remember`).

Anyone who may write a watched table can say anything of themselves this
way: a context is what the writer claims, never proof of who it is.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Any

import sqlalchemy as sa

from ._log import RateLimited

#: Where the context travels on PostgreSQL (the setting's name, and the
#: prefix of WAL capture's logical message).
SETTING = "dbnotify.context"
#: A context is at most this many bytes of JSON; the triggers and WAL
#: capture ignore a longer one (set by other means than set_context()).
MAX_BYTES = 1024

_INFO_KEY = "flask_dbnotify.context"
_limited = RateLimited(logging.getLogger("flask_dbnotify.listener"))


def encode(values: dict[str, Any]) -> str:
    """``values`` as the JSON text a transaction carries ('' for none);
    TypeError or ValueError, before anything is sent, for what cannot be."""
    if not values:
        return ""
    try:
        text = json.dumps(values, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        size = len(text.encode())
    except RecursionError:
        raise TypeError("set_context() values are nested too deeply for JSON") from None
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"set_context() values must be JSON values (str, int, float, bool, None, "
            f"lists and dicts of them): {exc}"
        ) from None
    if size > MAX_BYTES:
        raise ValueError(
            f"the context is {size} bytes as JSON, over the {MAX_BYTES} every change "
            "carries: keep identifiers in it (a user id, a request id), not data"
        )
    return text


def decode(value: Any) -> dict[str, Any] | None:
    """The context a body carries (``"cx"``: JSON text from the database,
    or the object itself in a message); None if absent or unreadable. The
    rows of one transaction carry the same text: it is parsed once (each
    event gets a dict of its own)."""
    global _last
    if value is None or type(value) is dict:
        return value
    last = _last
    if last[0] == value and last[1] is not None:
        return dict(last[1])
    try:
        found = json.loads(value) if isinstance(value, str) and value else None
    except (ValueError, RecursionError):
        found = None
    if type(found) is not dict:
        _limited.warning("ignored a context that is not a JSON object: %.100r", value)
        return None
    _last = (value, found)
    return dict(found)


#: The last context text read, and what it was read as.
_last: tuple[Any, dict[str, Any] | None] = (None, None)


def sqlalchemy_connection(connection: Any) -> sa.Connection | None:
    """The SQLAlchemy Connection of a Connection or Session (or
    scoped_session: the Session's for its current transaction, which this
    begins); None otherwise."""
    if isinstance(connection, sa.Connection):
        return connection
    if hasattr(connection, "connection") and hasattr(connection, "get_bind"):
        conn = connection.connection()
        return conn if isinstance(conn, sa.Connection) else None
    return None


def require_connection(connection: Any) -> sa.Connection:
    """:func:`sqlalchemy_connection`, or a TypeError saying what to pass;
    a ValueError for one in autocommit, which has no transaction to carry
    a context."""
    conn = sqlalchemy_connection(connection)
    if conn is None:
        raise TypeError(
            "set_context() takes a SQLAlchemy Connection or Session (its transaction "
            f"is the one that carries the context), not {type(connection).__name__}"
        )
    if getattr(conn.connection.dbapi_connection, "autocommit", None) is True:
        raise autocommit_error()
    return conn


def autocommit_error() -> ValueError:
    """What set_context() raises for a connection in autocommit."""
    return ValueError(
        "set_context() needs a transaction, and this connection is in autocommit: "
        "each statement commits on its own, so no change would carry the context"
    )


def keep(conn: sa.Connection, key: str, value: Any) -> None:
    """Keep ``value`` under ``key`` for ``conn``'s current transaction, if
    one is under way."""
    transaction = conn.get_transaction()
    if transaction is not None:
        conn.info[key] = (weakref.ref(transaction), value)


def kept(conn: sa.Connection, key: str, pop: bool = False) -> Any:
    """What :func:`keep` kept under ``key`` for ``conn``'s current
    transaction, or None: never what an earlier transaction kept, nor
    another checkout of the same pooled connection (``Connection.info``
    is the DB-API connection's)."""
    found = conn.info.pop(key, None) if pop else conn.info.get(key)
    transaction = conn.get_transaction()
    if found is None or transaction is None or found[0]() is not transaction:
        return None
    return found[1]


def remember(conn: sa.Connection, values: dict[str, Any]) -> None:
    """Keep ``values`` for the messages ``conn`` sends in its current
    transaction (begun by the statement that set the context)."""
    keep(conn, _INFO_KEY, values or None)


def current(connection: Any) -> dict[str, Any] | None:
    """The context of ``connection``'s current transaction, if it set one."""
    conn = sqlalchemy_connection(connection)
    return None if conn is None else kept(conn, _INFO_KEY)
