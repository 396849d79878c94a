"""The listener's poll loop: reads the journal past what it has seen, and
the holes below (see :mod:`.sequence`). MySQL cannot wake a client when
another session commits, so the stream polls, adaptively: every
millisecond just after rows came, slowing down to
``DBNOTIFY_POLL_INTERVAL`` over an idle stretch, so that a busy listener
hears within a few milliseconds and an idle one costs next to nothing."""

from __future__ import annotations

import contextlib
import select
import time
from typing import TYPE_CHECKING, Any

import pymysql

from ..base import Stream
from .catalog import qualified
from .connection import NO_SUCH_TABLE, connect_args, drop_inherited, refused

if TYPE_CHECKING:
    from .feed import MySQLFeed

#: Journal rows read at a time.
BATCH = 5000
#: The shortest wait between polls, and how fast it grows with idleness:
#: an eighth of the time since rows last came.
_FASTEST = 0.001
_SLOWING = 8
#: Seconds a read of the journal may take before the server is taken for
#: gone: far more than a batch needs, far less than TCP's own timeouts.
_ANSWER_WITHIN = 15


class MySQLStream(Stream):
    """Reads the journal rows committed since the last read: the
    dispatcher decodes them."""

    def __init__(self, feed: MySQLFeed, settings: Any) -> None:
        self.feed = feed
        self.poll_interval = settings.poll_interval
        args = connect_args(feed.db.url, settings.connect_timeout)
        # A poll answers in milliseconds: a server that does not answer
        # for this long is taken for gone (a half-open connection).
        wait = max(_ANSWER_WITHIN, int(settings.connect_timeout))
        args.update(read_timeout=wait, write_timeout=wait)
        try:
            self.conn = pymysql.connect(**args)
        except pymysql.MySQLError as exc:
            from .connection import cannot_connect

            raise cannot_connect(feed.where, exc) from exc
        self.journal = qualified(feed.db.database, "dbnotify_journal")
        try:
            feed.opened(self)
        except BaseException:
            self.conn.close()
            raise
        self.last_rows = time.monotonic()
        #: The last read found nothing.
        self.idle = True

    def query(self, statement: str, params: Any = None) -> list[Any]:
        """Rows of ``statement`` on this stream's connection; none while
        our tables are not installed."""
        try:
            with self.conn.cursor() as cur:
                cur.execute(statement, params)
                return list(cur.fetchall())
        except pymysql.MySQLError as exc:
            if exc.args and exc.args[0] == NO_SUCH_TABLE:
                return []
            if isinstance(exc, pymysql.OperationalError):
                raise  # the connection: the listener reconnects
            raise refused(exc) from exc

    def wait(self, timeout: float, wake_fd: int) -> None:
        idle = time.monotonic() - self.last_rows
        delay = min(timeout, self.poll_interval, max(_FASTEST, idle / _SLOWING))
        select.select([wake_fd], [], [], delay)

    def read(self) -> list[Any]:
        feed = self.feed
        with feed.lock:
            clause, params = feed.seen.where()
            holes, top = bool(feed.seen.holes), feed.seen.top
        if self.idle and not holes:
            # Nothing came last time: look before reading (one column, not
            # four: a poll of an idle listener costs half as much).
            newest = self.query(f"SELECT max(id) FROM {self.journal}")
            newest_id = newest[0][0] if newest else None
            feed.check_top(newest_id)
            if newest_id is None or newest_id <= top:
                return []
        rows = self.query(
            f"SELECT id, created_at, shape, body FROM {self.journal} WHERE {clause} "
            f"ORDER BY id LIMIT {BATCH}",
            params,
        )
        now = time.monotonic()
        with feed.lock:
            feed.seen.saw([row[0] for row in rows], now)
            feed.seen.expire(now)
        self.idle = not rows
        if rows:
            self.last_rows = now
        return rows

    def probe(self) -> None:
        self.query("SELECT 1")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    def discard(self) -> None:
        # The parent's session, in a forked child: never touched again.
        drop_inherited(self.conn)
