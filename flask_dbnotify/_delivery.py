"""Sending one row event to its receivers: the one code path of the
listener's dispatcher and of :meth:`DBNotify.deliver
<flask_dbnotify.DBNotify.deliver>`, so a test that delivers an event by
hand sees what the listener would do with it.

The order is the documented one: the operation's signal and
``row_changed`` (or ``table_truncated``), then the ``on()`` receivers of
the table that match the event, in the order they were registered. Each
receiver is isolated: one that raises is logged and reported with
``receiver_failed``, and the others still run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from blinker import NamedSignal

from . import signals
from .events import ChangeEvent, Operation

if TYPE_CHECKING:
    from flask import Flask

    from ._registry import Registry
    from ._watch import Subscription

# The listener's logger, as documented: receivers' failures are logged there.
log = logging.getLogger("flask_dbnotify.listener")

_OP_SIGNALS: dict[Operation, NamedSignal] = {
    Operation.INSERT: signals.row_inserted,
    Operation.UPDATE: signals.row_updated,
    Operation.DELETE: signals.row_deleted,
}
_TRUNCATE = (signals.table_truncated,)

#: What to do with a once receiver that matches an event: the dispatcher
#: offers it to its once runner, ``deliver()`` calls it.
OnceHandler = Callable[["Subscription", ChangeEvent], None]


def deliver_event(
    app: Flask,
    registry: Registry,
    event: ChangeEvent,
    *,
    once: OnceHandler,
    on_receivers: bool = True,
) -> None:
    """Send ``event`` to the row signals and, unless ``on_receivers`` is
    false, to the matching ``on()`` receivers of ``registry``, handing
    once receivers to ``once``. Run inside ``app``'s application context."""
    table, op = event.table, event.op
    sent = _TRUNCATE if op is Operation.TRUNCATE else (_OP_SIGNALS[op], signals.row_changed)
    for signal in sent:
        if signal.receivers:
            for receiver in signal.receivers_for(table):
                call(app, receiver, event, table, event=event)
    if not on_receivers:
        return
    for sub in registry.subscriptions_for(table):
        if sub.matches(event):
            if sub.once:
                once(sub, event)
            else:
                call(app, sub.func, event, event)


def deliver_now(app: Flask, registry: Registry, events: Iterable[Any]) -> None:
    """``DBNotify.deliver()``: deliver ``events`` in this thread, inside a
    new application context of ``app`` (as the dispatcher pushes one), once
    receivers called directly: there is no journal row to claim."""
    events = list(events)
    for event in events:
        if not isinstance(event, ChangeEvent):
            raise TypeError(
                f"deliver() takes ChangeEvent objects (see make_event()), not {event!r}"
            )

    def run_once(sub: Subscription, event: ChangeEvent) -> None:
        call(app, sub.func, event, event)

    with app.app_context():
        for event in events:
            deliver_event(app, registry, event, once=run_once)


def call(
    app: Flask, receiver: Callable[..., Any], subject: Any, /, *args: Any, **kwargs: Any
) -> None:
    """Run one receiver with ``args`` and ``kwargs``; if it raises, log it
    and send ``receiver_failed`` (sender ``app``) with ``subject`` as the
    event."""
    try:
        receiver(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - isolate receivers
        log.exception("receiver %r failed", receiver)
        for failed in signals.receiver_failed.receivers_for(app):
            try:
                failed(app, receiver=receiver, event=subject, error=exc)
            except Exception:  # noqa: BLE001
                log.exception("receiver_failed receiver %r failed", failed)
