"""Every statement the MySQL backend runs goes through :class:`Database`
(but the listener's poll loop, which keeps its connection, and
``notify(connection=...)``, which runs on the caller's): PyMySQL
connections in autocommit, kept in a small pool, with one translation of
errors. Whatever driver the app's URL names, ours is PyMySQL (pure
Python, nothing to build), as psycopg2 is on PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pymysql
import sqlalchemy as sa
from sqlalchemy.dialects.mysql.pymysql import MySQLDialect_pymysql

from ...errors import DBNotifyError

T = TypeVar("T")

#: Server error codes we explain.
NO_SUCH_TABLE = 1146
_ACCESS_DENIED = (1044, 1045, 1142, 1143, 1227, 1370)
_UNKNOWN_DATABASE = 1049
#: The client's: no server answers, the connection was lost.
_UNREACHABLE = (2002, 2003, 2005, 2006, 2013)


def connect_args(url: sa.URL, timeout: float) -> dict[str, Any]:
    """PyMySQL's arguments for ``url`` (host, port, user, password,
    database, socket and TLS settings in its query), read as SQLAlchemy's
    own PyMySQL dialect reads them, whatever driver the URL names."""
    url = url.set(drivername="mysql+pymysql")
    query = {k: v for k, v in url.query.items() if k not in ("charset", "binary_prefix")}
    _, kwargs = MySQLDialect_pymysql().create_connect_args(url.set(query=query))
    kwargs.update(
        charset="utf8mb4",
        autocommit=True,
        connect_timeout=max(1, int(timeout)),
        # Our statements compare and build text byte for byte; the client
        # charset is the same for every session of ours.
        init_command="SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
    )
    return dict(kwargs)


def cannot_connect(where: str, exc: BaseException) -> DBNotifyError:
    """The error for a connection that failed, naming where and what to do."""
    code = _code(exc)
    if code == _UNKNOWN_DATABASE:
        todo = "create the database, or fix the database name in the URL"
    elif code in _ACCESS_DENIED:
        todo = "check the user and password in the URL, and the user's grants"
    elif code in _UNREACHABLE:
        todo = "is the server running there? Check the host and port in the URL"
    else:
        todo = "check the URL and the server"
    return DBNotifyError(f"cannot connect to {where}: {reason(exc)}; {todo}")


def _code(exc: BaseException) -> int | None:
    args: tuple[Any, ...] = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def reason(exc: BaseException) -> str:
    """The server's (or the client's) message, without its error code."""
    args: tuple[Any, ...] = getattr(exc, "args", ())
    if len(args) >= 2 and isinstance(args[0], int):
        return str(args[1]).replace("\n", " ")
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def refused(exc: BaseException) -> DBNotifyError:
    """The error for a statement the server refused."""
    if _code(exc) == NO_SUCH_TABLE and "dbnotify_" in str(exc):
        return DBNotifyError(f"{reason(exc)}: run `flask dbnotify install-triggers`")
    return DBNotifyError(f"the database refused: {reason(exc)}")


def drop_inherited(conn: Any) -> None:
    """In a forked child: close this process's copy of a connection's
    socket, without a word to the server (no shutdown, no quit): the
    parent's session goes on, and ends when the parent's copy closes,
    instead of lingering as long as this process lives."""
    sock = getattr(conn, "_sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            os.close(sock.detach())
    conn._sock = None


class Database:
    """The app's database, and how we run SQL on it: a few pooled
    connections, each used by one task at a time."""

    def __init__(self, url: sa.URL, where: str, timeout: float = 5.0) -> None:
        self.url = url
        self.where = where
        self.database = url.database or ""
        self.timeout = timeout
        self._idle: list[tuple[float, pymysql.Connection[Any]]] = []
        self._lock = threading.Lock()

    def connect(self) -> pymysql.Connection[Any]:
        """A new connection of our own (autocommit), or the error saying why not."""
        try:
            return pymysql.connect(**connect_args(self.url, self.timeout))
        except pymysql.MySQLError as exc:
            raise cannot_connect(self.where, exc) from exc

    @contextlib.contextmanager
    def connection(self) -> Iterator[pymysql.Connection[Any]]:
        """A pooled connection for one task; dropped, not pooled again, when
        the task failed on it."""
        with self._lock:
            conn = self._idle.pop()[1] if self._idle else None
        if conn is not None:
            # Pinged before each use, as on PostgreSQL: a connection that a
            # server restart closed is replaced, not lent out.
            try:
                conn.ping(reconnect=False)
            except pymysql.MySQLError:
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
        if conn is None:
            conn = self.connect()
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        with self._lock:
            self._idle.append((time.monotonic(), conn))

    def with_connection(self, work: Callable[[pymysql.Connection[Any]], T]) -> T:
        """Run ``work(connection)``; a server's refusal becomes a DBNotifyError."""
        try:
            with self.connection() as conn:
                return work(conn)
        except pymysql.MySQLError as exc:
            raise refused(exc) from exc

    def run(self, statement: str, params: Any = None) -> list[Any]:
        """Run one statement (autocommit) and return its rows."""

        def work(conn: pymysql.Connection[Any]) -> list[Any]:
            with conn.cursor() as cur:
                cur.execute(statement, params)
                return list(cur.fetchall())

        return self.with_connection(work)

    def transaction(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in one transaction, committed after."""

        def run(conn: pymysql.Connection[Any]) -> T:
            conn.begin()
            try:
                with conn.cursor() as cur:
                    result = work(cur)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
            return result

        return self.with_connection(run)

    def release_idle(self, idle: float) -> None:
        """Close pooled connections unused for ``idle`` seconds."""
        if not self._idle:
            return
        now = time.monotonic()
        with self._lock:
            old = [conn for used, conn in self._idle if now - used >= idle]
            self._idle = [(used, conn) for used, conn in self._idle if now - used < idle]
        for conn in old:
            with contextlib.suppress(Exception):
                conn.close()

    def forget(self) -> None:
        """In a forked child: drop the parent's connections untouched."""
        for _, conn in self._idle:
            drop_inherited(conn)
        self._idle = []
        self._lock = threading.Lock()
