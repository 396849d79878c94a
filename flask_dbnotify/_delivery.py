"""Sending one row event or message to its receivers: the one code path
of the listener's dispatcher and of :meth:`DBNotify.deliver
<flask_dbnotify.DBNotify.deliver>`, so a test that delivers an event by
hand sees what the listener would do with it.

The order is the documented one: the operation's signal and
``row_changed`` (or ``table_truncated``), then the ``on()`` receivers of
the table that match the event, in the order they were registered; for a
message, ``notification_received``, then the ``on_message()`` receivers
of its channel. Each receiver is isolated: one that raises is logged and
reported with ``receiver_failed``, and the others still run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from blinker import NamedSignal

from . import signals
from ._items import Notification
from .events import ChangeEvent, Operation

if TYPE_CHECKING:
    from flask import Flask

    from ._registry import OnceReceiver, Registry

# The listener's logger, as documented: receivers' failures are logged there.
log = logging.getLogger("flask_dbnotify.listener")

#: The signals of each operation, in the order they are sent.
_SIGNALS: dict[Operation, tuple[NamedSignal, ...]] = {
    Operation.INSERT: (signals.row_inserted, signals.row_changed),
    Operation.UPDATE: (signals.row_updated, signals.row_changed),
    Operation.DELETE: (signals.row_deleted, signals.row_changed),
    Operation.TRUNCATE: (signals.table_truncated,),
}

#: Connects to each row signal so far, and the (signal, table) pairs
#: found without receivers, with the count of connects then. Asking blinker
#: (receivers_for copies a set of ids) costs about half a µs per signal and
#: event when an app's row receivers are all for other tables; a pair can
#: only gain a receiver by a connect, so the answer holds until the count
#: moves.
_connects: dict[NamedSignal, int] = {}
_silent: dict[tuple[NamedSignal, str], int] = {}
#: Anyone may send events of any table name: what is kept is bounded.
_SILENT_MAX = 1024


_connects_lock = threading.Lock()


def _connected(signal: NamedSignal, **kwargs: Any) -> None:
    # Under a lock: a count that went back would revive a voided answer.
    with _connects_lock:
        _connects[signal] += 1


for _signal in {s for sent in _SIGNALS.values() for s in sent}:
    _connects[_signal] = 0
    _signal.receiver_connected.connect(_connected, weak=False)


def _send(signal: NamedSignal, app: Flask, event: ChangeEvent, table: str) -> None:
    """Send ``event`` to the receivers of ``signal`` for ``table``."""
    key = (signal, table)
    # The count from before the question: a connect meanwhile voids the answer.
    seen = _connects[signal]
    if _silent.get(key) == seen:
        return
    found = False
    for receiver in signal.receivers_for(table):
        found = True
        call(app, receiver, event, table, event=event)
    if not found:
        if len(_silent) >= _SILENT_MAX:
            _silent.clear()
        _silent[key] = seen


#: What to do with a once receiver that matches an event or a message: the
#: dispatcher offers it to its once runner, ``deliver()`` calls it.
OnceHandler = Callable[["OnceReceiver", Any], None]


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
    for signal in _SIGNALS[op]:
        if signal.receivers:
            _send(signal, app, event, table)
    if not on_receivers:
        return
    # The tuple of the table's receivers, and the operation checked here,
    # not in matches(): one function call fewer per receiver and event.
    for sub in registry.subscriptions.get(table, ()):
        if op in sub.operations and (not sub.where or sub.matches(event)):
            if sub.once:
                once(sub, event)
            else:
                handle(app, sub, event)


def deliver_message(
    app: Flask,
    registry: Registry,
    note: Notification,
    *,
    once: OnceHandler,
    on_receivers: bool = True,
) -> None:
    """Send ``note`` to ``notification_received`` and, unless
    ``on_receivers`` is false, to the ``on_message()`` receivers of its
    channel, handing once receivers to ``once``. Run inside ``app``'s
    application context."""
    if signals.notification_received.receivers:
        for receiver in signals.notification_received.receivers_for(note.channel):
            call(
                app,
                receiver,
                note.payload,
                note.channel,
                payload=note.payload,
                context=note.context,
            )
    if not on_receivers:
        return
    for sub in registry.messages_for(note.channel):
        if sub.once:
            once(sub, note)
        else:
            handle(app, sub, note)


def deliver_now(app: Flask, registry: Registry, items: Iterable[Any]) -> None:
    """``DBNotify.deliver()``: deliver events and messages in this thread,
    inside a new application context of ``app`` (as the dispatcher pushes
    one), once receivers called directly: there is no journal row to claim."""
    items = list(items)
    for item in items:
        if not isinstance(item, (ChangeEvent, Notification)):
            raise TypeError(
                "deliver() takes ChangeEvent objects (see make_event()) and typed "
                f"messages (dataclass instances), not {item!r}"
            )

    def run_once(sub: OnceReceiver, item: Any) -> None:
        handle(app, sub, item)

    with app.app_context():
        for item in items:
            if isinstance(item, ChangeEvent):
                deliver_event(app, registry, item, once=run_once)
            else:
                deliver_message(app, registry, item, once=run_once)


def handle(app: Flask, sub: OnceReceiver, item: Any) -> None:
    """Run an ``on()`` or ``on_message()`` receiver (a message is decoded
    first); if it raises, log it and send ``receiver_failed`` with the
    receiver's function and ``item``."""
    try:
        sub.handle(item)
    except Exception as exc:  # noqa: BLE001 - isolate receivers
        log.exception("receiver %r failed", sub.func)
        report(app, sub.func, item, exc)


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
        report(app, receiver, subject, exc)


def report(app: Flask, receiver: Callable[..., Any], subject: Any, error: Exception) -> None:
    """Send ``receiver_failed`` (sender ``app``), each of its receivers guarded."""
    for failed in signals.receiver_failed.receivers_for(app):
        try:
            failed(app, receiver=receiver, event=subject, error=error)
        except Exception:  # noqa: BLE001
            log.exception("receiver_failed receiver %r failed", failed)
