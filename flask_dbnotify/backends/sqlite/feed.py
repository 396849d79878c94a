"""What one listener has read of the journal (:class:`SQLiteFeed`), and
how its rows reach the dispatcher.

The reader thread only notices commits: it hands the dispatcher the span
of journal ids committed since it last looked (:class:`Span`), and the
dispatcher reads the rows and delivers them, a piece at a time, on a
connection of its own. The rows are read where they are decoded: two
threads reading and decoding at once would take turns with the GIL
(Python's sqlite3 gives it up for every row it steps) rather than work at
once, and the queue holds ids rather than rows, however far the
dispatcher falls behind.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..._items import Gap, Item
from ...errors import DBNotifyError
from ..base import Feed, Stream
from .connection import connect, write_transaction
from .ddl import julian
from .journal import COLUMNS
from .stream import SQLiteStream, abandon

if TYPE_CHECKING:
    from . import SQLiteBackend

log = logging.getLogger(__name__)

#: Journal rows read, decoded and delivered at a time.
PIECE = 256
#: The most journal ids one span holds: what a stop that cannot wait for
#: the dispatcher leaves to the run after it, at most.
SPAN = 5000


def _missing(after: int, upto: int) -> Gap:
    return Gap(
        f"journal rows after {after} up to {upto} were deleted before this listener "
        "read them (pruned while it was gone, or by hand)"
    )


class Span:
    """Journal ids after ``lo`` up to ``hi``, committed when the reader
    looked. The dispatcher moves ``lo`` past each piece it has delivered,
    so a stop rewinds to exactly there. ``epoch``: the feed's, when the
    span was made (a span of an earlier epoch is read again). ``size``:
    the ids it had then, what it counts for in the listener's queue."""

    __slots__ = ("lo", "hi", "epoch", "size")

    def __init__(self, lo: int, hi: int, epoch: int) -> None:
        self.lo, self.hi, self.epoch, self.size = lo, hi, epoch, hi - lo

    def __repr__(self) -> str:
        return f"Span({self.lo}, {self.hi})"


class SQLiteFeed(Feed):
    """One listener's position in the journal. It reads from the newest
    row when its first stream opens, and records how far it has read in
    ``dbnotify_listeners`` when pruning, so that rows nobody has read are
    kept."""

    def __init__(self, backend: SQLiteBackend) -> None:
        self.db = backend.db
        self.rows = backend.rows
        self.where = backend.where
        #: The last journal id handed to the dispatcher (None until the
        #: first stream opens). Moved under ``lock``, by the reader (on),
        #: and by the dispatcher (back: a stop, a failed read).
        self.position: int | None = None
        #: The last journal id the dispatcher has delivered: pruning keeps
        #: the rows after it, queued or not.
        self.delivered: int | None = None
        self.lock = threading.Lock()
        #: Moves when the dispatcher could not read a span: the spans
        #: queued before are skipped, and read again from ``position``.
        self.epoch = 0
        #: Why, set with the epoch: the reader's stream fails with it, so the
        #: listener reconnects as after any failed read (signals, backoff).
        self.failure: Exception | None = None
        self.name = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        #: The dispatcher's connection, and when it last read.
        self._conn: sqlite3.Connection | None = None
        self._conn_lock = threading.Lock()
        self._used = 0.0

    def open_stream(self, settings: Any) -> Stream:
        return SQLiteStream(self, settings)

    def spans(self, lo: int, hi: int) -> list[Span]:
        """The ids the reader found committed past ``position``, in spans
        of up to :data:`SPAN`; under ``lock``."""
        self.position = hi
        return [Span(at, min(at + SPAN, hi), self.epoch) for at in range(lo, hi, SPAN)]

    def received(self, raws: list[Any]) -> int:
        return sum(span.size for span in raws)

    def count(self, raw: Any) -> int:
        return int(raw.size)

    def decode(self, raw: Any) -> list[Item]:
        return [item for piece in self.pieces([raw]) for item in piece]

    def pieces(self, raws: list[Any]) -> Iterator[list[Item]]:
        """The events of the spans ``raws``, :data:`PIECE` rows at a time,
        read on the dispatcher's connection. A span's ``lo`` moves past a
        piece once the dispatcher asks for the next one (it has delivered
        this one). If the journal cannot be read, the position goes back to
        where delivery stopped, and the reader's stream fails (the listener
        reconnects and reads on from there). Rows missing from a span were
        deleted before this listener read them: a :class:`Gap` says so."""
        for span in raws:
            while span.lo < span.hi and span.epoch == self.epoch:
                try:
                    rows = self._read(span.lo, span.hi)
                    items = self._decode(rows)
                except (sqlite3.Error, DBNotifyError) as exc:
                    self._read_again(span.lo, exc)
                    return
                first = rows[0][0] if rows else span.hi + 1
                if first != span.lo + 1 or (rows and rows[-1][0] - first + 1 != len(rows)):
                    items.insert(0, _missing(span.lo, rows[-1][0] if rows else span.hi))
                yield items
                span.lo = rows[-1][0] if rows else span.hi
                self.delivered = span.lo

    def _decode(self, rows: list[Any]) -> list[Item]:
        """The events of ``rows``; a row that fails to decode for a reason
        the decoder does not expect is logged and skipped, the others are
        kept. A failure of the database itself is raised."""
        try:
            return self.rows.decode_many(rows)
        except (sqlite3.Error, DBNotifyError):
            raise
        except Exception:  # noqa: BLE001 - find the one, keep the rest
            items: list[Item] = []
            for row in rows:
                try:
                    items += self.rows.decode_many([row])
                except (sqlite3.Error, DBNotifyError):
                    raise
                except Exception:  # noqa: BLE001 - the listener goes on
                    log.exception("skipped journal row %s", row[0])
            return items

    def _read(self, lo: int, hi: int) -> list[Any]:
        with self._conn_lock:
            if self._conn is None:
                self._conn = connect(self.db.path)
            self._used = time.monotonic()
            return self._conn.execute(
                f"SELECT {COLUMNS} FROM dbnotify_journal WHERE id > ? AND id <= ? "
                "ORDER BY id LIMIT ?",
                (lo, hi, PIECE),
            ).fetchall()

    def _read_again(self, after: int, failure: Exception) -> None:
        with self.lock:
            self.epoch += 1
            self.failure = failure
            self.position = after if self.position is None else min(self.position, after)
        self.release_idle(0.0)

    def rewind(self, raw: list[Any]) -> None:
        with self.lock:
            # Spans of an earlier epoch were, or will be, read again.
            current = [span.lo for span in raw if span.epoch == self.epoch]
            if current:
                # Only ever back: an interrupted span comes before the queued ones.
                first = min(current)
                self.position = first if self.position is None else min(self.position, first)

    def recreated(self) -> None:
        """The journal was dropped and made anew, its ids restarted: what
        was queued of the old one is skipped. Under ``lock``."""
        self.epoch += 1
        self.position = self.delivered = 0

    def release_idle(self, idle: float) -> None:
        # Not while the dispatcher reads: it closes its own when it ends.
        if self._conn is None or not self._conn_lock.acquire(blocking=False):
            return
        try:
            if self._conn is not None and time.monotonic() - self._used >= idle:
                self._conn.close()
                self._conn = None
        finally:
            self._conn_lock.release()

    def close(self) -> None:
        self.release_idle(0.0)

    def discard(self) -> None:
        # The parent's connection, in a forked child: never touched again.
        if self._conn is not None:
            abandon(self._conn)
            self._conn = None
        self._conn_lock = threading.Lock()
        self.lock = threading.Lock()

    def prune(self, retention: float) -> None:
        """Record how far this listener has read, then delete journal rows
        older than ``retention`` that every live listener has read."""
        now = time.time()
        position, delivered = self.position, self.delivered
        if position is not None and delivered is not None:
            position = min(position, delivered)

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA busy_timeout = 1000")  # housekeeping can wait
            with write_transaction(conn):
                if position is not None:
                    conn.execute(
                        "INSERT INTO dbnotify_listeners (name, position, seen_at) VALUES (?, ?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET position = excluded.position, "
                        "seen_at = excluded.seen_at",
                        (self.name, position, now),
                    )
                # A listener silent for this long is gone.
                conn.execute(
                    "DELETE FROM dbnotify_listeners WHERE seen_at < ?",
                    (now - max(retention, 600.0),),
                )
                conn.execute(
                    "DELETE FROM dbnotify_claims WHERE state = 'done' AND claimed_at < ?",
                    (now - retention,),
                )
                # Old rows every live listener has read, that no once
                # receiver still has to claim, and that no claim still
                # needs (failed ones are kept for inspection).
                conn.execute(
                    "DELETE FROM dbnotify_journal WHERE created_at < ? AND id <= coalesce("
                    "(SELECT min(position) FROM dbnotify_listeners), "
                    "(SELECT max(id) FROM dbnotify_journal)) "
                    "AND id <= coalesce((SELECT min(id) FROM dbnotify_receivers), id) "
                    "AND NOT EXISTS (SELECT 1 FROM dbnotify_claims AS c "
                    "  WHERE c.event_id = dbnotify_journal.id AND c.state <> 'done')",
                    (julian(now - retention),),
                )

        self.db.with_connection(work)
