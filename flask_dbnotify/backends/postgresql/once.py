"""The claims of exactly-once receivers, on PostgreSQL: of row events
(journal rows with their watch's name) and of messages (rows without
one, found by the start of their body).

A scan reads only transactions older than every running one, so a later
commit can never land behind a receiver's watermark; claims are rows whose
primary key (receiver, event id) lets exactly one process win each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..._items import Notification
from ..._payload import message_prefix
from ...events import ChangeEvent
from ..base import Claimable, OnceStore
from .connection import Database
from .journal import journal_item


class PostgreSQLOnceStore(OnceStore):
    def __init__(self, db: Database, tables: dict[str, str]) -> None:
        self.db = db
        #: Our quoted tables by short name (journal, receivers, claims).
        self.tables = tables

    def _run(self, statement: str, params: dict[str, Any]) -> list[Any]:
        return self.db.run(statement.format(**self.tables), params)

    def register(self, receivers: Sequence[str]) -> None:
        self._run(
            "INSERT INTO {receivers} (receiver, xid, id) "
            "SELECT r, pg_snapshot_xmin(pg_current_snapshot()), 0 "
            "FROM unnest(%(r)s::text[]) AS r ON CONFLICT DO NOTHING",
            {"r": list(receivers)},
        )

    def scan(
        self, receiver: str, watches: Sequence[str], limit: int
    ) -> tuple[list[ChangeEvent], Any]:
        items, cursor = self._scan(receiver, "watch = ANY(%(w)s)", {"w": list(watches)}, limit)
        return [e for e in items if isinstance(e, ChangeEvent)], cursor

    def scan_messages(
        self, receiver: str, channel: str, limit: int
    ) -> tuple[list[Notification], Any]:
        # A prefix of the body, measured by the server (characters in its
        # encoding); a slice of a long body is read without the rest.
        where = "watch IS NULL AND substr(body, 1, length(%(p)s)) = %(p)s"
        items, cursor = self._scan(receiver, where, {"p": message_prefix(channel)}, limit)
        return [n for n in items if isinstance(n, Notification) and n.channel == channel], cursor

    def _scan(
        self, receiver: str, where: str, params: dict[str, Any], limit: int
    ) -> tuple[list[Claimable], Any]:
        """Journal rows matching ``where`` (our SQL, values in ``params``)
        past the receiver's watermark, decoded, and the cursor."""
        # Only transactions older than every running one: a later commit
        # can never land behind the watermark.
        rows = self._run(
            "WITH s AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) "
            "SELECT j.xid::text, j.id, j.body, s.xmin::text FROM s "
            "CROSS JOIN {receivers} AS r "
            "LEFT JOIN LATERAL (SELECT xid, id, body FROM {journal} "
            "  WHERE (xid, id) > (r.xid, r.id) AND xid < s.xmin AND " + where + " "
            "  ORDER BY xid, id LIMIT %(n)s) AS j ON true "
            "WHERE r.receiver = %(r)s",
            {**params, "r": receiver, "n": limit},
        )
        found = [(row_id, body) for _, row_id, body, _ in rows if row_id is not None]
        if not rows:
            return [], None
        items = [e for e in (journal_item(i, b) for i, b in found) if e is not None]
        if len(found) == limit:
            cursor = (int(rows[-1][0]), rows[-1][1])
        else:
            # Everything of these watches below xmin is in hand.
            cursor = (int(rows[-1][3]), 0)
        return items, cursor

    def claim(self, receiver: str, ids: Sequence[int], worker: str) -> set[int]:
        if not ids:
            return set()
        rows = self._run(
            "INSERT INTO {claims} (receiver, event_id, claimed_by) "
            "SELECT %(r)s, unnest(%(ids)s::bigint[]), %(w)s "
            "ON CONFLICT DO NOTHING RETURNING event_id",
            {"r": receiver, "ids": list(ids), "w": worker},
        )
        return {row[0] for row in rows}

    def advance(self, receiver: str, cursor: Any) -> None:
        if cursor is None:
            return
        self._run(
            "UPDATE {receivers} SET xid = %(x)s::text::xid8, id = %(id)s "
            "WHERE receiver = %(r)s AND (xid, id) < (%(x)s::text::xid8, %(id)s)",
            {"r": receiver, "x": str(cursor[0]), "id": cursor[1]},
        )

    def finish(
        self, receiver: str, event_id: int, error: str | None, retry_in: float | None
    ) -> None:
        state = "done" if error is None else ("retry" if retry_in is not None else "failed")
        self._run(
            "UPDATE {claims} SET state = %(s)s, last_error = %(e)s, claimed_by = NULL, "
            "next_attempt_at = now() + make_interval(secs => %(d)s) "
            "WHERE receiver = %(r)s AND event_id = %(id)s",
            {"s": state, "e": error, "d": retry_in or 0, "r": receiver, "id": event_id},
        )

    def release(self, receiver: str, ids: Sequence[int]) -> None:
        if ids:
            self._run(
                "UPDATE {claims} SET state = 'retry', attempts = attempts - 1, "
                "claimed_by = NULL, next_attempt_at = now() "
                "WHERE receiver = %(r)s AND event_id = ANY(%(ids)s) AND state = 'running'",
                {"r": receiver, "ids": list(ids)},
            )

    def reset(self, receiver: str, event_id: int, worker: str) -> None:
        self._run(
            "INSERT INTO {claims} (receiver, event_id, claimed_by) VALUES (%(r)s, %(id)s, %(w)s) "
            "ON CONFLICT (receiver, event_id) DO UPDATE SET state = 'running', attempts = 1, "
            "claimed_by = excluded.claimed_by, claimed_at = now(), last_error = NULL",
            {"r": receiver, "id": event_id, "w": worker},
        )

    def forget(self, receiver: str) -> None:
        self._run("DELETE FROM {claims} WHERE receiver = %(r)s", {"r": receiver})
        self._run("DELETE FROM {receivers} WHERE receiver = %(r)s", {"r": receiver})

    def due(
        self, receiver: str, worker: str, lease: float, limit: int
    ) -> list[tuple[int, int, Claimable | None]]:
        rows = self._run(
            "UPDATE {claims} AS c SET state = 'running', attempts = c.attempts + 1, "
            "claimed_by = %(w)s, claimed_at = now() "
            "FROM (SELECT receiver, event_id FROM {claims} WHERE receiver = %(r)s AND ("
            "  (state = 'retry' AND next_attempt_at <= now()) OR "
            "  (state = 'running' AND claimed_at < now() - make_interval(secs => %(l)s))) "
            "  ORDER BY event_id LIMIT %(n)s FOR UPDATE SKIP LOCKED) AS d "
            "WHERE c.receiver = d.receiver AND c.event_id = d.event_id "
            "RETURNING c.event_id, c.attempts, "
            "(SELECT body FROM {journal} AS j WHERE j.id = c.event_id)",
            {"w": worker, "r": receiver, "l": lease, "n": limit},
        )
        return sorted((row[0], row[1], journal_item(row[0], row[2])) for row in rows)
