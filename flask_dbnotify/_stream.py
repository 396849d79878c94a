"""Server-sent events without a broker: :meth:`DBNotify.stream`.

Each process has one :class:`Hub` per app. The dispatcher thread appends
what it delivers to the hub's ring, a batch at a time: one append and one
wake-up per batch, however many streams are open. Each stream is a
generator that the request's own thread (or greenlet) runs: it reads the
ring from where it stands, keeps what its client asked for, and writes
it out. A stream that falls a whole ring behind (a slow or stalled
client) holds nobody up: it gets ``event: gap`` and ends, and the
browser's ``EventSource`` reconnects with ``Last-Event-ID``, which
resumes from the journal where the events are journaled.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime
from datetime import time as day_time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from flask import Response

from ._items import Gap, Notification
from ._watch import Subscription, resolve_target
from .events import ChangeEvent

if TYPE_CHECKING:
    from ._registry import Served

#: Turns the data of one event (a dict) into the text of its ``data:`` line.
Serializer = Callable[[dict[str, Any]], str]
#: Journal rows read at a time when a stream resumes.
_RESUME_BATCH = 500
#: Seconds a stream that has just sent waits before it reads again: under
#: load it then sends what came meanwhile in one go, and wakes at most 20
#: times a second however fast events come (a worker's threads cannot all
#: wake for every batch the dispatcher delivers). A stream that has not
#: sent for that long sends the next event at once.
PACE = 0.05


def to_jsonable(value: Any) -> Any:
    """How the stream writes values JSON does not carry as-is: ``Decimal``
    as a string of its exact digits, ``datetime``, ``date`` and ``time`` in
    ISO 8601, ``UUID`` as its string, ``bytes`` in base64. Anything else
    raises ``TypeError``. (Values of ``event.new`` and ``event.old`` are
    JSON already; these come from custom data and message payloads.)"""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date, day_time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def default_serializer(data: dict[str, Any]) -> str:
    """The data line of an event, as JSON (see :func:`to_jsonable`)."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=to_jsonable)


def event_data(event: ChangeEvent) -> dict[str, Any]:
    """What a stream sends of a row change (and ``flask dbnotify listen``
    prints, with ``cut``)."""
    return {
        "table": event.table,
        "op": event.op.value,
        "pk": event.pk,
        "new": event.new,
        "old": event.old,
        "changed": sorted(event.changed),
        "id": event.id,
        "timestamp": None if event.timestamp is None else event.timestamp.isoformat(),
        "context": event.context,
    }


class Batch:
    """Items the dispatcher delivered at once, ``first`` the sequence number
    of the first, and their frames as made so far, per serializer: an item
    is framed once for all the streams that send it with one serializer,
    not once per stream (which 200 streams at 1,000 events a second could
    not afford)."""

    __slots__ = ("first", "items", "frames")

    def __init__(self, first: int, items: Sequence[Any]) -> None:
        self.first = first
        self.items = items
        self.frames: dict[Serializer, list[str | None]] = {}

    def frame(self, index: int, serializer: Serializer) -> str:
        """The text of item ``index`` (made by whichever stream asks first;
        two that ask at once make the same text)."""
        frames = self.frames.get(serializer)
        if frames is None:
            frames = self.frames.setdefault(serializer, [None] * len(self.items))
        text = frames[index]
        if text is None:
            text = frames[index] = frame(self.items[index], serializer)
        return text


class Hub:
    """What this process delivered lately, for its streams: the newest
    batches the dispatcher delivered, ``size`` items in all at most (or
    the newest batch, if it alone holds more), each item with its
    sequence number."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.renew()

    def renew(self) -> None:
        """Empty, with a lock of its own (also in a forked child: the
        parent's streams are not its own, and an async worker class has
        patched the locks it must use since)."""
        self._cond = threading.Condition()
        #: Oldest first.
        self._batches: deque[Batch] = deque()
        self._kept = 0
        #: The sequence number of the newest item (items count from 1).
        self._last = 0
        #: Streams open now.
        self.streams = 0

    def publish(self, items: Sequence[Any]) -> None:
        """From the dispatcher thread: add what it delivered. Never waits
        for a stream."""
        if not self.streams or not items:
            return
        with self._cond:
            self._batches.append(Batch(self._last + 1, items))
            self._last += len(items)
            self._kept += len(items)
            while self._kept - len(self._batches[0].items) >= self.size:
                self._kept -= len(self._batches.popleft().items)
            self._cond.notify_all()

    def join(self) -> int:
        """A stream opens: where it starts reading."""
        with self._cond:
            self.streams += 1
            return self._last

    def leave(self) -> None:
        with self._cond:
            self.streams -= 1
            if not self.streams:
                # A stream that opens reads from then on: keep nothing.
                self._batches.clear()
                self._kept = 0

    def read(self, after: int, timeout: float) -> tuple[list[tuple[Batch, int]], int]:
        """The items past sequence number ``after``, as (batch, index of its
        first such item), oldest first, waiting up to ``timeout`` seconds
        for one; and where the reader then stands. Raises :class:`Overrun`
        if some went before it read them."""
        with self._cond:
            if self._last <= after:
                self._cond.wait(timeout)
            if self._last <= after:
                return [], after
            newer = []
            for batch in reversed(self._batches):
                newer.append((batch, max(0, after + 1 - batch.first)))
                if batch.first <= after + 1:
                    break
            else:
                raise Overrun(self._batches[0].first - after - 1)
            newer.reverse()
            return newer, self._last


class Overrun(Exception):
    """A stream fell a whole ring behind: ``args[0]`` items went by unread."""


class Selection:
    """What one stream sends: changes of some watches (with operations and
    ``where``), and messages of some channels."""

    def __init__(
        self,
        names: Iterable[str],
        operations: Any,
        where: dict[str, Any] | None,
        channels: Iterable[str],
    ) -> None:
        # One filter per stream, as an on() receiver's: the same rules.
        self.filter = Subscription.create(_nothing, operations, where)
        self.tables = frozenset(names)
        self.channels = frozenset(channels)

    def wants(self, item: Any) -> bool:
        if isinstance(item, ChangeEvent):
            return item.table in self.tables and self.filter.matches(item)
        return isinstance(item, Notification) and item.channel in self.channels


def _nothing(event: ChangeEvent) -> None:
    """The receiver a stream's filter stands for."""


def frame(item: ChangeEvent | Notification, serializer: Serializer) -> str:
    """The text of one server-sent event."""
    if isinstance(item, ChangeEvent):
        kind, data = item.op.value.lower(), event_data(item)
    else:
        kind, data = "message", {"channel": item.channel, "payload": item.payload}
        data.update(id=item.id, context=item.context)
    head = f"id: {item.id}\n" if item.id is not None else ""
    return f"{head}event: {kind}\ndata: {serializer(data)}\n\n"


def gap(reason: str) -> str:
    return f"event: gap\ndata: {json.dumps({'reason': reason})}\n\n"


def run(
    served: Served,
    hub: Hub,
    selection: Selection,
    resume_after: int | None,
    journaled: bool,
    serializer: Serializer,
) -> Iterator[str]:
    """The body of one stream, until its client goes (or falls behind)."""
    keepalive = served.settings.stream_keepalive
    # Joined first: what is delivered while the journal is read is kept.
    position = hub.join()
    try:
        # At once, so that proxies and the browser see the stream open; a
        # browser that loses it tries again after a second.
        yield "retry: 1000\n: connected\n\n"
        resumed: set[int] = set()
        if resume_after is not None:
            if journaled:
                yield from _resume(served, selection, resume_after, serializer, resumed)
            else:
                yield gap("this stream's events are not journaled: missed ones cannot be sent")
        skip = Repeats(resumed)
        wrote = time.monotonic()
        while True:
            try:
                batches, position = hub.read(position, keepalive)
            except Overrun as exc:
                yield gap(f"the client fell {exc.args[0]} events behind")
                return
            text = _frames(batches, selection, serializer, skip)
            if not text and time.monotonic() - wrote >= keepalive:
                # Nothing for this client for that long, however busy the
                # others' tables: proxies keep the link, and a client
                # that went is noticed at this write.
                text = ": keep-alive\n\n"
            if text:
                yield text
                wrote = time.monotonic()
            if batches:
                time.sleep(PACE)
    finally:
        hub.leave()


class Repeats:
    """Which live items a resumed stream already sent from the journal."""

    def __init__(self, sent: set[int]) -> None:
        self.sent = sent
        self.top = max(sent, default=0)

    def __call__(self, item: ChangeEvent | Notification) -> bool:
        if not self.sent or item.id is None:
            return False
        if item.id in self.sent:
            return True
        if item.id > self.top:
            self.sent = set()  # past what the journal gave: nothing left to skip
        return False


def _frames(
    batches: list[tuple[Batch, int]], selection: Selection, serializer: Serializer, skip: Repeats
) -> str:
    """The text of what a stream sends of the items ``Hub.read`` gave."""
    out = []
    for batch, start in batches:
        for index in range(start, len(batch.items)):
            item = batch.items[index]
            if isinstance(item, Gap):
                # The listener itself missed events: so did every stream.
                out.append(gap(item.reason))
            elif selection.wants(item) and not skip(item):
                out.append(batch.frame(index, serializer))
    return "".join(out)


def _resume(
    served: Served,
    selection: Selection,
    after: int,
    serializer: Serializer,
    sent: set[int],
) -> Iterator[str]:
    """What the journal holds past id ``after`` for this stream (the ids
    sent go into ``sent``, so that the live part does not repeat them): at
    most DBNOTIFY_STREAM_BUFFER rows read, so that no client can have the
    whole journal read again and again."""
    backend = served.backend
    _, oldest = backend.journal(0, 1)
    if oldest is not None and oldest > after + 1:
        yield gap("the journal no longer holds every event since the last one received")
    since, left = after + 1, served.settings.stream_buffer
    while True:
        items, last = backend.journal(since, max(1, min(_RESUME_BATCH, left)))
        if last is None:
            return
        if left <= 0:
            yield gap("too many events to send again: more than DBNOTIFY_STREAM_BUFFER")
            return
        left -= last + 1 - since
        out = []
        for item in items:
            if isinstance(item, Gap):
                out.append(gap(item.reason))  # as it was told live
            elif isinstance(item, (ChangeEvent, Notification)) and item.id is not None:
                if selection.wants(item):
                    sent.add(item.id)
                    out.append(frame(item, serializer))
        if out:
            yield "".join(out)
        since = last + 1


def response(
    served: Served,
    targets: Any,
    operations: Any,
    where: Mapping[str, Any] | None,
    messages: Iterable[str],
    serializer: Serializer | None,
    last_event_id: str | None,
) -> Response:
    """What :meth:`DBNotify.stream` returns (its arguments checked here)."""
    registry = served.registry
    names = [resolve_target(t)[0] for t in _targets(targets)]
    missing = [name for name in names if name not in registry.watches]
    if missing:
        raise ValueError(f"stream() of {', '.join(map(repr, missing))}: watch it first")
    channels = [messages] if isinstance(messages, str) else list(messages)
    if not names and not channels:
        raise ValueError("stream() needs targets, messages, or both")
    selection = Selection(names, operations, dict(where or {}), channels)
    backend = served.backend
    journaled = backend.durable_by_nature or all(map(registry.is_durable, names))
    if channels and served.settings.fast_messages and not backend.journals_messages:
        journaled = False  # a message sent at once is in no journal
    body = run(
        served,
        served.hub,
        selection,
        parse_last_event_id(last_event_id),
        journaled,
        serializer or default_serializer,
    )
    return Response(
        body,
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _targets(targets: Any) -> list[Any]:
    """``stream()``'s targets as a list: one, several, or none."""
    if targets is None:
        return []
    if isinstance(targets, (list, tuple, set, frozenset)):
        return list(targets)
    return [targets]


def parse_last_event_id(value: str | None) -> int | None:
    """The id a reconnecting browser sends (``Last-Event-ID``), if it is one of ours."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None
