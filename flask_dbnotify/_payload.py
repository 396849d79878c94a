"""The wire format of notifications, shared by every backend.

A row batch, sent by a trigger for one statement::

    {"v": 1, "t": "orders", "o": "I", "k": ["id"], "ts": 1700000000.5,
     "s": 42, "r": [ROW, ...]}

where ``ROW`` is the new row (INSERT), the old row (DELETE), or
``[new, old]`` (UPDATE; ``[new, old, changed]`` when the watch carries only
some columns, since ``changed`` covers them all). A row too large to carry
is *cut*: ``["cut", KEY]`` (UPDATE: ``["cut", NEW_KEY, OLD_KEY]``), KEY an
object of the primary key columns. ``s`` is unique per batch: PostgreSQL
folds identical notifications sent in one transaction. A TRUNCATE has
``"o": "T"`` and no ``s`` or ``r``. A batch of a transaction that set a
context (``set_context()``) has ``"cx"`` after the head: its JSON, as a
string.

An application message: ``{"v": 1, "m": CHANNEL, "u": UNIQUE, "p": PAYLOAD}``,
and ``"cx": CONTEXT`` (an object) when its transaction set one, written
always in this order and spacing, so that its text starts with
:func:`message_prefix`: once receivers of a channel find its journaled
messages by that.
A gap, journaled when WAL capture's slot was replaced after it was lost:
``{"v": 1, "gap": REASON}``. The marker a stopping listener sends itself:
``{"v": 1, "drained": TOKEN}``.

On PostgreSQL a message too long for one notification travels in pieces,
each ``~SEQ K BYTES LAST`` and a newline, then the next stretch of the
message (BYTES long in UTF-8 in all; LAST is 1 on the last piece); see
:class:`Pieces`. A durable notification names journal rows instead:
``{"v": 1, "J": [lo, hi], "x": xid, "j": SCHEMA}``, ``j`` the schema of
the journal (absent in what durable triggers send): a listener of an app
with its journal elsewhere skips it unread.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from . import _context
from ._items import Drained, Gap, Item, Notification
from .events import ChangeEvent, Operation, new_event

VERSION = 1
_OPS = {"I": Operation.INSERT, "U": Operation.UPDATE, "D": Operation.DELETE}
_EMPTY: frozenset[str] = frozenset()
_counter = itertools.count()

#: Reads journal rows ``lo..hi`` written by transaction ``xid`` to the
#: journal of a schema (None: unknown): (id, body).
ReadJournal = Callable[[int, int, int, Any], list[tuple[int, str]]]


class PayloadError(ValueError):
    """A notification on our channel that we cannot read."""


class ExactFloat(float):
    """A JSON number whose text a float does not reproduce (more digits than
    a float holds, or a scale such as ``1.50``); ``text`` keeps it, so
    ``event.instance()`` builds the exact ``Decimal`` and ``changed`` sees
    ``1.0`` -> ``1.00``."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> ExactFloat:
        value = super().__new__(cls, text)
        value.text = text
        return value


def _parse_float(text: str) -> float:
    value = float(text)
    return value if repr(value) == text else ExactFloat(text)


def differs(a: Any, b: Any) -> bool:
    """Whether two JSON values differ, exact numbers by their text."""
    return a != b or getattr(a, "text", None) != getattr(b, "text", None)


#: One decoder for every payload: json.loads() with an argument builds a
#: new one on each call (a third of the time a typical row's body takes).
_decode = json.JSONDecoder(parse_float=_parse_float).decode

try:
    # Optional (``pip install Flask-DBNotify[fast]``): twice as fast as
    # json on our payloads, with the same values: numbers go through
    # _parse_float by their text, integers of any size stay exact.
    from msgspec import DecodeError as _FastError
    from msgspec.json import Decoder as _FastDecoder
except ImportError:  # pragma: no cover - depends on what is installed
    _fast = None
else:
    _fast = _FastDecoder(float_hook=_parse_float).decode


def loads(text: str) -> Any:
    if _fast is not None:
        try:
            return _fast(text)
        except _FastError:
            # What msgspec refuses (NaN, a lone surrogate, malformed
            # text), json decides, as it always has.
            pass
    return _decode(text)


def message_prefix(channel: str) -> str:
    """How the text of every message on ``channel`` starts."""
    return f'{{"v":{VERSION},"m":{json.dumps(channel, ensure_ascii=False)},'


def encode_message(channel: str, payload: Any, context: dict[str, Any] | None = None) -> str:
    """Encode an application message (with its transaction's ``context``);
    raises ``TypeError`` for values JSON cannot hold, before anything is
    sent."""
    if not isinstance(channel, str) or not channel:
        raise ValueError("channel must be a non-empty string")
    # Unique within the process, so two equal messages in one transaction
    # are not folded into one by PostgreSQL.
    unique = f"{os.getpid():x}.{next(_counter):x}"
    try:
        message = {"u": unique, "p": payload}
        if context:
            message["cx"] = context
        rest = json.dumps(
            message,
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
        )
        text = message_prefix(channel) + rest[1:]
        # A lone surrogate passes json.dumps but is no text a database holds.
        text.encode()
    except RecursionError:
        raise TypeError("notify() payload is nested too deeply for JSON") from None
    except (TypeError, ValueError) as exc:
        raise TypeError(f"notify() payload is not JSON serialisable: {exc}") from None
    return text


def pieces(text: str, limit: int, size: int) -> list[str]:
    """``text`` as it travels: whole if shorter than ``limit`` bytes (a
    notification's), else in pieces of at most ``size`` UTF-8 bytes, cut at
    character boundaries."""
    data = text.encode()
    if len(data) < limit:
        return [text]
    # Unique within the process, as the pieces of one transaction must be.
    seq = f"p{os.getpid():x}.{next(_counter):x}"
    out: list[str] = []
    pos = 0
    while pos < len(data):
        end = min(pos + size, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:
            end -= 1
        last = int(end == len(data))
        out.append(f"~{seq} {len(out) + 1} {len(data)} {last}\n" + data[pos:end].decode())
        pos = end
    return out


class Pieces:
    """Puts long messages back together from their pieces.

    PostgreSQL queues the notifications of a transaction together at
    commit (notifying commits are serialised), and the pieces of a message
    are sent one after the other, so they arrive one after the other: at
    most one message is in progress, and any other notification in
    between means it will never be finished. Anyone may send pieces, so
    what is kept is bounded by ``limit`` bytes, for one message at a time.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # [pid, seq, next piece number, total bytes, bytes so far, parts],
        # parts None while the rest of a refused message is skipped.
        self._open: list[Any] | None = None

    def interrupt(self) -> int:
        """Another notification came: give up on the message in progress.
        Return how many messages were lost (0 or 1)."""
        current, self._open = self._open, None
        return int(current is not None and current[5] is not None)

    def add(self, pid: int, text: str) -> tuple[str | None, int]:
        """Add a piece. Return the whole message once its last piece is in
        (else None), and how many messages were lost: one given up on (a
        piece missing, or the pieces not adding up) or refused (over the
        limit). Pieces of a message whose first piece never came are
        skipped: the reader counted it when it dropped that piece."""
        head, _, part = text.partition("\n")
        try:
            seq, k_text, total_text, last_text = head[1:].split(" ")
            k, total, last = int(k_text), int(total_text), last_text == "1"
        except ValueError:
            return None, self.interrupt()
        current = self._open
        if current is None or current[:3] != [pid, seq, k]:
            lost = self.interrupt()
            if k != 1:
                return None, lost
            current = [pid, seq, 1, total, 0, [] if total <= self.limit else None]
            lost += current[5] is None
        else:
            lost = 0
        if current[5] is not None:
            current[4] += len(part.encode())
            if current[4] > current[3] or (last and current[4] != current[3]):
                current[5], lost = None, lost + 1
            else:
                current[5].append(part)
        if last:
            self._open = None
            return ("".join(current[5]) if current[5] is not None else None), lost
        current[2] = k + 1
        self._open = current
        return None, lost


def count(text: str) -> int:
    """How many events or messages a payload holds (0 if unreadable, or
    journaled: those are read again, not lost)."""
    if text[:1] == "~":
        # Pieces: the message counts once, on its first piece (the
        # listener reports one whose later pieces go missing).
        return 1 if text.partition("\n")[0].split(" ")[1:2] == ["1"] else 0
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):
        return 0
    if isinstance(msg, dict) and isinstance(msg.get("r"), list):
        return len(msg["r"])
    if isinstance(msg, dict) and "J" in msg:
        return 0
    return 1


def decode(
    text: str,
    journal_id: int | None = None,
    read_journal: ReadJournal | None = None,
) -> list[Item]:
    """Decode one notification payload into events or a message.
    ``journal_id`` becomes the events' ``id``. A durable notification
    (``{"v": 1, "J": [lo, hi], "x": xid, ...}``) is read with ``read_journal``."""
    try:
        msg = loads(text)
    except RecursionError:
        raise PayloadError("nested too deeply to read") from None
    except ValueError as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict) or msg.get("v") != VERSION:
        raise PayloadError("not a Flask-DBNotify payload")
    try:
        if "J" in msg:
            return _journaled(msg, read_journal)
        if "m" in msg:
            context = _context.decode(msg["cx"]) if "cx" in msg else None
            return [Notification(msg["m"], msg.get("p"), journal_id, context)]
        if "gap" in msg or "drained" in msg:
            return [_marker(msg, journal_id)]
        if "ref" in msg:
            raise PayloadError("a stored payload of an earlier version (no longer read)")
        return decode_rows(msg, journal_id)
    except PayloadError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything foreign is malformed
        raise PayloadError(f"malformed payload: {exc!r}") from None


def _marker(msg: dict[str, Any], journal_id: int | None) -> Gap | Drained:
    if "drained" in msg:
        return Drained(str(msg["drained"]))
    if journal_id is None:
        # Only WAL capture's relay writes a gap, to the journal.
        raise PayloadError("a gap outside the journal")
    return Gap(str(msg["gap"]))


def _journaled(msg: dict[str, Any], read_journal: ReadJournal | None) -> list[Item]:
    """The items of the journal rows a durable notification names."""
    if read_journal is None:
        raise PayloadError("a journal reference where none is expected")
    lo, hi = msg["J"]
    items: list[Item] = []
    for row_id, body in read_journal(lo, hi, msg["x"], msg.get("j")):
        try:
            items += decode(body, row_id)
        except PayloadError as exc:
            raise PayloadError(f"journal row {row_id}: {exc}") from None
    return items


def decode_rows(msg: dict[str, Any], journal_id: int | None) -> list[Item]:
    table = msg["t"]
    ts = datetime.fromtimestamp(msg["ts"], UTC)
    context = _context.decode(msg["cx"]) if "cx" in msg else None
    if msg["o"] == "T":
        return [
            ChangeEvent(
                table, Operation.TRUNCATE, None, None, None, _EMPTY, journal_id, ts, False, context
            )
        ]
    op = _OPS[msg["o"]]
    keys = msg["k"]
    head = (table, op, journal_id, ts, context)
    # The common rows take a loop of their own (a row is a few hundred ns
    # all told): with one key column, INSERT and DELETE rows that are
    # objects, UPDATE rows [new, old]; anything else takes _event().
    if len(keys) != 1:
        return [_event(row, keys, head) for row in msg["r"]]
    if op is Operation.UPDATE:
        return _updates(msg["r"], keys, head)
    return _rows(msg["r"], keys, head)


def _rows(rows: list[Any], keys: list[str], head: tuple[Any, ...]) -> list[Item]:
    """The events of INSERT or DELETE ``rows``, keyed by one column."""
    table, op, journal_id, ts, context = head
    single, insert, make = keys[0], op is Operation.INSERT, new_event
    events: list[Item] = []
    append = events.append
    for row in rows:
        if type(row) is not dict:
            append(_event(row, keys, head))
        elif insert:
            append(make(table, op, row[single], row, None, _EMPTY, journal_id, ts, False, context))
        else:
            append(make(table, op, row[single], None, row, _EMPTY, journal_id, ts, False, context))
    return events


def _updates(rows: list[Any], keys: list[str], head: tuple[Any, ...]) -> list[Item]:
    """The events of UPDATE ``rows``, keyed by one column."""
    table, op, journal_id, ts, context = head
    single, make = keys[0], new_event
    events: list[Item] = []
    append = events.append
    for row in rows:
        if type(row) is list and len(row) == 2 and type(row[0]) is dict:
            new, old = row
            changed = changed_columns(new, old)
            append(make(table, op, new[single], new, old, changed, journal_id, ts, False, context))
        else:
            append(_event(row, keys, head))
    return events


def _event(row: Any, keys: list[str], head: tuple[Any, ...]) -> ChangeEvent:
    """The event of one row of a batch; ``head``: the batch's table,
    operation, journal id, timestamp and context."""
    table, op, journal_id, ts, context = head
    cut, changed = False, _EMPTY
    if type(row) is list and row[0] == "cut":
        cut, pk_row = True, row[1]
        new, old = (None, row[1]) if op is Operation.DELETE else (row[1], None)
        if op is Operation.UPDATE:
            old = row[2]
    elif op is Operation.INSERT:
        new, old, pk_row = row, None, row
    elif op is Operation.DELETE:
        new, old, pk_row = None, row, row
    elif len(row) == 2:
        new, old = row
        changed, pk_row = changed_columns(new, old), new
    else:
        new, old, names = row
        changed, pk_row = frozenset(names), new
    if len(keys) == 1:
        pk = pk_row.get(keys[0]) if cut else pk_row[keys[0]]
    else:
        pk = tuple(pk_row.get(k) if cut else pk_row[k] for k in keys)
    return new_event(table, op, pk, new, old, changed, journal_id, ts, cut, context)


_MISSING = object()


def changed_columns(new: dict[str, Any], old: dict[str, Any]) -> frozenset[str]:
    """The columns whose value differs in ``new`` from ``old``: what
    :func:`differs` says, called only where ``!=`` cannot say alone (an
    exact number on either side), as it is a function call per column."""
    get = old.get
    return frozenset(
        [
            k
            for k, v in new.items()
            if (o := get(k, _MISSING)) != v
            or (type(o) is ExactFloat or type(v) is ExactFloat)
            and differs(o, v)
        ]
    )
