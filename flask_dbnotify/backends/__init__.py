"""Database backends: the DDL, the listening stream and ``notify``.

A backend is chosen by the database URL's scheme. Every backend implements
:class:`Backend`; the listener thread only talks to a :class:`Stream`.
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

from .._items import Item
from .._watch import Watch
from ..events import ChangeEvent

WatchState = Literal["installed", "outdated", "missing", "error"]

#: What a listener whose connection hears nothing is told (after "the
#: listener's connection to WHERE").
DEAF = (
    "receives no notifications, so events and messages that are not journaled "
    "are lost: a transaction- or statement-pooling proxy (pgbouncer, RDS Proxy) "
    "between the listener and the server? Point DBNOTIFY_LISTEN_URI at the server "
    "directly or at a session-pooled address"
)


@dataclass
class Status:
    """What the database holds compared with the watches."""

    watches: dict[str, WatchState] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    orphaned: list[str] = field(default_factory=list)
    #: Health of the database side: queue usage, listener sessions, journal
    #: size; label to value, for people to read.
    health: dict[str, str] = field(default_factory=dict)
    #: What an operator should fix (a function others may run, objects of
    #: an earlier version), each with what to do.
    warnings: list[str] = field(default_factory=list)

    def compare(self, name: str, present: set[Any], wanted: set[Any]) -> None:
        """Record a watch's state from the triggers it has and needs (as
        names, or (table, name) pairs)."""
        if present == wanted:
            self.watches[name] = "installed"
        elif present:
            self.watches[name] = "outdated"
            self.details[name] = "the database's triggers differ from what watch() describes"
        else:
            self.watches[name] = "missing"

    def error(self, name: str, error: Exception) -> None:
        self.watches[name] = "error"
        self.details[name] = str(error)

    def once_health(self, query: Callable[[str], list[Any]], claims: str, receivers: str) -> None:
        """Add each once receiver's backlog and the last failures, read with
        ``query`` from the ``claims`` and ``receivers`` tables (as quoted)."""
        counts = "(SELECT {what} FROM {claims} c WHERE c.receiver = r.receiver AND c.state {cond})"
        rows = query(
            "SELECT r.receiver, "
            + ", ".join(
                counts.format(what=what, claims=claims, cond=cond)
                for what, cond in (
                    ("count(*)", "IN ('running', 'retry')"),
                    ("min(event_id)", "IN ('running', 'retry')"),
                    ("count(*)", "= 'failed'"),
                )
            )
            + f" FROM {receivers} r ORDER BY r.receiver"
        )
        for receiver, pending, oldest, failed in rows:
            line = f"{pending} in progress or to retry"
            if oldest is not None:
                line += f" (oldest event {oldest})"
            self.health[f"once {receiver}"] = line + f", {failed} failed"
        for receiver, event_id, attempts, error in query(
            f"SELECT receiver, event_id, attempts, last_error FROM {claims} "
            "WHERE state = 'failed' ORDER BY event_id DESC LIMIT 10"
        ):
            self.health[f"failed {receiver} #{event_id}"] = f"after {attempts} attempts: {error}"


class Stream(abc.ABC):
    """A listening connection, owned by the listener thread."""

    #: Where this stream's hearing checks are sent (see
    #: :meth:`Backend.send_check`); ``None`` for a stream that cannot go
    #: deaf (a poll loop reads the data itself).
    check_channel: str | None = None

    def expect(self, token: str | None) -> None:  # noqa: B027 - optional hook
        """Watch for a hearing check carrying ``token`` (forget any earlier one)."""

    def heard(self) -> bool:
        """Whether the check named by the last :meth:`expect` has arrived."""
        return False

    @abc.abstractmethod
    def wait(self, timeout: float, wake_fd: int) -> None:
        """Block until items may be ready, ``wake_fd`` is readable, or
        ``timeout`` seconds have passed."""

    @abc.abstractmethod
    def read(self) -> list[Any]:
        """Return what arrived, in commit order, without blocking: raw
        messages for :meth:`Backend.decode`, so the reader stays cheap."""

    @abc.abstractmethod
    def probe(self) -> None:
        """Raise if the connection is dead."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Drop a connection inherited across ``fork()`` without touching
        the parent's session."""


class Backend(abc.ABC):
    """One database engine's way of doing things."""

    #: Every change is journaled, so nothing is lost across reconnects.
    durable_by_nature = False

    def __init__(self, uri: str, listen_uri: str, schema: str, engine: sa.Engine) -> None:
        self.uri = uri
        self.listen_uri = listen_uri
        self.schema = schema
        self.engine = engine
        #: Where the database is, for messages (no password).
        self.where = where(uri)
        #: Where the listener connects, for messages.
        self.listen_where = where(listen_uri)

    @abc.abstractmethod
    def install_sql(self, watches: Sequence[Watch]) -> list[str]:
        """The statements that make the database match ``watches``."""

    @abc.abstractmethod
    def install(self, watches: Sequence[Watch]) -> None:
        """Run :meth:`install_sql` in one transaction."""

    @abc.abstractmethod
    def uninstall_sql(self, watches: Sequence[Watch], everything: bool) -> list[str]:
        """The statements that remove what ``watches`` installed (or every
        object of ours, with ``everything``)."""

    @abc.abstractmethod
    def status(self, watches: Sequence[Watch], health: bool = True) -> Status:
        """Compare the database with ``watches``; with ``health``, also
        read the database side's health (queue, listeners, journal)."""

    @abc.abstractmethod
    def prune(self, retention: float) -> None:
        """Delete stored payloads older than ``retention`` seconds."""

    @abc.abstractmethod
    def notify(self, connection: Any, channel: str, payload: str, durable: bool = False) -> None:
        """Send an encoded message through ``connection`` (a SQLAlchemy
        connection or session), or at once when it is ``None``; journal it
        when ``durable``."""

    @abc.abstractmethod
    def decode(self, raw: Any) -> list[Item]:
        """Turn one raw message from :meth:`Stream.read` into events or a
        message; malformed input is logged and skipped. Runs on the
        dispatcher thread."""

    @abc.abstractmethod
    def open_stream(self, settings: Any) -> Stream:
        """Connect, start listening, and return the stream."""

    def catch_up(self) -> list[Item]:
        """Journaled events this listener has not seen (after a reconnect or
        a drop); the first call sets where "now" is. Runs on the dispatcher
        thread."""
        return []

    # -- exactly-once receivers (all run on the dispatcher thread) ----------
    #
    # A receiver's watermark says how far it has claimed: every journal row
    # of its watches up to there has a claim (receiver, event id), made by
    # exactly one process. ``cursor`` values are opaque to callers.

    @abc.abstractmethod
    def once_register(self, receivers: Sequence[str]) -> None:
        """Give receivers without a watermark one at "now"."""

    @abc.abstractmethod
    def once_scan(
        self, receiver: str, watches: Sequence[str], limit: int
    ) -> tuple[list[ChangeEvent], Any]:
        """Journaled events of ``watches`` past the receiver's watermark, in
        order, and the cursor to advance it to once they are claimed."""

    @abc.abstractmethod
    def once_claim(self, receiver: str, ids: Sequence[int], worker: str) -> set[int]:
        """Claim events; return the ids this call won."""

    @abc.abstractmethod
    def once_advance(self, receiver: str, cursor: Any) -> None:
        """Move the watermark forward to ``cursor`` (never back)."""

    @abc.abstractmethod
    def once_finish(
        self, receiver: str, event_id: int, error: str | None, retry_in: float | None
    ) -> None:
        """Record the outcome: done (no error), retry after ``retry_in``
        seconds, or failed for good (error and no retry)."""

    @abc.abstractmethod
    def once_release(self, receiver: str, ids: Sequence[int]) -> None:
        """Give back claims this process made but will not run (it is
        stopping): they are due again at once, for any process."""

    @abc.abstractmethod
    def once_reset(self, receiver: str, event_id: int, worker: str) -> None:
        """Claim an event for an operator's replay, whatever its claim said:
        running, first attempt."""

    @abc.abstractmethod
    def once_forget(self, receiver: str) -> None:
        """Drop a retired receiver's watermark and claims."""

    @abc.abstractmethod
    def once_due(
        self, receiver: str, worker: str, lease: float, limit: int
    ) -> list[tuple[int, int, ChangeEvent | None]]:
        """Claim events due for another attempt (retry time reached, or a
        claim older than ``lease`` whose process died): ``(id, attempt,
        event)``; the event is None if its journal row is gone."""

    @abc.abstractmethod
    def journal(self, since: int, limit: int) -> tuple[list[Item], int | None]:
        """Journaled events and messages of up to ``limit`` journal rows with
        ids from ``since``, in id order, and the last id read."""

    def send_check(self, channel: str, token: str) -> None:
        """Send a hearing check, ``token``, to a stream's ``check_channel``
        from a session of our own pool: the way real events reach the
        listener, from another session."""
        raise NotImplementedError(f"{type(self).__name__} has no hearing checks")

    def count(self, raw: Any) -> int:
        """How many events a raw message holds, without building them."""
        return 1

    def replaying(self) -> bool:
        """Whether :meth:`catch_up` has work even without durable watches
        (journaled messages were delivered live)."""
        return False

    def rewind(self, raw: list[Any]) -> None:  # noqa: B027 - optional hook
        """Make these undelivered raw messages be read again after a restart
        (a journaled backend); others cannot and do nothing."""

    def after_fork(self) -> None:
        """In a forked child: forget pooled connections without closing them."""
        self.engine.dispose(close=False)

    def close(self) -> None:
        """Close the pooled connections (the listener's is closed by its stream)."""
        self.engine.dispose()

    def release_idle(self, idle: float) -> None:  # noqa: B027 - optional hook
        """Close pooled connections that nothing used for ``idle`` seconds,
        so that an idle process holds only its listener's connection.
        Called often by the listener's reader thread: must be cheap."""

    @abc.abstractmethod
    def execute_all(self, statements: Sequence[str]) -> None:
        """Run ``statements`` (our DDL, no parameters) in one transaction."""


def execute_on(connection: Any, statement: str, params: dict[str, Any]) -> None:
    """Run ``statement`` on a SQLAlchemy Connection or Session, or on a
    DB-API connection, inside its current transaction."""
    if isinstance(connection, sa.Connection):
        connection.exec_driver_sql(statement, params)
    elif hasattr(connection, "connection") and hasattr(connection, "get_bind"):
        # A Session (or scoped_session): its Connection for this transaction.
        connection.connection().exec_driver_sql(statement, params)
    elif hasattr(connection, "cursor"):
        cur = connection.cursor()
        try:
            cur.execute(statement, params)
        finally:
            cur.close()
    else:
        raise TypeError(
            "connection must be a SQLAlchemy Connection or Session, or a DB-API "
            f"connection, not {type(connection).__name__}"
        )


_CONNECT_PREFIX = re.compile(r"^connection to server (?:at|on) .*? failed: |^(?:FATAL|ERROR): +")


def reason(exc: BaseException) -> str:
    """A database error in one line: the server's message (with its detail
    and hint), without the address psycopg2 prefixes (callers name it)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    diag = getattr(exc, "diag", None)
    if diag is not None and diag.message_primary:
        extra = [d for d in (diag.message_detail, diag.message_hint) if d]
        text = str(diag.message_primary) + "".join(f" ({d})" for d in extra)
        return text.replace("\n", " ")
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    line = lines[0]
    while (shorter := _CONNECT_PREFIX.sub("", line)) != line:
        line = shorter
    return line.strip()


def where(uri: str) -> str:
    """Where ``uri`` points, for people: ``PostgreSQL at HOST:PORT (database
    D, user U)`` or ``SQLite file PATH``; never the password. Host and port
    come from the URL, its query, else ``PGHOST``/``PGPORT``, as libpq
    takes them."""
    url = sa.make_url(uri)
    if url.get_backend_name() == "sqlite":
        return f"SQLite file {url.database or '(none)'}"

    def setting(value: Any, query: str, env: str) -> str | None:
        # The query overrides the URL's own part, as it does when we connect.
        value = url.query.get(query) or value or os.environ.get(env)
        if value is None or isinstance(value, str | int):
            return None if value is None else str(value)
        return ",".join(value)

    host = setting(url.host, "host", "PGHOST")
    port = setting(url.port, "port", "PGPORT") or "5432"
    found = [f"database {url.database}"] if url.database else []
    found += [f"user {url.username}"] if url.username else []
    if host is None:
        return "PostgreSQL on the local socket (" + ", ".join([f"port {port}", *found]) + ")"
    return f"PostgreSQL at {host}:{port}" + (f" ({', '.join(found)})" if found else "")


_PASSWORD = re.compile(r"(^|://)([^:/@]*):[^/]*@")


def parse_url(uri: str) -> sa.URL:
    """``uri`` as a URL, or a ValueError that does not show its password."""
    try:
        return sa.make_url(uri)
    except (sa.exc.ArgumentError, ValueError) as exc:
        shown = _PASSWORD.sub(r"\1\2:***@", uri)
        raise ValueError(f"cannot read database URL {shown!r}: {exc}") from None


def backend_for(uri: str, listen_uri: str | None, schema: str, root: str) -> Backend:
    """Return the backend for a database URL; ``root`` anchors relative
    SQLite paths (the app's instance folder)."""
    url = parse_url(uri)
    name = url.get_backend_name()
    if name == "postgresql":
        from .postgresql import PostgreSQLBackend

        return PostgreSQLBackend.from_url(url, listen_uri, schema)
    if name == "sqlite":
        from .sqlite import SQLiteBackend

        return SQLiteBackend.from_url(url, root)
    raise ValueError(
        f"unsupported database URL {url.render_as_string()!r}: "
        "Flask-DBNotify works with postgresql:// and sqlite:/// URLs"
    )
