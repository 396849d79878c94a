"""Journal rows written by row triggers that store each row's values and
a shape key (SQLite, MySQL): ``(id, time, shape, body)`` turned back into
events (:class:`Rows`). The shape (table, operation, keys, column names)
is stored once per trigger, in ``dbnotify_shapes``, and read once here.

A body is a JSON array of the row's values (INSERT, DELETE), or of the new
and the old row's (UPDATE); ``{"cut": KEYS}`` for a row too large to
journal whole; ``{"cx": CONTEXT, "r": BODY}`` with the writer's context.
A row without a shape holds a message."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .. import _context, _payload
from .._items import Item, Notification
from .._watch import Watch
from ..events import ChangeEvent, Operation, new_event

log = logging.getLogger(__name__)

_OPS = {
    "I": Operation.INSERT,
    "U": Operation.UPDATE,
    "D": Operation.DELETE,
    "T": Operation.TRUNCATE,
}
#: What a journal row we cannot read raises: it is logged and skipped.
_UNREADABLE = (
    _payload.PayloadError,
    KeyError,
    ValueError,
    TypeError,
    IndexError,
    RecursionError,
    OverflowError,  # a time no datetime holds
)
_EMPTY: frozenset[str] = frozenset()
#: With the ``fast`` extra, msgspec reads a row's values in half the
#: time of json's scanner (0.20 against 0.42 µs for four columns).
_FAST = _payload._fast is not None
#: The payload decoder's own scanner.
_scan: Any = json.JSONDecoder(parse_float=_payload._parse_float).scan_once  # type: ignore[attr-defined]


def _flatten(chunks: list[list[Any]]) -> list[Any]:
    return chunks[0] if len(chunks) == 1 else [v for chunk in chunks for v in chunk]


def header(watch: Watch, op: Operation, pk: list[str], names: list[str], flat: bool) -> str:
    """The shape of the journal rows the trigger of ``op`` writes: what the
    listener needs to turn their values back into an event. ``flat``: the
    values are one array (else an array of chunks)."""
    keep = None if watch.columns is None else [c for c in names if watch.carries(c, pk)]
    shape: dict[str, Any] = {"t": watch.name, "o": op.value[0], "k": pk, "c": names, "keep": keep}
    if flat:
        shape["flat"] = True
    return json.dumps(shape, ensure_ascii=False)


class Rows:
    """Turns journal rows ``(id, time, shape key, body)`` into events, with
    the shapes their triggers stored, each read once with ``header(key)``
    (its JSON text, or None). ``unix(time)`` is the time of a row in
    seconds since the epoch."""

    def __init__(self, header: Callable[[str], str | None], unix: Callable[[Any], float]) -> None:
        self.header = header
        self.unix = unix
        self._shapes: dict[str, dict[str, Any]] = {}
        self._last_time: tuple[float | None, datetime] = (None, datetime.now(UTC))

    def decode(self, raw: Any) -> list[Item]:
        """One journal row as events (or a message); a row we cannot read
        is logged and skipped."""
        return self.decode_many([raw])

    def decode_many(self, raws: list[Any]) -> list[Item]:
        """Journal rows as events (and messages), in order, in one pass: a
        row we cannot read is logged and skipped."""
        items: list[Item] = []
        shapes, event = self._shapes, self._event
        # The rows of one statement share one time (SQLite's clock stands
        # still during a statement): it is made once.
        at, timestamp = self._last_time
        for journal_id, created_at, shape, body in raws:
            try:
                if shape is None:
                    items += _payload.decode(body, journal_id)
                    continue
                if created_at != at:
                    timestamp = datetime.fromtimestamp(self.unix(created_at), UTC)
                    at = created_at
                known = shapes.get(shape) or self._shape(shape)
                items.append(event(journal_id, timestamp, known, body))
            except _UNREADABLE as exc:
                log.warning("skipped journal row %s: %s", journal_id, exc)
        self._last_time = (at, timestamp)
        return items

    def item(self, raw: Any) -> ChangeEvent | Notification | None:
        """The event or message of a journal row (None if it holds neither)."""
        items = [] if raw is None else self.decode(raw)
        return items[0] if items and isinstance(items[0], (ChangeEvent, Notification)) else None

    def _shape(self, key: str) -> dict[str, Any]:
        shape = self._shapes.get(key)
        if shape is None:
            header = self.header(key)
            if header is None:
                raise _payload.PayloadError(f"unknown shape {key!r}")
            shape = json.loads(header)
            shape["op"] = _OPS[shape["o"]]
            keys = shape["k"]
            shape["key"] = keys[0] if len(keys) == 1 else None
            shape.setdefault("flat", False)  # the triggers of earlier versions chunk
            # The common case, an INSERT or DELETE of a whole row with one
            # key column, has a path of its own in _event().
            simple = shape["flat"] and shape["keep"] is None and shape["key"] is not None
            shape["simple"] = (
                (shape["t"], shape["op"], shape["c"], len(shape["c"]), shape["key"])
                if simple and shape["op"] is not Operation.UPDATE
                else None
            )
            self._shapes[key] = shape
        return shape

    def _event(
        self, journal_id: int, timestamp: datetime, shape: dict[str, Any], body: str
    ) -> ChangeEvent:
        values = _parse(body)
        simple = shape["simple"]
        if simple is not None and type(values) is list and len(values) == simple[3]:
            table, op, columns, _, key = simple
            row = dict(zip(columns, values, strict=False))  # checked above
            if op is Operation.INSERT:
                return new_event(
                    table, op, row[key], row, None, _EMPTY, journal_id, timestamp, False, None
                )
            return new_event(
                table, op, row[key], None, row, _EMPTY, journal_id, timestamp, False, None
            )
        context = None
        if shape["op"] is Operation.TRUNCATE:
            return new_event(
                shape["t"],
                Operation.TRUNCATE,
                None,
                None,
                None,
                _EMPTY,
                journal_id,
                timestamp,
                False,
                None,
            )
        if type(values) is dict:
            if "cx" in values:
                # A writer's context wraps the values (see SQLiteBackend.set_context).
                context, values = _context.decode(values["cx"]), values["r"]
            if type(values) is dict:
                return _cut(journal_id, timestamp, shape, values["cut"], context)
        op, columns = shape["op"], shape["c"]
        changed = _EMPTY
        new: dict[str, Any] | None
        old: dict[str, Any] | None
        if op is Operation.UPDATE:
            new_values, old_values = values
            if not shape["flat"]:
                new_values, old_values = _flatten(new_values), _flatten(old_values)
            new, old = _row(columns, new_values), _row(columns, old_values)
            changed = _payload.changed_columns(new, old)
            row = new
        else:
            row = _row(columns, values if shape["flat"] else _flatten(values))
            new, old = (row, None) if op is Operation.INSERT else (None, row)
        key = shape["key"]
        pk = row[key] if key is not None else tuple(row[k] for k in shape["k"])
        keep = shape["keep"]
        if keep is not None:
            new = None if new is None else {c: new[c] for c in keep}
            old = None if old is None else {c: old[c] for c in keep}
        return new_event(
            shape["t"], op, pk, new, old, changed, journal_id, timestamp, False, context
        )


def _parse(body: str) -> Any:
    """A journal body's JSON."""
    if _FAST:
        return _payload.loads(body)
    # The decoder's scanner alone reads what our triggers write (no
    # whitespace around it to skip); anything else, as payloads are.
    try:
        values, end = _scan(body, 0)
    except StopIteration:
        end = -1
    return values if end == len(body) else _payload.loads(body)


def _row(columns: list[str], values: list[Any]) -> dict[str, Any]:
    if len(values) != len(columns):
        raise ValueError(f"{len(values)} values for {len(columns)} columns")
    return dict(zip(columns, values, strict=False))  # checked: strict costs a third more


def _cut(
    journal_id: int,
    timestamp: datetime,
    shape: dict[str, Any],
    cut: list[Any],
    context: dict[str, Any] | None,
) -> ChangeEvent:
    """The event of a row journaled cut: its keys only."""
    op, keys = shape["op"], shape["k"]
    new = old = None
    if op is Operation.UPDATE:
        new = dict(zip(keys, _flatten(cut[0]), strict=True))
        old = dict(zip(keys, _flatten(cut[1]), strict=True))
    elif op is Operation.INSERT:
        new = dict(zip(keys, _flatten(cut), strict=True))
    else:
        old = dict(zip(keys, _flatten(cut), strict=True))
    row = new if new is not None else old
    assert row is not None
    pk = row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)
    return new_event(shape["t"], op, pk, new, old, _EMPTY, journal_id, timestamp, True, context)
