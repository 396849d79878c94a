"""WAL capture on PostgreSQL (``DBNOTIFY_CAPTURE = "wal"``): no trigger in
any writer's transaction. One elected process of the app streams a
logical replication slot (:mod:`.leader`) and relays each committed
transaction into the journal (:mod:`.relay`; :mod:`.shape` and
:mod:`.tojson` make the journal bodies); every process's listener
reads the journal as it reads durable events, so the rest of the
extension works unchanged. :mod:`.ddl` and :mod:`.admin` make and report
the publication and the slot.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import sqlalchemy as sa

from ...._context import SETTING as CONTEXT_SETTING
from ...base import Feed, Stream
from ...common import execute_on, parse_url
from .. import PostgreSQLBackend
from ..common import CHANNEL, ident
from ..journal import PostgreSQLFeed
from .admin import WalAdmin
from .ddl import MESSAGES
from .leader import BATCH_ROWS, Leader

#: What :class:`Relayed` keeps at most: rows, and seconds.
KEEP_ROWS = 4 * BATCH_ROWS
KEEP_SECONDS = 10.0

#: A message in the writer's transaction: a row of a published table that
#: only the app's role may write (not pg_logical_emit_message(), which any
#: role may call), and no NOTIFY (which would serialise notifying commits).
_MESSAGE = "INSERT INTO {} (body) VALUES (%(payload)s)"

#: The context, for the leader (see ``Stream.handle``). Any role may emit
#: such a message; it only ever applies to its own transaction's changes.
_EMIT_CONTEXT = "SELECT pg_logical_emit_message(true, %(prefix)s, %(text)s::text)"


class WalBackend(PostgreSQLBackend):
    """PostgreSQL, changes captured from the write-ahead log."""

    durable_by_nature = True

    def __init__(self, url: sa.URL, listen_url: sa.URL, schema: str, slot: str) -> None:
        super().__init__(url, listen_url, schema)
        self.slot = slot
        self.admin = WalAdmin(self.db, schema, self.listen_where, self.connect_kwargs, slot)

    @classmethod
    def from_url(  # type: ignore[override]
        cls, url: sa.URL, listen_uri: str | None, schema: str, slot: str
    ) -> WalBackend:
        listen_url = parse_url(listen_uri) if listen_uri else url
        if listen_url.get_backend_name() != "postgresql":
            raise ValueError("DBNOTIFY_LISTEN_URI must be a postgresql:// URL")
        return cls(url, listen_url, schema, slot)

    def notify(self, connection: Any, channel: str, payload: str, durable: bool = False) -> None:
        if connection is None:
            # At once, from a session of our own: as in triggers mode.
            super().notify(None, channel, payload, durable)
            return
        # On the caller's connection, its errors its own: as in triggers mode.
        messages = ident(self.schema, MESSAGES)
        execute_on(connection, _MESSAGE.format(messages), {"payload": payload})

    def set_context(self, conn: Any, text: str) -> None:
        # Decoded in the transaction, before the changes that follow it.
        conn.exec_driver_sql(_EMIT_CONTEXT, {"prefix": CONTEXT_SETTING, "text": text})

    def feed(self) -> Feed:
        return WalFeed(self)


class WalFeed(PostgreSQLFeed):
    """A listener's feed, and this process's candidate for leader. When
    this process leads, what its relay wrote is handed to its listener
    too, which then delivers it without reading it back (but in the order
    of the notifications, as any other journal rows)."""

    def __init__(self, backend: WalBackend) -> None:
        super().__init__(backend)
        self.relayed = Relayed()
        # The listener's URL: the server itself, or a session-pooled address
        # (a pooler in transaction mode cannot carry a replication session).
        self.leader = Leader(backend.connect_kwargs, backend.schema, backend.slot, self.relayed)

    def open_stream(self, settings: Any) -> Stream:
        stream = super().open_stream(settings)
        # What was relayed before may never be notified to this stream:
        # the catch-up reads it.
        self.relayed.clear()
        self.leader.start()
        return stream

    def _fetch(self, lo: int, hi: int, xid: int) -> list[tuple[int, str]]:
        rows = self.relayed.take(lo, hi, xid)
        return rows if rows is not None else super()._fetch(lo, hi, xid)

    def replaying(self) -> bool:
        return True  # Everything is journaled: catch up after every connect.

    def close(self) -> None:
        self.leader.stop()

    def send_drain(self, token: str) -> bool:
        # Notifications arrive in commit order: the relay's come first.
        marker = json.dumps({"v": 1, "drained": token})
        self.db.run("SELECT pg_notify(%s, %s)", (CHANNEL, marker), failed="cannot notify")
        return True

    def discard(self) -> None:
        super().discard()
        self.leader.discard()


class Relayed:
    """Journal rows this process's leader relayed, until its listener reads
    their notification: at most :data:`KEEP_ROWS` rows, none older than
    :data:`KEEP_SECONDS` (a notification that never comes, as when the
    stream reconnects, leaves its rows to the catch-up).

    A notification can reach the listener before the relay that sent it
    has returned to the leader: the listener then waits for the relay
    under way (not for any later one), at most :data:`KEEP_SECONDS`. A
    relay whose rows are not handed over (some built on the server) is
    kept as such, so that its notification does not wait for the next."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._kept: dict[tuple[int, int, int], tuple[float, list[str] | None]] = {}
        self._rows = 0
        #: Relays begun and ended (one at a time).
        self._begun = self._ended = 0

    def expect(self) -> None:
        with self._cond:
            self._begun += 1

    def put(self, rows: tuple[int, int, int, list[str] | None] | None) -> None:
        now = time.monotonic()
        with self._cond:
            self._ended = self._begun
            self._cond.notify_all()
            if rows is None:
                return
            lo, hi, xid, bodies = rows
            self._kept[(lo, hi, xid)] = (now, bodies)
            self._rows += len(bodies or ())
            while self._kept:
                first = next(iter(self._kept))
                at, old = self._kept[first]
                if self._rows <= KEEP_ROWS and now - at <= KEEP_SECONDS:
                    break
                del self._kept[first]
                self._rows -= len(old or ())

    def take(self, lo: int, hi: int, xid: int) -> list[tuple[int, str]] | None:
        key = (lo, hi, xid)
        with self._cond:
            under_way = self._begun
            self._cond.wait_for(lambda: key in self._kept or self._ended >= under_way, KEEP_SECONDS)
            kept = self._kept.pop(key, None)
            if kept is None or kept[1] is None:
                return None
            self._rows -= len(kept[1])
        return list(zip(range(lo, hi + 1), kept[1], strict=True))

    def clear(self) -> None:
        with self._cond:
            self._kept.clear()
            self._rows = 0
