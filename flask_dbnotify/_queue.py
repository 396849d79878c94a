"""What the listener's reader hands its dispatcher: the queue of one run,
and the control items queued between raw messages.

A queue item is a raw message (undecoded, as the backend's stream read
it) or a control item: a :class:`LifecycleSignal`, a housekeeping
:class:`Task`, or a :class:`HearingCheck`. Only raw messages count
towards ``DBNOTIFY_QUEUE_SIZE`` and go back to the listener's feed
(``Feed.rewind``) when they are not delivered: :func:`is_raw` tells them apart.
"""

from __future__ import annotations

import enum
import os
import secrets
import threading
from collections import deque
from typing import Any

from blinker import NamedSignal

from .signals import events_dropped


class LifecycleSignal:
    """A lifecycle signal queued between events, so receivers see it in order."""

    __slots__ = ("signal", "kwargs")

    def __init__(self, signal: NamedSignal, **kwargs: Any) -> None:
        self.signal = signal
        self.kwargs = kwargs


class Task(enum.Enum):
    """Work the reader asks of the dispatcher, so that the reader never
    waits on anything but its own connection."""

    #: Replay what the journal has and was missed.
    CATCH_UP = "catch up"
    #: Check that the database's triggers match the watches.
    CHECK_TRIGGERS = "check triggers"
    #: Prune old payloads and journal rows.
    PRUNE = "prune"


class HearingCheck:
    """Asks the dispatcher to send ``token`` to the stream's check channel;
    the reader waits for it on the stream from ``sent_at`` on."""

    __slots__ = ("channel", "token", "sent_at", "failed", "probed")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.token = secrets.token_hex(8)
        self.sent_at: float | None = None
        self.failed = False
        self.probed = False


def is_raw(item: Any) -> bool:
    """Whether ``item`` is a raw message, not a control item."""
    return not isinstance(item, (LifecycleSignal, Task, HearingCheck))


def raw_only(items: list[Any]) -> list[Any]:
    return [item for item in items if is_raw(item)]


class Run:
    """What one start() shares between its two threads. A thread left
    behind by a stop() that gave up keeps its own run, so it can neither
    touch the next run's queue nor be revived by the next start()."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.queue: deque[list[Any]] = deque()
        #: Raw messages in ``queue``.
        self.queued = 0
        self.ready = threading.Condition(threading.Lock())

    def put(self, items: list[Any], count: int, capacity: int, durable: bool) -> list[Any]:
        """Queue ``items`` (``count`` raw messages, or control items with
        ``count`` 0) while there is room for ``capacity`` raw messages; the
        raw messages that found none, in order. A ``durable`` (journaled)
        backend loses nothing: this waits for room instead."""
        with self.ready:
            while durable and count and self.queued >= capacity and not self.stop.is_set():
                # Journaled: stop reading until there is room; nothing is lost.
                self.ready.wait(0.5)
            room = capacity - self.queued
            if count <= room or durable:
                self.queue.append(items)
                self.queued += count
                self.ready.notify()
                return []
            kept, lost = items[: max(room, 0)], items[max(room, 0) :]
            if kept:
                self.queue.append(kept)
                self.queued += len(kept)
            return lost

    def report_lost(self, events: int) -> bool:
        """Queue ``events_dropped`` for ``events`` lost, where they were;
        whether that is a new report (not one still being added to)."""
        with self.ready:
            last = self.queue[-1] if self.queue else None
            report = last[-1] if last else None
            new = False
            if isinstance(report, LifecycleSignal) and report.signal is events_dropped:
                # Still overflowing: one report for the whole loss.
                report.kwargs["count"] += events
            elif events:
                self.queue.append([LifecycleSignal(events_dropped, count=events)])
                new = True
            else:
                # Only durable notifications: replayed from the journal.
                self.queue.append([Task.CATCH_UP])
            self.ready.notify()
            return new


class Counts:
    """The listener's counters, kept by both of its threads."""

    __slots__ = ("received", "dispatched", "dropped", "reconnects", "replayed")

    def __init__(self) -> None:
        self.received = self.dispatched = self.dropped = self.reconnects = self.replayed = 0


class Waker:
    """A pipe that interrupts the reader's wait: the reader selects on
    :attr:`fd` beside its stream; :meth:`wake` makes it readable. Closed by
    :meth:`close` (the app is closed), opened again by :meth:`open`; a wake
    meanwhile does nothing, and never writes to a descriptor number that
    was reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fd = -1
        self._write = -1
        self.open()

    def open(self) -> None:
        with self._lock:
            if self.fd >= 0:
                return
            self.fd, self._write = os.pipe()
            os.set_blocking(self.fd, False)
            os.set_blocking(self._write, False)

    def wake(self) -> None:
        with self._lock:
            if self._write < 0:
                return
            try:
                os.write(self._write, b"x")
            except OSError:
                pass  # A full pipe wakes the reader just as well.

    def drain(self) -> None:
        try:
            while os.read(self.fd, 512):
                pass
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self.discard()

    def discard(self) -> None:
        """Close without the lock: in a forked child, where a thread of the
        parent may have held it at the fork, and no other thread runs."""
        for fd in (self.fd, self._write):
            if fd >= 0:
                os.close(fd)
        self.fd = self._write = -1
