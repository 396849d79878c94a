"""Turn JSON row values back into the Python values of ORM columns."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
import sqlalchemy.orm
from sqlalchemy import types as satypes

T = TypeVar("T")
Converter = Callable[[Any], Any]


def _datetime(value: Any) -> Any:
    if isinstance(value, str):
        # SQLite stores "YYYY-MM-DD HH:MM:SS"; fromisoformat reads both forms.
        return dt.datetime.fromisoformat(value)
    return value


def _date(value: Any) -> Any:
    return dt.date.fromisoformat(value[:10]) if isinstance(value, str) else value


def _time(value: Any) -> Any:
    return dt.time.fromisoformat(value) if isinstance(value, str) else value


def _decimal(value: Any) -> Any:
    # ExactFloat keeps the digits a float cannot; otherwise str() gives the
    # shortest form that round-trips.
    text = getattr(value, "text", None)
    if text is not None:
        return decimal.Decimal(text)
    return decimal.Decimal(str(value)) if isinstance(value, (int, float, str)) else value


def _uuid(value: Any) -> Any:
    return uuid.UUID(value) if isinstance(value, str) else value


def _bytes(value: Any) -> Any:
    if isinstance(value, str):
        # PostgreSQL's JSON form of bytea is "\x0a0b..."; SQLite's is hex.
        return bytes.fromhex(value[2:] if value.startswith("\\x") else value)
    return value


def _bool(value: Any) -> Any:
    return bool(value) if isinstance(value, int) else value


def _enum(enum_class: type[enum.Enum]) -> Converter:
    def convert(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return enum_class[value]
            except KeyError:
                return enum_class(value)
        return value

    return convert


def converter_for(type_: sa.types.TypeEngine[Any]) -> Converter | None:
    """Return a function turning a JSON value into ``type_``'s Python value,
    or ``None`` when the JSON value is already right."""
    impl = type_
    if isinstance(impl, satypes.TypeDecorator):
        impl = impl.impl_instance
    if isinstance(impl, satypes.Enum) and impl.enum_class is not None:
        return _enum(impl.enum_class)
    checks: list[tuple[type[Any], Converter]] = [
        (satypes.DateTime, _datetime),
        (satypes.Date, _date),
        (satypes.Time, _time),
        (satypes.Numeric, _decimal),
        # Not a Numeric in SQLAlchemy 2.1: a DOUBLE read as Decimal (MySQL's
        # default) is turned into one too.
        (satypes.Float, _decimal),
        (satypes.Uuid, _uuid),
        (satypes._Binary, _bytes),
        (satypes.Boolean, _bool),
    ]
    for sa_type, convert in checks:
        if isinstance(impl, sa_type):
            if isinstance(impl, satypes.Float) and not impl.asdecimal:
                return None
            if isinstance(impl, satypes.Numeric) and not impl.asdecimal:
                return None
            if isinstance(impl, satypes.Uuid) and not impl.as_uuid:
                return None
            return convert
    return None


def build_instance(model: type[T], row: dict[str, Any]) -> T:
    mapper = sa.inspect(model, raiseerr=False)
    if mapper is None or not hasattr(mapper, "class_manager"):
        raise TypeError(f"{model!r} is not a mapped SQLAlchemy model class")
    if not mapper.configured:
        # Instrumentation is incomplete until mappers are configured, which
        # SQLAlchemy otherwise does on first query or first instance.
        sa.orm.configure_mappers()
    instance = mapper.class_manager.new_instance()
    for column in mapper.columns:
        if column.name not in row:
            continue
        value = row[column.name]
        if value is not None:
            convert = converter_for(column.type)
            if convert is not None:
                value = convert(value)
        prop = mapper.get_property_by_column(column)
        setattr(instance, prop.key, value)
    return instance  # type: ignore[no-any-return]
