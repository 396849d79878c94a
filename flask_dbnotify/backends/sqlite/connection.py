"""Every statement the SQLite backend runs goes through :class:`Database`
(but the listener's poll loop, which keeps its connection, and
``notify(connection=...)``, which runs on the caller's): a connection of
its own per task, opened on the file (never creating it,
except to install), closed after, with one translation of errors."""

from __future__ import annotations

import contextlib
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ...errors import DBNotifyError

T = TypeVar("T")
#: How long a statement waits for another connection's write lock.
BUSY_MS = 30000


def connect(path: str, create: bool = False) -> sqlite3.Connection:
    """An autocommit connection: nothing here holds a read transaction
    open between polls. ``mode=rw`` unless installing: a mistyped path is
    an error, not a new empty database."""
    conn = sqlite3.connect(
        f"file:{urllib.parse.quote(path)}?mode={'rwc' if create else 'rw'}",
        uri=True,
        timeout=BUSY_MS / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
    return conn


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE (take the write lock now, not halfway through) and
    commit, or roll back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def in_one_snapshot(
    work: Callable[[sqlite3.Connection], T],
) -> Callable[[sqlite3.Connection], T]:
    """``work`` run in a read transaction: one snapshot for all it reads."""

    def run(conn: sqlite3.Connection) -> T:
        conn.execute("BEGIN")
        try:
            return work(conn)
        finally:
            conn.execute("COMMIT")

    return run


class Database:
    """The database file, and how we run SQL on it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def with_connection(self, work: Callable[[sqlite3.Connection], T], create: bool = False) -> T:
        """Run ``work(connection)`` on a connection of its own, closed after."""
        try:
            conn = connect(self.path, create)
        except sqlite3.Error as exc:
            raise DBNotifyError(
                f"cannot open {self.path}: {exc}; check that its folder exists and is writable"
            ) from exc
        try:
            return work(conn)
        except sqlite3.OperationalError as exc:
            if "no such table: dbnotify_" in str(exc):
                raise DBNotifyError(f"{exc}: run `flask dbnotify install-triggers`") from exc
            raise DBNotifyError(f"the database refused: {exc}") from exc
        except sqlite3.Error as exc:
            raise DBNotifyError(f"the database refused: {exc}") from exc
        finally:
            conn.close()

    def run(self, statement: str, params: Any = ()) -> list[Any]:
        """Run one statement (a write commits at once) and return its rows."""
        return self.with_connection(lambda conn: conn.execute(statement, params).fetchall())
