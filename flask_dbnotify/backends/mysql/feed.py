"""What one listener has seen of the journal (:class:`MySQLFeed`): ids
and holes (:class:`~.sequence.Seen`), rows back into events, and pruning."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from ..._items import Item
from ..base import Feed, Stream
from .catalog import qualified
from .sequence import Seen
from .stream import MySQLStream

if TYPE_CHECKING:
    from . import MySQLBackend

log = logging.getLogger(__name__)

#: When a listener first opens, the ids this far below the newest that
#: are missing are taken for transactions still open: their rows, when
#: they commit, are delivered.
_OPEN_WINDOW = 10000


class MySQLFeed(Feed):
    """One listener's position in the journal: it reads from the newest
    row when its first stream opens, and records how far it has read in
    ``dbnotify_listeners`` when pruning, so that rows it has not read are
    kept."""

    def __init__(self, backend: MySQLBackend) -> None:
        self.db = backend.db
        self.rows = backend.rows
        self.where = backend.where
        self.lock = threading.Lock()
        self.seen = Seen(0)
        self.started = False
        self.name = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"

    def open_stream(self, settings: Any) -> Stream:
        return MySQLStream(self, settings)

    def opened(self, stream: MySQLStream) -> None:
        """A stream opened: the first one finds where to begin."""
        if self.started:
            return
        top = stream.query(f"SELECT coalesce(max(id), 0) FROM {stream.journal}")
        newest = int(top[0][0]) if top else 0
        start = max(0, newest - _OPEN_WINDOW)
        ids = stream.query(f"SELECT id FROM {stream.journal} WHERE id > %s ORDER BY id", (start,))
        seen = Seen(start)
        seen.saw([row[0] for row in ids], time.monotonic())
        if seen.top < newest:
            seen.top = newest
        with self.lock:
            self.seen, self.started = seen, True

    def check_top(self, top: int | None) -> None:
        """The journal's newest id now: below what was seen, the journal was
        made anew (ids restarted), and is read from its start."""
        with self.lock:
            if top is not None and top < self.seen.top:
                log.info("the journal was recreated; reading it from the start")
                self.seen = Seen(0)

    def decode(self, raw: Any) -> list[Item]:
        return self.decode_many([raw])

    def decode_many(self, raws: list[Any]) -> list[Item]:
        items: list[Item] = self.rows.decode_many(raws)
        return items

    def rewind(self, raw: list[Any]) -> None:
        with self.lock:
            self.seen.again([row[0] for row in raw], time.monotonic())

    def discard(self) -> None:
        self.lock = threading.Lock()

    def prune(self, retention: float) -> None:
        """Record how far this listener has read, then delete journal rows
        older than ``retention`` that every live listener has read."""
        now = time.time()
        with self.lock:
            position = self.seen.floor if self.started else None
        names = {
            name: qualified(self.db.database, f"dbnotify_{name}")
            for name in ("journal", "listeners", "receivers", "claims")
        }

        def work(cur: Any) -> None:
            if position is not None:
                cur.execute(
                    f"INSERT INTO {names['listeners']} (name, position, seen_at) "
                    "VALUES (%s, %s, %s) ON DUPLICATE KEY UPDATE "
                    "position = VALUES(position), seen_at = VALUES(seen_at)",
                    (self.name, position, now),
                )
            # A listener silent for this long is gone.
            cur.execute(
                f"DELETE FROM {names['listeners']} WHERE seen_at < %s",
                (now - max(retention, 600.0),),
            )
            cur.execute(
                f"DELETE FROM {names['claims']} WHERE state = 'done' AND claimed_at < %s",
                (now - retention,),
            )
            # Old rows every live listener has read, that no once receiver
            # still has to claim, and that no claim still needs (failed
            # ones are kept for inspection).
            cur.execute(
                "SELECT coalesce(least(coalesce((SELECT min(position) FROM {listeners}), "
                "~0), coalesce((SELECT min(id) FROM {receivers}), ~0)), 0)".format(**names)
            )
            upto = cur.fetchone()[0]
            # The newest row is always kept: the journal's newest id never
            # goes down but when the journal is made anew, which is how a
            # listener knows that it was.
            cur.execute("SELECT coalesce(max(id), 0) FROM {journal}".format(**names))
            upto = min(upto, cur.fetchone()[0] - 1)
            cur.execute(
                "DELETE FROM {journal} WHERE created_at < %s AND id <= %s "
                "AND NOT EXISTS (SELECT 1 FROM {claims} AS c "
                "  WHERE c.event_id = {journal}.id AND c.state <> 'done')".format(**names),
                (now - retention, upto),
            )

        self.db.transaction(work)
