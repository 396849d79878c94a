"""The claims of exactly-once receivers, on MySQL.

Journal ids do not follow commit order (see :mod:`.sequence`), so each
process scanning for a receiver keeps the ids it has seen and the holes
below, as a listener does, and reads both; claims (a primary key) make
sure one process runs each event however often it is read. A
receiver's watermark moves only up to where every id is seen or given up:
a restart reads again from there, and skips what was claimed."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from ..._items import Item, Notification
from ..._payload import message_prefix
from ...events import ChangeEvent
from ..base import Claimable, OnceStore
from ..shaped import Rows
from .catalog import qualified
from .connection import Database
from .sequence import Seen


class MySQLOnceStore(OnceStore):
    def __init__(self, db: Database, rows: Rows) -> None:
        self.db = db
        self.rows = rows
        self.t = {
            name: qualified(db.database, f"dbnotify_{name}")
            for name in ("journal", "shapes", "receivers", "claims")
        }
        #: Per receiver: ids seen and holes, from its watermark on.
        self._seen: dict[str, Seen] = {}
        self._lock = threading.Lock()

    def register(self, receivers: Sequence[str]) -> None:
        for receiver in receivers:
            self.db.run(
                "INSERT IGNORE INTO {receivers} (receiver, id) "
                "SELECT %s, coalesce(max(id), 0) FROM {journal}".format(**self.t),
                (receiver,),
            )

    def scan(
        self, receiver: str, watches: Sequence[str], limit: int
    ) -> tuple[list[ChangeEvent], Any]:
        marks = ", ".join(["%s"] * len(watches)) or "NULL"
        wanted = f"shape IN (SELECT name FROM {self.t['shapes']} WHERE watch IN ({marks}))"
        items, cursor = self._scan(receiver, wanted, list(watches), limit)
        return [e for e in items if isinstance(e, ChangeEvent)], cursor

    def scan_messages(
        self, receiver: str, channel: str, limit: int
    ) -> tuple[list[Notification], Any]:
        prefix = message_prefix(channel)
        wanted = "shape IS NULL AND LEFT(body, CHAR_LENGTH(%s)) = %s"
        items, cursor = self._scan(receiver, wanted, [prefix, prefix], limit)
        return [n for n in items if isinstance(n, Notification) and n.channel == channel], cursor

    def _scan(
        self, receiver: str, wanted: str, params: list[Any], limit: int
    ) -> tuple[list[Item], Any]:
        """Rows past what this process has seen for ``receiver`` (and in
        its holes): those matching ``wanted`` (our SQL, values in
        ``params``) and not claimed yet, decoded; the cursor is the
        watermark's new place. Every row is read (its id), so that holes
        are known whatever table filled them."""
        with self._lock:
            seen = self._seen.get(receiver)
        if seen is None:
            mark = self.db.run(
                f"SELECT id FROM {self.t['receivers']} WHERE receiver = %s", (receiver,)
            )
            if not mark:
                return [], None
            seen = Seen(int(mark[0][0]))
        clause, at = seen.where()
        rows = self.db.run(
            "SELECT id, created_at, shape, IF(({wanted}) AND NOT EXISTS (SELECT 1 FROM {claims} c "
            "  WHERE c.receiver = %s AND c.event_id = j.id), body, NULL) "
            "FROM {journal} AS j WHERE {clause} ORDER BY id LIMIT %s".format(
                wanted=wanted, clause=clause, **self.t
            ),
            (*params, receiver, *at, limit),
        )
        now = time.monotonic()
        seen.saw([row[0] for row in rows], now)
        seen.expire(now)
        with self._lock:
            self._seen[receiver] = seen
        return self.rows.decode_many([row for row in rows if row[3] is not None]), seen.floor

    def claim(self, receiver: str, ids: Sequence[int], worker: str) -> set[int]:
        if not ids:
            return set()
        now = time.time()

        rows = [(receiver, event_id, worker, now) for event_id in ids]
        marks = ", ".join(["%s"] * len(ids))

        def work(cur: Any) -> set[int]:
            # A claim another process made first is left alone (IGNORE):
            # ours are those with our name and time.
            cur.executemany(
                f"INSERT IGNORE INTO {self.t['claims']} "
                "(receiver, event_id, claimed_by, claimed_at) VALUES (%s, %s, %s, %s)",
                rows,
            )
            cur.execute(
                f"SELECT event_id FROM {self.t['claims']} WHERE receiver = %s "
                f"AND claimed_by = %s AND claimed_at = %s AND event_id IN ({marks})",
                (receiver, worker, now, *ids),
            )
            return {int(row[0]) for row in cur.fetchall()}

        return self.db.transaction(work)

    def advance(self, receiver: str, cursor: Any) -> None:
        if cursor is not None:
            self.db.run(
                f"UPDATE {self.t['receivers']} SET id = %s WHERE receiver = %s AND id < %s",
                (cursor, receiver, cursor),
            )

    def finish(
        self, receiver: str, event_id: int, error: str | None, retry_in: float | None
    ) -> None:
        state = "done" if error is None else ("retry" if retry_in is not None else "failed")
        self.db.run(
            f"UPDATE {self.t['claims']} SET state = %s, last_error = %s, claimed_by = NULL, "
            "next_attempt_at = %s WHERE receiver = %s AND event_id = %s",
            (state, error, time.time() + (retry_in or 0), receiver, event_id),
        )

    def release(self, receiver: str, ids: Sequence[int]) -> None:
        if ids:
            marks = ", ".join(["%s"] * len(ids))
            self.db.run(
                f"UPDATE {self.t['claims']} SET state = 'retry', attempts = attempts - 1, "
                "claimed_by = NULL, next_attempt_at = %s WHERE receiver = %s "
                f"AND event_id IN ({marks}) AND state = 'running'",
                (time.time(), receiver, *ids),
            )

    def reset(self, receiver: str, event_id: int, worker: str) -> None:
        self.db.run(
            f"INSERT INTO {self.t['claims']} (receiver, event_id, claimed_by, claimed_at) "
            "VALUES (%s, %s, %s, %s) ON DUPLICATE KEY UPDATE state = 'running', attempts = 1, "
            "claimed_by = VALUES(claimed_by), claimed_at = VALUES(claimed_at), last_error = NULL",
            (receiver, event_id, worker, time.time()),
        )

    def forget(self, receiver: str) -> None:
        self.db.run(f"DELETE FROM {self.t['claims']} WHERE receiver = %s", (receiver,))
        self.db.run(f"DELETE FROM {self.t['receivers']} WHERE receiver = %s", (receiver,))
        with self._lock:
            self._seen.pop(receiver, None)

    def due(
        self, receiver: str, worker: str, lease: float, limit: int
    ) -> list[tuple[int, int, Claimable | None]]:
        now = time.time()

        def take(cur: Any) -> list[tuple[int, int]]:
            cur.execute(
                f"SELECT event_id FROM {self.t['claims']} WHERE receiver = %s AND "
                "((state = 'retry' AND next_attempt_at <= %s) OR "
                "(state = 'running' AND claimed_at < %s)) ORDER BY event_id LIMIT %s FOR UPDATE",
                (receiver, now, now - lease, limit),
            )
            ids = [row[0] for row in cur.fetchall()]
            if not ids:
                return []
            marks = ", ".join(["%s"] * len(ids))
            cur.execute(
                f"UPDATE {self.t['claims']} SET state = 'running', attempts = attempts + 1, "
                f"claimed_by = %s, claimed_at = %s WHERE receiver = %s AND event_id IN ({marks})",
                (worker, now, receiver, *ids),
            )
            cur.execute(
                f"SELECT event_id, attempts FROM {self.t['claims']} "
                f"WHERE receiver = %s AND event_id IN ({marks}) ORDER BY event_id",
                (receiver, *ids),
            )
            return [(int(a), int(b)) for a, b in cur.fetchall()]

        taken = self.db.transaction(take)
        if not taken:
            return []
        marks = ", ".join(["%s"] * len(taken))
        found = self.db.run(
            f"SELECT id, created_at, shape, body FROM {self.t['journal']} WHERE id IN ({marks})",
            [event_id for event_id, _ in taken],
        )
        raw_by_id = {raw[0]: raw for raw in found}
        return [
            (event_id, attempts, self.rows.item(raw_by_id.get(event_id)))
            for event_id, attempts in taken
        ]
