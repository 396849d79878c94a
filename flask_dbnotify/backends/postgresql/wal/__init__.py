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
from typing import Any

import sqlalchemy as sa

from ...base import Feed, Stream
from ...common import execute_on, parse_url
from .. import PostgreSQLBackend
from ..common import CHANNEL, ident
from ..journal import PostgreSQLFeed
from .admin import WalAdmin
from .ddl import MESSAGES
from .leader import Leader

#: A message in the writer's transaction: a row of a published table that
#: only the app's role may write (not pg_logical_emit_message(), which any
#: role may call), and no NOTIFY (which would serialise notifying commits).
_MESSAGE = "INSERT INTO {} (body) VALUES (%(payload)s)"


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

    def feed(self) -> Feed:
        return WalFeed(self)


class WalFeed(PostgreSQLFeed):
    """A listener's feed, and this process's candidate for leader."""

    def __init__(self, backend: WalBackend) -> None:
        super().__init__(backend)
        # The listener's URL: the server itself, or a session-pooled address
        # (a pooler in transaction mode cannot carry a replication session).
        self.leader = Leader(backend.connect_kwargs, backend.schema, backend.slot)

    def open_stream(self, settings: Any) -> Stream:
        stream = super().open_stream(settings)
        self.leader.start()
        return stream

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
