"""What ``watch()`` and ``on()`` record, independent of any database."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .events import ChangeEvent, Operation

ALL_OPERATIONS: tuple[Operation, ...] = (
    Operation.INSERT,
    Operation.UPDATE,
    Operation.DELETE,
)

Target = Any  # str | sqlalchemy.Table | declarative model class


def split_name(name: str) -> tuple[str | None, str]:
    """Split ``"schema.table"`` into its parts. Parts may be double-quoted
    (``'"my.schema"."Order Items"'``) to hold dots; names are otherwise taken
    exactly as written, case included, as SQLAlchemy does."""
    parts: list[str] = []
    buf: list[str] = []
    i, quoted, was_quoted = 0, False, False
    while i < len(name):
        ch = name[i]
        if quoted:
            if ch == '"' and name[i + 1 : i + 2] == '"':
                buf.append('"')
                i += 1
            elif ch == '"':
                quoted = False
            else:
                buf.append(ch)
        elif ch == '"' and not buf:
            quoted = was_quoted = True
        elif ch == ".":
            parts.append("".join(buf))
            buf, was_quoted = [], False
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    if quoted or len(parts) > 2 or not all(parts) or (was_quoted and not parts[-1]):
        raise ValueError(
            f"cannot read table name {name!r}: use 'table' or 'schema.table', "
            'double-quoting a part that contains a dot ("a.b")'
        )
    if len(parts) == 1:
        return None, parts[0]
    return parts[0], parts[1]


def resolve_target(target: Target) -> tuple[str, str | None, str, sa.Table | None]:
    """Return ``(name, schema, table, sqlalchemy_table)`` for a watch target.

    ``name`` is the sender of row signals: the string as given, or the
    table's ``fullname`` for a ``Table`` or model class.
    """
    if isinstance(target, str):
        schema, table = split_name(target)
        return target, schema, table, None
    table_obj = getattr(target, "__table__", target)
    if isinstance(table_obj, sa.Table):
        return table_obj.fullname, table_obj.schema, table_obj.name, table_obj
    raise TypeError(
        f"cannot watch {target!r}: pass a table name, 'schema.table', a "
        "sqlalchemy.Table or a declarative model class"
    )


def coerce_operations(
    operations: str | Operation | Iterable[str | Operation] | None,
) -> tuple[Operation, ...]:
    if operations is None:
        return ALL_OPERATIONS
    if isinstance(operations, (str, Operation)):
        operations = [operations]
    ops = {Operation.coerce(op) for op in operations}
    if not ops:
        raise ValueError("operations is empty: name at least one of insert, update, delete")
    return tuple(op for op in (*ALL_OPERATIONS, Operation.TRUNCATE) if op in ops)


def _names(value: Iterable[str] | None, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    names = tuple(dict.fromkeys(value))
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{what} must be a non-empty list of column names")
    return names


@dataclass(frozen=True)
class Watch:
    """A table to watch, as the application described it."""

    name: str
    schema: str | None
    table: str
    operations: tuple[Operation, ...]
    columns: tuple[str, ...] | None
    when_changed: tuple[str, ...] | None
    durable: bool = False
    implicit: bool = False

    @classmethod
    def create(
        cls,
        target: Target,
        operations: Any = None,
        columns: Iterable[str] | None = None,
        when_changed: Iterable[str] | None = None,
        durable: bool = False,
        implicit: bool = False,
    ) -> Watch:
        name, schema, table, table_obj = resolve_target(target)
        ops = coerce_operations(operations)
        cols = _names(columns, "columns")
        changed = _names(when_changed, "when_changed")
        if changed is not None and Operation.UPDATE not in ops:
            raise ValueError(
                f"when_changed only applies to UPDATE, but {name!r} is not watched for 'update'"
            )
        if table_obj is not None:
            # Catch typos now; the database check at install time is final.
            known = set(table_obj.columns.keys())
            for col in (cols or ()) + (changed or ()):
                if col not in known:
                    raise ValueError(
                        f"table {name!r} has no column {col!r} "
                        f"(columns: {', '.join(sorted(known))})"
                    )
        return cls(name, schema, table, ops, cols, changed, durable, implicit)

    def carries(self, column: str, pk: Iterable[str] = ()) -> bool:
        return self.columns is None or column in self.columns or column in pk


Handler = Callable[[ChangeEvent], Any]


def receiver_name(func: Callable[..., Any]) -> str:
    """A receiver's identity across processes: its qualified name."""
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


@dataclass(frozen=True)
class Subscription:
    """A receiver registered with ``DBNotify.on()``."""

    func: Handler
    operations: frozenset[Operation]
    where: tuple[tuple[str, Any], ...]
    #: Exactly one process runs it per durable event (``once=True``).
    once: bool = False
    #: The receiver's identity across processes: its qualified name.
    name: str = ""

    def handle(self, event: ChangeEvent) -> None:
        """Run the receiver (as a once runner does)."""
        self.func(event)

    def matches(self, event: ChangeEvent) -> bool:
        if event.op not in self.operations:
            return False
        if not self.where:
            return True
        row = event.row
        return all(col in row and row[col] == value for col, value in self.where)

    @classmethod
    def create(
        cls, func: Handler, operations: Any, where: Mapping[str, Any] | None, once: bool = False
    ) -> Subscription:
        if not callable(func):
            raise TypeError(f"on() decorates a callable, not {func!r}")
        items = tuple((where or {}).items())
        for col, _ in items:
            if not isinstance(col, str):
                raise TypeError(f"where keys are column names, not {col!r}")
        ops = frozenset(coerce_operations(operations))
        if items and Operation.TRUNCATE in ops:
            raise ValueError("where= cannot apply to 'truncate': a TRUNCATE names no row")
        return cls(func, ops, items, once, receiver_name(func))
