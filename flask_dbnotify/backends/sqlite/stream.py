"""The listener's poll loop: reads the journal past the feed's position
whenever ``PRAGMA data_version`` says another connection committed; on
Linux it sleeps on inotify and wakes the moment the database or its WAL is
written, so it is fast and idle at once."""

from __future__ import annotations

import logging
import os
import select
import sqlite3
import time
from typing import TYPE_CHECKING, Any

from ...errors import DBNotifyError
from .._inotify import open_watch
from ..base import Stream
from .connection import connect

if TYPE_CHECKING:
    from .feed import SQLiteFeed

log = logging.getLogger(__name__)

#: How long after a wake-up without news the stream keeps looking: a WAL
#: write wakes us just before the commit becomes visible.
_SETTLE = 0.05
_abandoned: list[sqlite3.Connection] = []


def abandon(conn: sqlite3.Connection) -> None:
    """Keep ``conn`` referenced, never touched again: SQLite forbids using a
    connection across fork(), closing included."""
    _abandoned.append(conn)


class SQLiteStream(Stream):
    """Finds the journal ids committed past the feed's position, whenever
    another connection committed; the dispatcher reads their rows (see
    :mod:`.feed`)."""

    def __init__(self, feed: SQLiteFeed, settings: Any) -> None:
        self.feed = feed
        self.poll_interval = settings.poll_interval
        if not os.path.exists(feed.db.path):
            raise DBNotifyError(
                f"cannot open {feed.where}: it does not exist; create the database "
                "(`flask dbnotify install-triggers` creates the file) or fix the path in the URL"
            )
        self.conn = connect(feed.db.path)
        try:
            self.conn.execute("PRAGMA journal_mode = WAL")
            with feed.lock:
                # A new stream reads on from the position: an earlier
                # stream's failure is moot.
                feed.failure = None
                if feed.position is None:
                    feed.position = feed.delivered = self._last_id()
            self.version: int | None = None
            self.watch = open_watch(os.path.dirname(feed.db.path))
        except BaseException:
            self.conn.close()
            raise
        self.settle_until = 0.0

    def _last_id(self) -> int:
        try:
            row = self.conn.execute("SELECT max(id) FROM dbnotify_journal").fetchone()
        except sqlite3.OperationalError:
            return 0  # Not installed yet; every row will be new.
        return int(row[0] or 0)

    def wait(self, timeout: float, wake_fd: int) -> None:
        if self.feed.failure is not None:
            return
        now = time.monotonic()
        if now < self.settle_until:
            timeout = min(timeout, 0.001)
        elif self.watch is None:
            timeout = min(timeout, self.poll_interval)
        fds: list[Any] = [wake_fd]
        if self.watch is not None:
            fds.append(self.watch)
            # A missed wake-up costs at most this long.
            timeout = min(timeout, max(self.poll_interval, 0.25))
        ready = select.select(fds, [], [], timeout)[0]
        if self.watch is not None and self.watch in ready:
            self.watch.drain()
            self.settle_until = time.monotonic() + _SETTLE

    def read(self) -> list[Any]:
        feed = self.feed
        failure = feed.failure
        if failure is not None:
            # The dispatcher could not read what this stream found.
            feed.failure = None
            raise failure
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self.version:
            return []
        self.version = version
        with feed.lock:
            try:
                position = feed.position or 0
                last = self.conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'dbnotify_journal'"
                ).fetchone()
                if last is not None and last[0] < position:
                    # The journal was dropped and made anew: its ids restarted.
                    log.info("the journal was recreated; reading it from the start")
                    feed.recreated()
                    position = 0
                top = self.conn.execute("SELECT max(id) FROM dbnotify_journal").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise
            if top is None or top <= position:
                return []
            self.settle_until = 0.0
            return feed.spans(position, top)

    def probe(self) -> None:
        self.conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        self.conn.close()

    def discard(self) -> None:
        abandon(self.conn)
        if self.watch is not None:
            self.watch.close()
