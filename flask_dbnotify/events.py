"""The values receivers get: :class:`ChangeEvent` and :class:`Operation`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
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
    """One committed row change (or a TRUNCATE of a watched table).

    :param table: the watched table name, as given to ``watch()``.
    :param op: the operation.
    :param pk: the primary key value; a tuple for composite keys. ``None``
        for TRUNCATE.
    :param new: the row after the change (``None`` for DELETE and
        TRUNCATE), column name to JSON value, limited to the watch's
        ``columns`` (plus the primary key).
    :param old: the row before the change (``None`` for INSERT and TRUNCATE).
    :param changed: names of the columns whose value changed (UPDATE only;
        empty for the other operations, and for a cut event).
    :param id: journal id when the event was journaled, else ``None``.
    :param timestamp: when the change happened, by the database clock.
    :param cut: the row was too large to carry (see ``MAX_ROW_BYTES`` in
        the docs): ``new`` and ``old`` hold only the primary key columns.
    """

    table: str
    op: Operation
    pk: Any
    new: dict[str, Any] | None
    old: dict[str, Any] | None
    changed: frozenset[str] = field(default_factory=frozenset)
    id: int | None = None
    timestamp: datetime | None = None
    cut: bool = False

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
