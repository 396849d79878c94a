"""Typed channels: a dataclass as an application message.

A channel is a dataclass. On the wire it is an ordinary message: the
channel name is the class's dotted path (``module.QualName``) and the
payload a JSON object of its fields, so ``notification_received`` sees it
as any other message. :func:`outgoing` turns what ``notify()`` was given
into a name and a JSON value, refusing before anything is sent what the
receivers could not read back; :meth:`MessageSubscription.handle` is the
one place a payload is turned back into an instance, for
``on_message()`` receivers. The type mapping is :mod:`._codecs`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from . import _payload
from ._codecs import Record, record
from ._items import Notification
from ._watch import receiver_name
from .events import ChangeEvent

if TYPE_CHECKING:
    from ._registry import Registry

F = TypeVar("F", bound=Callable[..., Any])

#: What ``notify()`` binds to its own parameters: a channel with a field of
#: one of these names cannot take it as a keyword argument, only in an
#: instance (``notify(Channel(durable=...))``).
RESERVED = ("self", "channel", "payload", "connection", "durable", "app")


# -- channels -------------------------------------------------------------------


def _import(path: str) -> Any:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = path.split(".")
    for n in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:n])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # not a module: try a shorter path
            raise
        try:
            for attr in parts[n:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ValueError(
        f"cannot import channel {path!r}: fields as keyword arguments are for a typed "
        "channel, named by its class or its dotted path (module.Class)"
    )


def resolve(spec: Any) -> Record:
    """The channel of a dataclass or of its dotted path; ``TypeError`` for
    anything else, or a class whose fields typed channels do not carry."""
    cls = _import(spec) if isinstance(spec, str) else spec
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"a typed channel is a dataclass (or its dotted path), not {spec!r}")
    found = record(cls)
    found.fields  # noqa: B018 - compile now, to fail here
    return found


def _from_fields(found: Record, fields: Mapping[str, Any]) -> Any:
    """An instance of the channel, from ``notify()``'s keyword arguments."""
    names = {name for name, _, _ in found.fields}
    title = found.cls.__qualname__
    taken = sorted(names.intersection(RESERVED))
    if taken:
        raise TypeError(
            f"{title} has a field named {taken[0]!r}, which notify() takes as its own "
            f"argument: send an instance instead, notify({title}(...))"
        )
    unknown = sorted(set(fields) - names)
    if unknown:
        raise TypeError(
            f"{title} has no field {', '.join(map(repr, unknown))} "
            f"(its fields: {', '.join(sorted(names)) or 'none'})"
        )
    missing = [name for name, _, required in found.fields if required and name not in fields]
    if missing:
        raise TypeError(f"{title} needs field {', '.join(map(repr, missing))}")
    return found.cls(**fields)


def outgoing(target: Any, payload: Any, fields: Mapping[str, Any]) -> tuple[str, Any]:
    """What ``notify(target, payload, **fields)`` sends: the channel name
    and the JSON value of the payload. An untyped ``notify(name, payload)``
    is passed through; a typed one is checked and encoded, raising
    ``TypeError`` (or ``ValueError``) before anything is sent."""
    if isinstance(target, str) and not fields:
        return target, payload
    if isinstance(target, str) and payload is not None:
        raise TypeError(
            f"notify() got keyword arguments {', '.join(sorted(fields))} beside a payload: "
            "fields go with a typed channel (a dataclass, or its dotted path), a payload "
            "with an untyped one"
        )
    if payload is not None:
        raise TypeError(
            "a typed channel takes its fields as keyword arguments or in an instance, "
            "not a payload: notify(Channel, field=...) or notify(Channel(...))"
        )
    if is_message(target):
        if fields:
            raise TypeError("notify() takes an instance or fields as keywords, not both")
        cls: type = type(target)
        found = record(cls)
        instance: Any = target
    else:
        found = resolve(target)
        instance = _from_fields(found, fields)
    return found.name, found.encode(instance, found.cls.__qualname__)


def is_message(value: Any) -> bool:
    """Whether ``value`` is a typed message: a dataclass instance, other
    than the events and messages the listener delivers."""
    if isinstance(value, (type, ChangeEvent, Notification)):
        return False
    return dataclasses.is_dataclass(value)


def as_notification(message: Any) -> Notification:
    """A typed message as the listener would read it off the wire (for
    ``DBNotify.deliver()``): encoded and decoded again."""
    name, payload = outgoing(message, None, {})
    (item,) = _payload.decode(_payload.encode_message(name, payload))
    assert isinstance(item, Notification)
    return item


# -- receivers ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MessageSubscription:
    """A receiver registered with ``DBNotify.on_message()``."""

    func: Callable[..., Any]
    record: Record
    #: Exactly one process runs it per journaled message (``once=True``).
    once: bool
    #: The receiver's identity across processes: its qualified name.
    name: str
    #: It takes the sending transaction's context (a ``context`` parameter).
    wants_context: bool = False

    @property
    def channel(self) -> str:
        return self.record.name

    def matches(self, item: Any) -> bool:
        return isinstance(item, Notification) and item.channel == self.record.name

    def handle(self, item: Notification) -> None:
        """Decode the message (the one place this happens) and run the receiver."""
        message = self.record.decode(item.payload, self.record.cls.__qualname__)
        if self.wants_context:
            self.func(message, context=item.context)
        else:
            self.func(message)


def takes_context(func: Callable[..., Any]) -> bool:
    """Whether ``func`` has a ``context`` parameter (or ``**kwargs``)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return any(p.name == "context" or p.kind is p.VAR_KEYWORD for p in params)


def subscriber(registry: Registry, spec: Any, once: bool) -> Callable[[F], F]:
    """``DBNotify.on_message(spec, once=once)``: the decorator that
    registers a receiver of the channel ``spec`` (a dataclass or its
    dotted path), checked now."""
    found = resolve(spec)

    def decorator(func: F) -> F:
        if not callable(func):
            raise TypeError(f"on_message() decorates a callable, not {func!r}")
        sub = MessageSubscription(func, found, once, receiver_name(func), takes_context(func))
        if once:
            registry.check_once_name(sub)
        registry.subscribe_message(sub)
        return func

    return decorator
