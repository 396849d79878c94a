"""What one :class:`~flask_dbnotify.DBNotify` watches and who receives it:
the watches and ``on()`` receivers, kept consistent with each other, and
the questions the listener and the once runner ask of them.

Independent of any app or database: every app the extension is registered
on shares its one registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._channels import MessageSubscription
from ._watch import Subscription, Target, Watch
from .events import Operation

if TYPE_CHECKING:
    from flask import Flask

    from ._settings import Settings
    from ._stream import Hub
    from .backends import Backend


#: A receiver a once runner runs: of row events, or of a typed channel.
OnceReceiver = Subscription | MessageSubscription


class Registry:
    """Watches by name, the ``on()`` receivers of each watched name, and
    the ``on_message()`` receivers of each typed channel."""

    def __init__(self) -> None:
        self.watches: dict[str, Watch] = {}
        self.subscriptions: dict[str, tuple[Subscription, ...]] = {}
        self.messages: dict[str, tuple[MessageSubscription, ...]] = {}

    # -- what the listener and the once runner ask ------------------------

    def subscriptions_for(self, table: str) -> tuple[Subscription, ...]:
        return self.subscriptions.get(table, ())

    def messages_for(self, channel: str) -> tuple[MessageSubscription, ...]:
        return self.messages.get(channel, ())

    def once_receivers(self) -> list[tuple[str, OnceReceiver]]:
        """``(watched name or channel, receiver)`` for every once receiver."""
        kept: list[tuple[str, OnceReceiver]] = []
        for by_name in (self.subscriptions, self.messages):
            kept += [(name, sub) for name, subs in by_name.items() for sub in subs if sub.once]
        return kept

    def once_names(self) -> list[str]:
        """The once receivers' names, sorted."""
        return sorted({sub.name for _, sub in self.once_receivers()})

    def receiver_names(self) -> list[str]:
        """The names of every ``on()`` and ``on_message()`` receiver, sorted."""
        found = {sub.name for subs in self.subscriptions.values() for sub in subs}
        found.update(sub.name for subs in self.messages.values() for sub in subs)
        return sorted(found)

    def all_durable(self) -> bool:
        """Whether there are watches and every one is durable."""
        watches = self.watches.values()
        return bool(watches) and all(w.durable for w in watches)

    def any_durable(self) -> bool:
        return any(w.durable for w in self.watches.values())

    def is_durable(self, name: str) -> bool:
        watch = self.watches.get(name)
        return watch is not None and watch.durable

    # -- what watch() and on() record -------------------------------------

    def add_watch(self, watch: Watch) -> None:
        """Record an explicit watch, replacing an implicit one."""
        existing = self.watches.get(watch.name)
        if existing is not None and not existing.implicit:
            raise ValueError(
                f"{watch.name!r} is already watched: pass all options in one watch() call"
            )
        for sub in self.subscriptions_for(watch.name):
            check_subscription(watch, sub)
        self.watches[watch.name] = watch

    def check_once_name(self, sub: OnceReceiver) -> None:
        """A once receiver needs a name of its own: processes recognise it by it."""
        if "<lambda>" in sub.name or not hasattr(sub.func, "__qualname__"):
            raise ValueError(
                "once=True needs a named function: processes recognise a "
                "receiver by its qualified name"
            )
        if sub.name in self.once_names():
            raise ValueError(
                f"a once receiver named {sub.name!r} exists already: processes "
                "recognise a receiver by its qualified name, so give it another"
            )

    def watch_for(self, target: Target, name: str, once: bool) -> tuple[Watch, bool]:
        """The watch of ``name`` an ``on()`` receiver goes with, made (with
        the defaults) or made durable for a once receiver if it is implicit;
        and whether the watches changed."""
        watch = self.watches.get(name)
        if watch is None:
            watch = self.watches[name] = Watch.create(target, durable=once, implicit=True)
            return watch, True
        if once and not watch.durable:
            if not watch.implicit:
                raise ValueError(f"once=True needs a durable watch: watch({name!r}, durable=True)")
            watch = self.watches[name] = Watch.create(target, durable=True, implicit=True)
            return watch, True
        return watch, False

    def subscribe(self, watch: Watch, sub: Subscription) -> None:
        check_subscription(watch, sub)
        self.subscriptions[watch.name] = (*self.subscriptions_for(watch.name), sub)

    def subscribe_message(self, sub: MessageSubscription) -> None:
        self.messages[sub.channel] = (*self.messages_for(sub.channel), sub)


def check_where_columns(name: str, table: Any, sub: Subscription) -> None:
    """``where=`` names only columns ``table`` (a ``sqlalchemy.Table``) has."""
    for col, _ in sub.where:
        if col not in table.columns:
            raise ValueError(f"where= uses column {col!r}, which table {name!r} does not have")


def check_subscription(watch: Watch, sub: Subscription) -> None:
    """``sub`` gets what it asks for from ``watch``."""
    if sub.once and not watch.durable:
        raise ValueError(f"once=True needs a durable watch: watch({watch.name!r}, durable=True)")
    # Every watched table reports TRUNCATE.
    missing = sub.operations - set(watch.operations) - {Operation.TRUNCATE}
    if missing:
        names = ", ".join(sorted(op.value.lower() for op in missing))
        raise ValueError(
            f"{watch.name!r} is not watched for {names}: add it to watch(operations=...)"
        )
    for col, _ in sub.where:
        if watch.columns is not None and col not in watch.columns:
            raise ValueError(
                f"where= uses column {col!r}, which the watch of {watch.name!r} does not "
                "carry: add it to watch(columns=...)"
            )


@dataclass(frozen=True)
class Served:
    """One app as its listener, dispatcher and once runner see it: the app
    (for its context and the lifecycle signals), its settings, its backend,
    and the registry of what its extension watches."""

    app: Flask
    settings: Settings
    backend: Backend
    registry: Registry
    #: What the dispatcher delivered lately, for this process's streams.
    hub: Hub
