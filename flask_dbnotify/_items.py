"""What a backend reads from the database for the listener: row events,
application messages, counts of events that cannot be delivered, and
gaps.

A module of its own, below both the backends and the payload decoder,
which use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .events import ChangeEvent


@dataclass(frozen=True)
class Notification:
    """An application message read from the database."""

    channel: str
    payload: Any
    #: Journal id when the message was journaled (``notify(durable=True)``,
    #: and every message on SQLite), else ``None``.
    id: int | None = None
    #: The sending transaction's :meth:`~flask_dbnotify.DBNotify.set_context`
    #: values, or ``None``.
    context: dict[str, Any] | None = None


@dataclass(frozen=True)
class Lost:
    """Events that were read but cannot be delivered (a long message with
    a piece missing): reported with ``events_dropped``."""

    count: int


@dataclass(frozen=True)
class Gap:
    """Events may have been missed and cannot be recovered (WAL capture:
    its replication slot was lost and ``install-triggers`` replaced it):
    reported with ``listener_connected(reconnect=True, gap=True)``."""

    reason: str


@dataclass(frozen=True)
class Drained:
    """The marker a stopping listener sends itself (WAL capture): what the
    stream held before it has been delivered."""

    token: str


Item = ChangeEvent | Notification | Lost | Gap | Drained
