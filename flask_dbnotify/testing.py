"""Helpers for testing receivers: :func:`make_event` builds the events the
listener would deliver, for :meth:`DBNotify.deliver
<flask_dbnotify.DBNotify.deliver>`; :func:`collect_events` waits, bounded,
for real events in an integration test."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from ._payload import differs
from ._watch import Target, resolve_target
from .events import ChangeEvent, Operation
from .signals import row_changed, table_truncated

#: The shape of each operation's event: (has ``new``, has ``old``).
_SHAPES = {
    Operation.INSERT: (True, False),
    Operation.UPDATE: (True, True),
    Operation.DELETE: (False, True),
    Operation.TRUNCATE: (False, False),
}


def make_event(
    table: Target,
    op: str | Operation,
    new: Mapping[str, Any] | None = None,
    old: Mapping[str, Any] | None = None,
    *,
    key: str | Iterable[str] = "id",
    changed: Iterable[str] | None = None,
    id: int | None = None,
    timestamp: datetime | None = None,
    cut: bool = False,
    context: Mapping[str, Any] | None = None,
) -> ChangeEvent:
    """Build the :class:`~flask_dbnotify.ChangeEvent` the listener would
    deliver for a change of ``table`` (a name, ``"schema.table"``, a
    ``Table`` or a model class, as :meth:`~flask_dbnotify.DBNotify.watch`
    takes; the event carries its name).

    ``op`` is ``"insert"``, ``"update"``, ``"delete"``, ``"truncate"`` or an
    :class:`~flask_dbnotify.Operation`. An INSERT needs ``new``, a DELETE
    ``old``, an UPDATE both, a TRUNCATE neither. ``pk`` is read from the row
    (``new``, or ``old`` for DELETE) by ``key``: a column name, or several
    for a composite key (then ``pk`` is a tuple). ``changed`` (UPDATE only)
    defaults, as the listener computes it, to the columns of ``new`` whose
    value differs from ``old`` or that ``old`` lacks. ``timestamp``
    defaults to now, in UTC. ``context`` is what the writer's
    :meth:`~flask_dbnotify.DBNotify.set_context` said. Raises
    ``ValueError`` for a shape the listener never delivers.
    """
    name = resolve_target(table)[0]
    op = Operation.coerce(op)
    _check_shape(op, new, old)
    new = None if new is None else dict(new)
    old = None if old is None else dict(old)
    if changed is not None and op is not Operation.UPDATE:
        raise ValueError(f"changed= is for UPDATE events only, not {op.value}")
    if changed is not None and cut:
        raise ValueError("a cut event has no changed (the listener sends none): leave changed= out")
    pk = None
    if op is not Operation.TRUNCATE:
        pk = _pk(new if new is not None else old, (key,) if isinstance(key, str) else tuple(key))
    if changed is None:
        changed = _changed(new, old) if op is Operation.UPDATE and not cut else ()
    stamp = timestamp if timestamp is not None else datetime.now(UTC)
    ctx = None if context is None else dict(context)
    return ChangeEvent(name, op, pk, new, old, frozenset(changed), id, stamp, cut, ctx)


def _check_shape(op: Operation, new: object, old: object) -> None:
    """``new`` and ``old`` are given as the listener gives them for ``op``."""
    want_new, want_old = _SHAPES[op]
    what = ("an " if op.value[0] in "AEIOU" else "a ") + op.value
    for label, row, wanted in (("new", new, want_new), ("old", old, want_old)):
        if wanted and row is None:
            raise ValueError(f"{what} event needs {label}=")
        if not wanted and row is not None:
            raise ValueError(f"{what} event has no {label}: leave {label}= out")


def _changed(new: Any, old: Any) -> list[str]:
    """As the listener computes it: the columns of ``new`` whose value
    differs from ``old``'s, or that ``old`` lacks."""
    return [k for k, v in new.items() if k not in old or differs(old[k], v)]


def _pk(row: Any, keys: tuple[str, ...]) -> Any:
    """The primary key value of ``row``: one value, or a tuple for several keys."""
    if not keys:
        raise ValueError("key= names no column: give the primary key column(s)")
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(
            f"the row has no key column {', '.join(map(repr, missing))}: "
            "add it to the row, or name the primary key with key="
        )
    return row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)


class _Collected(list[ChangeEvent]):
    """A list that receivers in another thread append to, and a wait for it."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()

    def receive(self, sender: Any, event: ChangeEvent, **extra: Any) -> None:
        with self._cond:
            self.append(event)
            self._cond.notify_all()

    def wait(self, count: int, timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self) >= count, timeout):
                raise AssertionError(
                    f"expected {count} {what} within {timeout}s, got {len(self)}: {self[:3]!r}"
                )


@contextmanager
def collect_events(
    table: Target | None = None, count: int = 1, *, timeout: float = 5.0
) -> Iterator[list[ChangeEvent]]:
    """A context manager, ``with collect_events("orders", count=2) as
    events:``, that collects the row events of ``table`` (a name, or
    whatever ``watch()`` takes; every table when ``None``), TRUNCATE
    included, delivered while the block runs. At the block's end it waits
    until at least ``count`` have arrived, or raises ``AssertionError``
    after ``timeout`` seconds, saying what it waited for and what came.

    ``events`` is a list of the events in the order receivers got them; it
    stops growing when the block ends. The receiver (a strong reference)
    is connected for the block only, whatever happens in it; if the block
    raises, nothing is awaited. Events come from any app's listener: start
    the listener of the app under test first.
    """
    sender = None if table is None else resolve_target(table)[0]
    events = _Collected()
    what = "events" if sender is None else f"events of {sender!r}"
    kwargs: dict[str, Any] = {} if sender is None else {"sender": sender}
    receive = events.receive  # One bound method, to connect and disconnect.
    row_changed.connect(receive, weak=False, **kwargs)
    table_truncated.connect(receive, weak=False, **kwargs)
    try:
        yield events
        events.wait(count, timeout, what)
    finally:
        row_changed.disconnect(receive)
        table_truncated.disconnect(receive)


__all__ = ["collect_events", "make_event"]
