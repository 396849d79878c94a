"""The claims of exactly-once receivers, on SQLite. Writers are
serialised, so journal ids follow commit order: whatever is visible below
the newest id is all there will ever be."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ..._items import Item, Notification
from ..._payload import message_prefix
from ...events import ChangeEvent
from ..base import Claimable, OnceStore
from ..shaped import Rows
from .connection import Database, in_one_snapshot
from .journal import COLUMNS


class SQLiteOnceStore(OnceStore):
    def __init__(self, db: Database, rows: Rows) -> None:
        self.db = db
        self.rows = rows

    def register(self, receivers: Sequence[str]) -> None:
        self.db.run(
            "INSERT OR IGNORE INTO dbnotify_receivers (receiver, id) "
            "SELECT value, coalesce((SELECT max(id) FROM dbnotify_journal), 0) "
            "FROM json_each(?)",
            (json.dumps(list(receivers)),),
        )

    def scan(
        self, receiver: str, watches: Sequence[str], limit: int
    ) -> tuple[list[ChangeEvent], Any]:
        where = (
            "shape IN (SELECT key FROM dbnotify_shapes "
            "  WHERE json_extract(header, '$.t') IN (SELECT value FROM json_each(?)))"
        )
        items, cursor = self._scan(receiver, where, (json.dumps(list(watches)),), limit)
        return [e for e in items if isinstance(e, ChangeEvent)], cursor

    def scan_messages(
        self, receiver: str, channel: str, limit: int
    ) -> tuple[list[Notification], Any]:
        where = "shape IS NULL AND substr(body, 1, length(?)) = ?"
        prefix = message_prefix(channel)
        items, cursor = self._scan(receiver, where, (prefix, prefix), limit)
        return [n for n in items if isinstance(n, Notification) and n.channel == channel], cursor

    def _scan(
        self, receiver: str, where: str, params: tuple[Any, ...], limit: int
    ) -> tuple[list[Item], Any]:
        """Journal rows matching ``where`` (our SQL, values in ``params``)
        past the receiver's watermark, decoded, and the cursor."""

        def scan(conn: sqlite3.Connection) -> tuple[list[Any], Any]:
            mark = conn.execute(
                "SELECT id FROM dbnotify_receivers WHERE receiver = ?", (receiver,)
            ).fetchone()
            if mark is None:
                return [], None
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM dbnotify_journal WHERE id > ? AND ({where}) "
                "ORDER BY id LIMIT ?",
                (mark[0], *params, limit),
            ).fetchall()
            if len(rows) == limit:
                return rows, rows[-1][0]
            last = conn.execute("SELECT max(id) FROM dbnotify_journal").fetchone()[0]
            return rows, last

        rows, cursor = self.db.with_connection(in_one_snapshot(scan))
        return self.rows.decode_many(rows), cursor

    def claim(self, receiver: str, ids: Sequence[int], worker: str) -> set[int]:
        if not ids:
            return set()
        rows = self.db.run(
            "INSERT OR IGNORE INTO dbnotify_claims (receiver, event_id, claimed_by, claimed_at) "
            "SELECT ?, value, ?, ? FROM json_each(?) RETURNING event_id",
            (receiver, worker, time.time(), json.dumps(list(ids))),
        )
        return {row[0] for row in rows}

    def advance(self, receiver: str, cursor: Any) -> None:
        if cursor is not None:
            self.db.run(
                "UPDATE dbnotify_receivers SET id = ? WHERE receiver = ? AND id < ?",
                (cursor, receiver, cursor),
            )

    def finish(
        self, receiver: str, event_id: int, error: str | None, retry_in: float | None
    ) -> None:
        state = "done" if error is None else ("retry" if retry_in is not None else "failed")
        self.db.run(
            "UPDATE dbnotify_claims SET state = ?, last_error = ?, claimed_by = NULL, "
            "next_attempt_at = ? WHERE receiver = ? AND event_id = ?",
            (state, error, time.time() + (retry_in or 0), receiver, event_id),
        )

    def release(self, receiver: str, ids: Sequence[int]) -> None:
        if ids:
            self.db.run(
                "UPDATE dbnotify_claims SET state = 'retry', attempts = attempts - 1, "
                "claimed_by = NULL, next_attempt_at = ? WHERE receiver = ? "
                "AND event_id IN (SELECT value FROM json_each(?)) AND state = 'running'",
                (time.time(), receiver, json.dumps(list(ids))),
            )

    def reset(self, receiver: str, event_id: int, worker: str) -> None:
        self.db.run(
            "INSERT INTO dbnotify_claims (receiver, event_id, claimed_by, claimed_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (receiver, event_id) DO UPDATE SET "
            "state = 'running', attempts = 1, claimed_by = excluded.claimed_by, "
            "claimed_at = excluded.claimed_at, last_error = NULL",
            (receiver, event_id, worker, time.time()),
        )

    def forget(self, receiver: str) -> None:
        self.db.run("DELETE FROM dbnotify_claims WHERE receiver = ?", (receiver,))
        self.db.run("DELETE FROM dbnotify_receivers WHERE receiver = ?", (receiver,))

    def due(
        self, receiver: str, worker: str, lease: float, limit: int
    ) -> list[tuple[int, int, Claimable | None]]:
        now = time.time()
        rows = self.db.run(
            "UPDATE dbnotify_claims SET state = 'running', attempts = attempts + 1, "
            "claimed_by = ?, claimed_at = ? WHERE rowid IN (SELECT rowid FROM dbnotify_claims "
            "  WHERE receiver = ? AND ((state = 'retry' AND next_attempt_at <= ?) "
            "  OR (state = 'running' AND claimed_at < ?)) ORDER BY event_id LIMIT ?) "
            "RETURNING event_id, attempts",
            (worker, now, receiver, now, now - lease, limit),
        )
        if not rows:
            return []
        ids = json.dumps([event_id for event_id, _ in rows])
        found = self.db.run(
            f"SELECT {COLUMNS} FROM dbnotify_journal WHERE id IN (SELECT value FROM json_each(?))",
            (ids,),
        )
        raw_by_id = {raw[0]: raw for raw in found}
        return [
            (event_id, attempts, self.rows.item(raw_by_id.get(event_id)))
            for event_id, attempts in sorted(rows)
        ]
