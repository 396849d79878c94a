"""The wire format of notifications, shared by every backend.

A row batch, sent by a trigger for one statement::

    {"v": 1, "t": "orders", "o": "I", "k": ["id"], "ts": 1700000000.5,
     "s": 42, "r": [ROW, ...]}

where ``ROW`` is the new row (INSERT), the old row (DELETE), or
``[new, old]`` (UPDATE; ``[new, old, changed]`` when the watch carries only
some columns, since ``changed`` covers them all). A row too large for one notification is
stored in the payload table and stands in the batch as its integer id.
``s`` is unique per batch: PostgreSQL folds identical notifications sent in
one transaction.

An application message: ``{"v": 1, "m": CHANNEL, "u": UNIQUE, "p": PAYLOAD}``.
A message too large to send is stored and sent as ``{"v": 1, "ref": ID}``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from .backends import Item, Notification
from .events import ChangeEvent, Operation

VERSION = 1
_OPS = {"I": Operation.INSERT, "U": Operation.UPDATE, "D": Operation.DELETE}
_EMPTY: frozenset[str] = frozenset()
_counter = itertools.count()

Fetch = Callable[[Iterable[int]], dict[int, str]]
#: Reads journal rows ``lo..hi`` written by transaction ``xid``: (id, body).
ReadJournal = Callable[[int, int, int], list[tuple[int, str]]]


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


def loads(text: str) -> Any:
    return json.loads(text, parse_float=_parse_float)


def encode_message(channel: str, payload: Any) -> str:
    """Encode an application message; raises ``TypeError`` for values JSON
    cannot hold, before anything is sent."""
    if not isinstance(channel, str) or not channel:
        raise ValueError("channel must be a non-empty string")
    # Unique within the process, so two equal messages in one transaction
    # are not folded into one by PostgreSQL.
    unique = f"{os.getpid():x}.{next(_counter):x}"
    try:
        return json.dumps(
            {"v": VERSION, "m": channel, "u": unique, "p": payload},
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise TypeError(f"notify() payload is not JSON serialisable: {exc}") from None


def count(text: str) -> int:
    """How many events or messages a payload holds (0 if unreadable)."""
    try:
        msg = json.loads(text)
    except ValueError:
        return 0
    if isinstance(msg, dict) and isinstance(msg.get("r"), list):
        return len(msg["r"])
    if isinstance(msg, dict) and "J" in msg:
        return 0  # Journaled: read again from the journal, not lost.
    return 1


def decode(
    text: str,
    fetch: Fetch,
    journal_id: int | None = None,
    read_journal: ReadJournal | None = None,
) -> list[Item]:
    """Decode one notification payload into events or a message.
    ``journal_id`` becomes the events' ``id``. A durable notification
    (``{"v": 1, "J": [lo, hi], "x": xid}``) is read with ``read_journal``."""
    try:
        msg = loads(text)
    except ValueError as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict) or msg.get("v") != VERSION:
        raise PayloadError("not a Flask-DBNotify payload")
    try:
        if "ref" in msg:
            body = fetch([msg["ref"]]).get(msg["ref"])
            if body is None:
                raise PayloadError(f"stored payload {msg['ref']} is gone")
            return decode(body, fetch, journal_id)
        if "J" in msg:
            if read_journal is None:
                raise PayloadError("a journal reference where none is expected")
            lo, hi = msg["J"]
            items: list[Item] = []
            for row_id, body in read_journal(lo, hi, msg["x"]):
                items += decode(body, fetch, row_id)
            return items
        if "m" in msg:
            return [Notification(msg["m"], msg.get("p"))]
        return decode_rows(msg, fetch, journal_id)
    except PayloadError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything foreign is malformed
        raise PayloadError(f"malformed payload: {exc!r}") from None


def decode_rows(msg: dict[str, Any], fetch: Fetch, journal_id: int | None) -> list[Item]:
    table = msg["t"]
    op = _OPS[msg["o"]]
    keys = msg["k"]
    ts = datetime.fromtimestamp(msg["ts"], UTC)
    rows = msg["r"]
    refs = [r for r in rows if isinstance(r, int)]
    if refs:
        stored = fetch(refs)
        missing = [r for r in refs if r not in stored]
        if missing:
            raise PayloadError(f"stored rows {missing} are gone")
        rows = [loads(stored[r]) if isinstance(r, int) else r for r in rows]
    single = keys[0] if len(keys) == 1 else None
    events: list[Item] = []
    append = events.append
    for row in rows:
        if op is Operation.INSERT:
            new, old, changed = row, None, _EMPTY
            pk_row = row
        elif op is Operation.DELETE:
            new, old, changed = None, row, _EMPTY
            pk_row = row
        elif len(row) == 2:
            new, old = row
            changed = frozenset([k for k, v in new.items() if k not in old or differs(old[k], v)])
            pk_row = new
        else:
            new, old, names = row
            changed = frozenset(names)
            pk_row = new
        pk = pk_row[single] if single is not None else tuple(pk_row[k] for k in keys)
        append(ChangeEvent(table, op, pk, new, old, changed, journal_id, ts))
    return events
