"""Every statement the PostgreSQL backend runs on the application's
database goes through :class:`Database`: a small pool for what runs often
(journal reads, claims, ``notify``), a connection of its own for what runs
rarely (DDL, status, pruning, hearing checks), and one translation of
errors. A listener reads the journal through a :class:`Reader`, one
connection of its own; the listener's stream and the session ``status``
opens at the listener's URL also have their own; ``notify(connection=...)``
runs on the caller's.

Connections are in autocommit: what we run is single statements, which
then also work through a pooler in statement mode (it refuses BEGIN);
``cursor(transaction=True)`` begins its transaction itself.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg2
import sqlalchemy as sa

from ...errors import DBNotifyError
from ..common import reason
from .common import READER_NAME

T = TypeVar("T")

# What libpq says when no server answers at the address.
_UNREACHABLE = (
    "Connection refused",
    "No such file or directory",
    "could not translate host name",
    "server closed the connection",
    "timeout expired",
    "no answer from the server",
    "No route to host",
    "Network is unreachable",
)


def cannot_connect(where: str, exc: BaseException) -> DBNotifyError:
    """The error for a connection that failed, naming where and what to do."""
    why = reason(exc)
    if why.startswith("database ") and why.endswith(" does not exist"):
        todo = "create the database, or fix the database name in the URL"
    elif (
        why.startswith("role ")
        and why.endswith(" does not exist")
        or any(s in why for s in ("password", "pg_hba.conf", "authentication failed"))
    ):
        todo = "check the user and password in the URL, and the server's pg_hba.conf"
    elif "too many connections" in why or "remaining connection slots" in why:
        todo = "the server has no connection free: close idle ones, or raise its limits"
    elif any(s in why for s in _UNREACHABLE):
        todo = "is the server running there? Check the host and port in the URL"
    else:
        todo = "check the URL and the server"
    return DBNotifyError(f"cannot connect to {where}: {why}; {todo}")


def refused(exc: BaseException, what: str = "the database refused") -> DBNotifyError:
    """The error for a statement the server (or the connection) refused,
    saying ``what`` failed."""
    return DBNotifyError(f"{what}: {reason(exc)}")


_STATEMENT_POOLING = (
    "installing triggers needs a transaction, and {where} closed the connection "
    "as one began while single statements work: a pooler in statement pooling "
    "mode (pgbouncer pool_mode = statement)? Run install-triggers with "
    "DBNOTIFY_DATABASE_URI set to the server directly or to a session-pooled "
    "address (or run the output of `flask dbnotify install-triggers --sql` "
    "there, in one transaction)"
)


def connect_kwargs(url: sa.URL) -> dict[str, Any]:
    """psycopg2.connect() arguments for ``url`` (its query included)."""
    kwargs: dict[str, Any] = url.translate_connect_args(username="user", database="dbname")
    for key, value in url.query.items():
        kwargs[key] = value if isinstance(value, str) else value[-1]
    return kwargs


def _autocommit(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.autocommit = True


def _engine(url: sa.URL, **pooling: Any) -> sa.Engine:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", **pooling)
    # First, before SQLAlchemy's own first queries on a new connection.
    sa.event.listen(engine, "connect", _autocommit, insert=True)
    return engine


class Database:
    """Where the application's database is, and how we run SQL there."""

    def __init__(self, url: sa.URL, where: str) -> None:
        url = url.set(drivername="postgresql+psycopg2")
        self.where = where
        #: psycopg2.connect() arguments, for connections of their own.
        self.connect_kwargs = connect_kwargs(url)
        # Pinged before each use: a connection that a server restart closed
        # is replaced before a statement (notify(), a claim) fails on it.
        # A ping only after a rest would save a round trip, and let such a
        # statement fail in the second after a restart.
        self.pool = _engine(url, pool_size=2, max_overflow=4, pool_pre_ping=True)
        # For what runs rarely: a connection that is closed at once, so that
        # none is held for it in an idle process, nor by the many processes
        # of a fleet that start together.
        self.rare = _engine(url, poolclass=sa.pool.NullPool)
        # When a pooled connection was last given back (see release_idle()).
        self._returned = time.monotonic()
        self._pool_lock = threading.Lock()
        self._checkouts = 0  # under way, in connect()
        sa.event.listen(self.pool, "checkin", self._checked_in)

    def connect(self, rare: bool = False) -> sa.Connection:
        """A connection from the pool; for a rare task, one of its own
        unless the pool holds a connection that nobody uses right now."""
        pool = self.pool.pool
        use_pool = not rare or (isinstance(pool, sa.pool.QueuePool) and pool.checkedin())
        try:
            if not use_pool:
                return self.rare.connect()
            # While a checkout is under way, release_idle() leaves the pool.
            with self._pool_lock:
                self._checkouts += 1
            try:
                return self.pool.connect()
            finally:
                with self._pool_lock:
                    self._checkouts -= 1
        except sa.exc.DBAPIError as exc:
            raise cannot_connect(self.where, exc) from exc

    def run(
        self,
        statement: str,
        params: Any = None,
        rare: bool = False,
        failed: str = "the database refused",
    ) -> list[Any]:
        """Run one statement of ours (psycopg2 parameters), on its own, and
        return its rows. A refusal raises DBNotifyError("FAILED: why")."""
        try:
            with self.connect(rare) as conn:
                result = conn.exec_driver_sql(statement, params)
                return list(result.all()) if result.returns_rows else []
        except sa.exc.SQLAlchemyError as exc:
            raise refused(exc, failed) from exc

    def cursor(self, work: Callable[[Any], T], transaction: bool = False) -> T:
        """Run ``work(cursor)`` on a raw DB-API cursor of a connection of
        its own, closed after (DDL, status: rare, and maybe long): each
        statement on its own, or with ``transaction`` all in one
        transaction, committed when ``work`` returns."""
        try:
            conn = self.rare.raw_connection()
        except (psycopg2.Error, sa.exc.DBAPIError) as exc:
            raise cannot_connect(self.where, exc) from exc
        dbapi: Any = conn.driver_connection
        lost = False  # whether the server side closed the connection
        try:
            try:
                dbapi.autocommit = not transaction
                cur: Any = conn.cursor()
                try:
                    result = work(cur)
                finally:
                    cur.close()
                if transaction:
                    conn.commit()
                return result
            finally:
                lost = bool(dbapi.closed)  # before close() closes it for good
                try:
                    if not dbapi.closed:
                        conn.rollback()
                        dbapi.autocommit = True
                finally:
                    if dbapi.closed:
                        conn.invalidate()
                    conn.close()
        except (psycopg2.Error, sa.exc.DBAPIError) as exc:
            # pgbouncer 1.18 closes the connection without a word; others
            # may say why.
            if transaction and (
                "statement pooling" in reason(exc) or lost and self._statement_pooling()
            ):
                raise DBNotifyError(_STATEMENT_POOLING.format(where=self.where)) from exc
            raise refused(exc) from exc

    def _statement_pooling(self) -> bool:
        """Whether a single statement works where beginning a transaction
        just lost the connection: what a pooler in statement mode does."""
        try:
            self.run("SELECT 1")
        except DBNotifyError:
            return False
        return True

    def _checked_in(self, *args: Any) -> None:
        self._returned = time.monotonic()

    def release_idle(self, idle: float) -> None:
        """Close the pool's connections when none was used for ``idle``
        seconds. Cheap: called by the listener's reader on every round."""
        pool = self.pool.pool
        if not isinstance(pool, sa.pool.QueuePool) or not pool.checkedin():
            return
        if time.monotonic() - self._returned < idle or not self._pool_lock.acquire(False):
            return
        try:
            # No checkout can start meanwhile: none is left in the old pool
            # when the engine gets a new, empty one (with the same hooks).
            if not self._checkouts and not pool.checkedout():
                self.pool.dispose()
        finally:
            self._pool_lock.release()

    def after_fork(self) -> None:
        self.pool.dispose(close=False)

    def close(self) -> None:
        self.pool.dispose()
        self.rare.dispose()


def discard(conn: Any) -> None:
    """In a forked child: let go of a psycopg2 connection inherited from
    the parent without ending the parent's session. Closing it would send
    a Terminate message on the shared socket: the descriptor is pointed
    at /dev/null first, so whatever psycopg2 sends on close goes nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, conn.fileno())
        finally:
            os.close(devnull)
    except (OSError, psycopg2.Error):
        pass
    try:
        conn.close()
    except psycopg2.Error:
        pass


#: For the connections of our own that stay open (the journal reader, the
#: WAL leader's): a server that stops answering is noticed, as by the
#: listener's stream. The URL's own settings win.
LIVENESS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}


class Reader:
    """One connection of its own for a listener's journal reads, which are
    frequent and latency-bound: no pool checkout and no ping before each
    read (a pool's ping doubles the round trips). A read is a query only,
    so one that finds its connection lost (a server restart) runs again,
    once, on a new one. :meth:`release_idle` closes it when unused."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Any = None
        self._lock = threading.Lock()
        self._used = 0.0

    def run(self, statement: str, params: Any = None, failed: str = "cannot read") -> list[Any]:
        """The rows of one query (psycopg2 parameters); a refusal raises
        DBNotifyError("FAILED: why")."""
        with self._lock:
            for again in (False, True):
                conn = self._conn
                fresh = conn is None
                if fresh:
                    conn = self._open()
                try:
                    with conn.cursor() as cur:
                        cur.execute(statement, params)
                        rows: list[Any] = cur.fetchall() if cur.description else []
                    self._used = time.monotonic()
                    return rows
                except psycopg2.Error as exc:
                    lost = bool(conn.closed)
                    if lost:
                        self._close()
                    if not lost or fresh or again:
                        raise refused(exc, failed) from exc
            raise AssertionError("unreachable")  # pragma: no cover

    def _open(self) -> Any:
        try:
            settings = {**LIVENESS, "application_name": READER_NAME}
            conn = psycopg2.connect(**{**settings, **self.db.connect_kwargs})
        except psycopg2.Error as exc:
            raise cannot_connect(self.db.where, exc) from exc
        conn.autocommit = True
        self._conn = conn
        return conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg2.Error:
                pass

    def release_idle(self, idle: float) -> None:
        """Close the connection if unused for ``idle`` seconds and not in
        use now (cheap: called on every round of the listener's reader)."""
        if self._conn is None or time.monotonic() - self._used < idle:
            return
        if self._lock.acquire(False):
            try:
                self._close()
            finally:
                self._lock.release()

    def discard(self) -> None:
        """In a forked child: drop the parent's connection untouched."""
        conn, self._conn = self._conn, None
        if conn is not None:
            discard(conn)
