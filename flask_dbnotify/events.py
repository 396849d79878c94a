"""The values receivers get: :class:`ChangeEvent` and :class:`Operation`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, TypeVar

T = TypeVar("T")


class Operation(enum.StrEnum):
    """The kind of change. Members compare equal to their SQL names."""

    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    #: The whole table was emptied (PostgreSQL); the event has no row.
    TRUNCATE = "TRUNCATE"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def coerce(cls, value: str | Operation) -> Operation:
        """Accept ``"insert"``, ``"INSERT"`` or an :class:`Operation`."""
        if isinstance(value, Operation):
            return value
        if isinstance(value, str):
            try:
                return cls(value.upper())
            except ValueError:
                pass
        raise ValueError(
            f"unknown operation {value!r}: use 'insert', 'update', 'delete' or 'truncate'"
        )


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One committed row change (or a TRUNCATE of a watched table), as
    receivers get it. Values of ``new`` and ``old`` are described in
    :ref:`row-values`."""

    #: The watched table name, as given to ``watch()``: the sender of the
    #: row signals.
    table: str
    #: The :class:`Operation`.
    op: Operation
    #: The primary key value; a tuple for composite keys. ``None`` for
    #: TRUNCATE.
    pk: Any
    #: The row after the change, column name to JSON value, limited to the
    #: watch's ``columns`` (plus the primary key). ``None`` for DELETE and
    #: TRUNCATE.
    new: dict[str, Any] | None
    #: The row before the change, like ``new``. ``None`` for INSERT and
    #: TRUNCATE.
    old: dict[str, Any] | None
    #: Names of the columns whose value changed: for UPDATE, of every
    #: column of the table, whatever the watch carries. Empty for the
    #: other operations, and for a cut event.
    changed: frozenset[str] = field(default_factory=frozenset)
    #: The journal id when the event was journaled, else ``None``.
    id: int | None = None
    #: When the change happened, by the database clock.
    timestamp: datetime | None = None
    #: The row was too large to carry (see :ref:`cut-events`): ``new`` and
    #: ``old`` hold only the primary key columns.
    cut: bool = False
    #: What the writer's transaction said of itself with
    #: :meth:`~flask_dbnotify.DBNotify.set_context` (who, which request),
    #: or ``None``. See :doc:`context`.
    context: dict[str, Any] | None = None

    @property
    def row(self) -> dict[str, Any]:
        """``new``, or ``old`` for DELETE; empty for TRUNCATE."""
        row = self.new if self.new is not None else self.old
        return row if row is not None else {}

    def instance(self, model: type[T]) -> T:
        """Build a transient instance of the mapped class ``model`` from
        :attr:`row`, with values converted to the columns' Python types
        (``datetime``, ``Decimal``, ``UUID``, ...). Columns the event does not
        carry are left unset. The instance belongs to no session.
        """
        from ._convert import build_instance

        return build_instance(model, self.row)


_FIELDS = ("table", "op", "pk", "new", "old", "changed", "id", "timestamp", "cut", "context")
if _FIELDS != tuple(f.name for f in fields(ChangeEvent)):
    raise RuntimeError("make_change_event() must set every field of ChangeEvent, in order")
# The slots' own setters: what object.__setattr__ ends up calling.
_table, _op, _pk, _new, _old, _changed, _id, _timestamp, _cut, _context = (
    getattr(ChangeEvent, name).__set__ for name in _FIELDS
)


def make_change_event(
    table: str,
    op: Operation,
    pk: Any,
    new: dict[str, Any] | None,
    old: dict[str, Any] | None,
    changed: frozenset[str],
    id: int | None,  # noqa: A002 - the field's name
    timestamp: datetime | None,
    cut: bool,
    context: dict[str, Any] | None,
) -> ChangeEvent:
    """``ChangeEvent(...)`` with every field given, for decoders: the same
    object at half the cost (the frozen dataclass's ``__init__`` goes
    through ``object.__setattr__`` for each field; this sets the slots)."""
    event = object.__new__(ChangeEvent)
    _table(event, table)
    _op(event, op)
    _pk(event, pk)
    _new(event, new)
    _old(event, old)
    _changed(event, changed)
    _id(event, id)
    _timestamp(event, timestamp)
    _cut(event, cut)
    _context(event, context)
    return event
