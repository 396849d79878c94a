"""Flask-DBNotify: committed database changes as blinker signals."""

from __future__ import annotations

from ._payload import ExactFloat
from .backends import Status
from .errors import DBNotifyError, ListenerError, WatchError
from .events import ChangeEvent, Operation
from .extension import DBNotify
from .listener import ListenerState
from .signals import (
    events_dropped,
    listener_connected,
    listener_disconnected,
    notification_received,
    receiver_failed,
    row_changed,
    row_deleted,
    row_inserted,
    row_updated,
    table_truncated,
)

__all__ = [
    "ChangeEvent",
    "DBNotify",
    "DBNotifyError",
    "ExactFloat",
    "ListenerError",
    "ListenerState",
    "Operation",
    "Status",
    "WatchError",
    "events_dropped",
    "listener_connected",
    "listener_disconnected",
    "notification_received",
    "receiver_failed",
    "row_changed",
    "row_deleted",
    "row_inserted",
    "row_updated",
    "table_truncated",
]
