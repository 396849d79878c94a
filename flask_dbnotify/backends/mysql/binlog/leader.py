"""The leader: the one process of the app that follows the binary log.

Every process of the app runs a :class:`Leader` thread next to its
listener. Each tries to take the server's named lock of the app's
database (``GET_LOCK``); one holds it, and follows the binary log from
the position recorded in ``dbnotify_binlog``, relaying each committed
transaction into the journal (:mod:`.relay`). The others try again every
:data:`RETRY` seconds; when the leader dies its session ends, its lock
with it, and another process goes on from the recorded position.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

import pymysql

from ...._log import RateLimited
from ..catalog import qualified
from ..connection import Database, connect_args, drop_inherited, reason
from ..ddl import NOW
from .events import Dump
from .relay import Relay
from .values import Decoder, codec_for

log = logging.getLogger(__name__)
_limited = RateLimited(log, interval=60.0)

#: What the server says when the log asked for is not there (purged).
LOG_GONE = 1236
#: How often a process that does not lead tries to.
RETRY = 1.0
#: The server sends a heartbeat this often (seconds) when the log is
#: quiet: a leader that hears nothing for five of them reconnects.
HEARTBEAT = 1.0


def lock_name(database: str) -> str:
    """The named lock of an app's leader (server-wide, at most 64 characters)."""
    return f"dbnotify:{database}"[:64]


def unusable(cur: Any) -> str | None:
    """Why the server's binary log cannot be followed, or None."""
    cur.execute("SELECT @@version")
    if "mariadb" not in str(cur.fetchone()[0]).lower():
        return "binary-log capture is made for MariaDB (10.5 and later); MySQL uses triggers"
    cur.execute(
        "SELECT @@log_bin, @@binlog_format, @@binlog_row_image, @@binlog_row_metadata, "
        "@@log_bin_compress"
    )
    log_bin, fmt, image, metadata, compress = cur.fetchone()
    wrong = [
        f"{name} is {value} (needs {needed})"
        for name, value, needed in (
            ("log_bin", "ON" if log_bin else "OFF", "ON"),
            ("binlog_format", fmt, "ROW"),
            ("binlog_row_image", image, "FULL"),
            ("binlog_row_metadata", metadata, "FULL"),
            ("log_bin_compress", "ON" if compress else "OFF", "OFF"),
        )
        if str(value).upper() != needed
    ]
    return "; ".join(wrong) or None


def start_position(db: Database) -> None:
    """Record the end of the binary log as where to begin, unless a
    position is recorded: what commits after this is relayed."""
    table = qualified(db.database, "dbnotify_binlog")

    def work(conn: pymysql.Connection[Any]) -> None:
        with conn.cursor() as cur:
            cur.execute(f"SELECT file FROM {table} WHERE name = 'position'")
            row = cur.fetchone()
            if row is not None and row[0]:
                return
            cur.execute("SHOW MASTER STATUS")
            status = cur.fetchone()
            if status is None:
                return  # no binary log: nothing to follow
            cur.execute(
                f"INSERT INTO {table} (name, file, position, updated_at) "
                "VALUES ('position', %s, %s, 0) ON DUPLICATE KEY UPDATE "
                # Only where none is recorded (position first: the
                # assignments see the row as the earlier ones left it).
                "position = IF(file = '', VALUES(position), position), "
                "file = IF(file = '', VALUES(file), file)",
                (status[0], status[1]),
            )

    db.with_connection(work)


class Leader:
    """Leads when it can; one per app in each process."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: list[Any] = []

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"dbnotify-binlog[{self.db.database}]", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for conn in list(self._conns):
            # Unblock a read of the log: the thread ends at once.
            with contextlib.suppress(Exception):
                conn._sock.shutdown(2)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def discard(self) -> None:
        """In a forked child: the parent's thread is not here. Its sockets'
        copies are closed, never shut down: the parent's sessions go on,
        and end (the lock with them) when the parent dies."""
        for conn in self._conns:
            drop_inherited(conn)
        self._conns = []
        self._thread = None
        self.leading = False

    def _run(self) -> None:
        stop = self._stop
        while not stop.is_set():
            try:
                self._lead(stop)
            except Exception as exc:  # noqa: BLE001 - try again
                if not stop.is_set():
                    _limited.warning("cannot follow the binary log: %s", reason(exc))
            finally:
                self.leading = False
                for conn in self._conns:
                    with contextlib.suppress(Exception):
                        conn.close()
                self._conns = []
            stop.wait(RETRY)

    def _lead(self, stop: threading.Event) -> None:
        lock = self.db.connect()
        self._conns.append(lock)
        with lock.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (lock_name(self.db.database),))
            if cur.fetchone()[0] != 1:
                return
            why = unusable(cur)
            if why is not None:
                _limited.warning("cannot follow the binary log: %s", why)
                return
            cur.execute(
                "SELECT ID, CHARACTER_SET_NAME FROM information_schema.COLLATIONS "
                "WHERE ID IS NOT NULL AND CHARACTER_SET_NAME IS NOT NULL"
            )
            charsets = {int(i): codec_for(name) for i, name in cur.fetchall()}
        writer = self.db.connect()
        self._conns.append(writer)
        with writer.cursor() as cur, contextlib.suppress(pymysql.MySQLError):
            # Our own journal rows need not be in the log (a privilege).
            cur.execute("SET SESSION sql_log_bin = 0")
        start_position(self.db)
        with writer.cursor() as cur:
            cur.execute(
                "SELECT file, position FROM "
                f"{qualified(self.db.database, 'dbnotify_binlog')} WHERE name = 'position'"
            )
            file, position = cur.fetchone()
        relay = Relay(self.db, Decoder(charsets), writer, (file, position))
        dump = Dump(connect_args(self.db.url, self.db.timeout), file, position, HEARTBEAT)
        self._conns.append(dump.conn)
        self.leading = True
        log.info("following the binary log from %s:%s", file, position)
        checked = time.monotonic()
        try:
            for event in dump.events():
                if stop.is_set():
                    return
                if time.monotonic() - checked >= HEARTBEAT:
                    # The lock lives as long as its session: if that ended,
                    # another process may lead now, and this one must not.
                    lock.ping(reconnect=False)
                    checked = time.monotonic()
                relay.handle(event, dump)
        except pymysql.MySQLError as exc:
            if not exc.args or exc.args[0] != LOG_GONE:
                raise
            self._lost(writer, relay.at, reason(exc))

    def _lost(self, writer: Any, at: tuple[str, int], why: str) -> None:
        """The log from where the relay stands is gone (purged): go on from
        its end, and tell every listener that changes were missed."""
        where = f"{at[0]}:{at[1]}"
        log.error("the binary log from %s is gone (%s): changes were missed", where, why)
        text = json.dumps({"v": 1, "gap": f"the binary log from {where} was purged: {why}"})
        table = qualified(self.db.database, "dbnotify_binlog")
        writer.begin()
        with writer.cursor() as cur:
            cur.execute(
                f"INSERT INTO {qualified(self.db.database, 'dbnotify_journal')} "
                f"(created_at, body) VALUES ({NOW}, %s)",
                (text,),
            )
            cur.execute(
                f"UPDATE {table} SET file = '' WHERE name = 'position' AND file = %s "
                "AND position = %s",
                at,
            )
        writer.commit()
        start_position(self.db)
