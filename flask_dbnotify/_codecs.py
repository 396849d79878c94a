"""Values to JSON and back, driven by type annotations: what typed
channels (:mod:`._channels`) use to send a dataclass's fields and to
build the dataclass again on the receiving side.

:func:`codec` compiles one annotation into a :class:`Codec`, once;
:func:`record` gives a dataclass's :class:`Record`, whose fields are
compiled on first use (so a dataclass may contain itself). Encoding
checks each value against its annotation (``TypeError``, or
``ValueError`` for a value JSON cannot hold, such as ``nan``), so what is
sent can be read back; decoding raises ``ValueError`` saying where a
payload does not fit.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import math
import threading
import types
import typing
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any


class Codec:
    """One annotation's mapping: a value to JSON and back. ``where``
    names the value in errors (``PostReads.items[2].date``)."""

    def encode(self, value: Any, where: str) -> Any:
        raise NotImplementedError

    def decode(self, value: Any, where: str) -> Any:
        raise NotImplementedError


class ScalarCodec(Codec):
    """A value JSON holds directly, or as text (dates, ``Decimal``, ``UUID``):
    ``kind`` is the Python type, ``wire`` the JSON types it travels as."""

    def __init__(
        self,
        kind: type,
        wire: tuple[type, ...],
        to_json: Callable[[Any], Any] = lambda v: v,
        from_json: Callable[[Any], Any] | None = None,
        exclude: type | None = None,
        accepts: tuple[type, ...] = (),
    ) -> None:
        self.kind, self.wire, self.to_json = kind, wire, to_json
        self.from_json = from_json or kind
        #: A subclass the value must not be (bool for int, datetime for date).
        self.exclude = exclude or _NEVER
        #: What a value may be (an int for a float, as type checkers allow).
        self.accepts = accepts or (kind,)

    @staticmethod
    def _is(value: Any, kind: type | tuple[type, ...], exclude: type) -> bool:
        return isinstance(value, kind) and not isinstance(value, exclude)

    def encode(self, value: Any, where: str) -> Any:
        if not self._is(value, self.accepts, self.exclude):
            raise TypeError(f"{where}: expected {self.kind.__name__}, got {value!r}")
        try:
            return self.to_json(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def decode(self, value: Any, where: str) -> Any:
        if not self._is(value, self.wire, bool if bool not in self.wire else _NEVER):
            raise ValueError(f"{where}: expected {self.kind.__name__} as JSON, got {value!r}")
        try:
            return self.from_json(value)
        except (ValueError, TypeError, InvalidOperation) as exc:
            raise ValueError(f"{where}: cannot read {value!r} as {self.kind.__name__}") from exc


class _NEVER:
    """No value is an instance of it."""


def _finite(value: Any) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a JSON number")
    return number


def _decimal(value: Any) -> Decimal:
    # A number sent by hand: its JSON text (ExactFloat keeps it), not a float's.
    return Decimal(value if isinstance(value, str) else getattr(value, "text", str(value)))


def _iso(value: Any) -> str:
    return str(value.isoformat())


_NUMBER = (int, float)
_SCALARS: dict[Any, ScalarCodec] = {
    str: ScalarCodec(str, (str,)),
    int: ScalarCodec(int, (int,), exclude=bool),
    float: ScalarCodec(float, _NUMBER, _finite, float, exclude=bool, accepts=_NUMBER),
    bool: ScalarCodec(bool, (bool,)),
    type(None): ScalarCodec(type(None), (type(None),), from_json=lambda v: None),
    dt.date: ScalarCodec(dt.date, (str,), _iso, dt.date.fromisoformat, exclude=dt.datetime),
    dt.datetime: ScalarCodec(dt.datetime, (str,), _iso, dt.datetime.fromisoformat),
    dt.time: ScalarCodec(dt.time, (str,), _iso, dt.time.fromisoformat),
    # Exact: as a string, never a float.
    Decimal: ScalarCodec(Decimal, (str, *_NUMBER), str, _decimal),
    uuid.UUID: ScalarCodec(uuid.UUID, (str,), str),
}


class AnyCodec(Codec):
    """``Any``: a JSON value as it is (``json`` refuses what it cannot hold)."""

    def encode(self, value: Any, where: str) -> Any:
        return value

    def decode(self, value: Any, where: str) -> Any:
        return value


class OptionalCodec(Codec):
    """``X | None``."""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner

    def encode(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.encode(value, where)

    def decode(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.decode(value, where)


class EnumCodec(Codec):
    """An enum member, by its value."""

    def __init__(self, kind: type[enum.Enum], where: str) -> None:
        for member in kind:
            if not isinstance(member.value, (str, int, float, bool)):
                raise TypeError(
                    f"{where}: {kind.__name__}.{member.name} has a value JSON cannot "
                    f"hold ({member.value!r}): typed channels carry enums by value"
                )
        self.kind = kind

    def encode(self, value: Any, where: str) -> Any:
        if not isinstance(value, self.kind):
            raise TypeError(f"{where}: expected a {self.kind.__name__} member, got {value!r}")
        return value.value

    def decode(self, value: Any, where: str) -> Any:
        try:
            return self.kind(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is no {self.kind.__name__} value") from None


class ListCodec(Codec):
    """``list[X]`` and ``tuple[X, ...]`` (a list or a tuple as the value,
    a JSON array on the wire), or ``tuple[X, Y]`` with ``fixed``."""

    def __init__(self, kind: type, items: list[Codec], fixed: bool) -> None:
        self.kind, self.items, self.fixed = kind, items, fixed

    def _codecs(self, value: Any, where: str, error: type[Exception]) -> list[Codec]:
        if not self.fixed:
            return self.items * len(value)
        if len(value) != len(self.items):
            raise error(f"{where}: expected {len(self.items)} items, got {len(value)}")
        return self.items

    def encode(self, value: Any, where: str) -> Any:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a {self.kind.__name__}, got {value!r}")
        codecs = self._codecs(value, where, TypeError)
        return [
            c.encode(v, f"{where}[{n}]") for n, (c, v) in enumerate(zip(codecs, value, strict=True))
        ]

    def decode(self, value: Any, where: str) -> Any:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected an array, got {value!r}")
        codecs = self._codecs(value, where, ValueError)
        return self.kind(
            c.decode(v, f"{where}[{n}]") for n, (c, v) in enumerate(zip(codecs, value, strict=True))
        )


class DictCodec(Codec):
    """``dict[str, X]``: a JSON object."""

    def __init__(self, values: Codec) -> None:
        self.values = values

    def _check(self, value: Any, where: str, error: type[Exception]) -> None:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise error(f"{where}: expected a dict with string keys, got {value!r}")

    def encode(self, value: Any, where: str) -> Any:
        self._check(value, where, TypeError)
        return {k: self.values.encode(v, f"{where}[{k!r}]") for k, v in value.items()}

    def decode(self, value: Any, where: str) -> Any:
        self._check(value, where, ValueError)
        return {k: self.values.decode(v, f"{where}[{k!r}]") for k, v in value.items()}


_COMPILING = threading.RLock()


class Record(Codec):
    """A dataclass: a JSON object of its ``__init__`` fields. Its fields
    are compiled on first use (so a dataclass may contain itself)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        #: The channel name: the dotted path of the class.
        self.name = f"{cls.__module__}.{cls.__qualname__}"
        self._fields: list[tuple[str, Codec, bool]] | None = None
        self._compiling = False

    @property
    def fields(self) -> list[tuple[str, Codec, bool]]:
        """``(name, codec, required)`` of each field ``__init__`` takes."""
        if self._fields is None:
            # One thread compiles (others wait: an empty list would send an
            # empty payload); the compiling thread, reaching this class
            # again through its fields, gets an empty list for the moment.
            with _COMPILING:
                if self._fields is None and not self._compiling:
                    self._compiling = True
                    try:
                        self._fields = self._compile()
                    finally:
                        self._compiling = False
        return self._fields or []

    def _compile(self) -> list[tuple[str, Codec, bool]]:
        cls = self.cls
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:  # noqa: BLE001 - a NameError, mostly
            raise TypeError(f"cannot read the annotations of {self.name}: {exc}") from exc
        init_only = [name for name, hint in hints.items() if isinstance(hint, dataclasses.InitVar)]
        if init_only:
            raise TypeError(
                f"{self.name} has an init-only field ({init_only[0]!r}): a message "
                "carries the fields, which cannot give it back"
            )
        fields = []
        for f in dataclasses.fields(cls):
            if f.init:
                required = f.default is dataclasses.MISSING and (
                    f.default_factory is dataclasses.MISSING
                )
                where = f"{cls.__qualname__}.{f.name}"
                fields.append((f.name, codec(hints.get(f.name, Any), where), required))
        return fields

    def encode(self, value: Any, where: str) -> Any:
        if type(value) is not self.cls:
            raise TypeError(f"{where}: expected a {self.cls.__qualname__}, got {value!r}")
        return {
            name: c.encode(getattr(value, name), f"{where}.{name}") for name, c, _ in self.fields
        }

    def decode(self, value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object, got {value!r}")
        kwargs = {}
        for name, c, required in self.fields:
            if name in value:
                kwargs[name] = c.decode(value[name], f"{where}.{name}")
            elif required:
                raise ValueError(f"{where}: field {name!r} is missing")
        # Keys of no field are left out: a sender with a newer class.
        return self.cls(**kwargs)


@functools.cache
def record(cls: type) -> Record:
    """The one :class:`Record` of a dataclass."""
    return Record(cls)


def codec(hint: Any, where: str) -> Codec:
    """The codec of one annotation; ``TypeError`` for one typed channels
    do not carry."""
    if hint is Any:
        return AnyCodec()
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(others) != 1:
            raise TypeError(f"{where}: {hint} is not supported: of unions, only X | None is")
        return OptionalCodec(codec(others[0], where))
    if origin is not None or hint in (list, tuple, dict):
        return _generic(origin or hint, typing.get_args(hint), where, hint)
    if hint in _SCALARS:
        return _SCALARS[hint]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return EnumCodec(hint, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        nested = record(hint)
        nested.fields  # noqa: B018 - compile now: errors at notify()/on_message() time
        return nested
    raise TypeError(
        f"{where}: {hint!r} is not a type typed channels carry (str, int, float, bool, "
        "date, datetime, time, Decimal, UUID, enums, dataclasses, and list, tuple, "
        "dict[str, ...] and Optional of those)"
    )


def _generic(origin: Any, args: tuple[Any, ...], where: str, hint: Any) -> Codec:
    if origin is list:
        return ListCodec(list, [codec(args[0] if args else Any, where)], fixed=False)
    if origin is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return ListCodec(tuple, [codec(args[0] if args else Any, where)], fixed=False)
        return ListCodec(tuple, [codec(a, where) for a in args], fixed=True)
    if origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"{where}: dict keys must be str (JSON object keys), not {args[0]!r}")
        return DictCodec(codec(args[1] if args else Any, where))
    raise TypeError(f"{where}: {hint} is not supported: use list, tuple or dict[str, ...]")
