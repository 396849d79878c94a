"""The listener's dispatcher thread: what it does with the queue.

It decodes raw messages and delivers their events and messages to the
row signals, ``notification_received`` and ``on()`` receivers, each
receiver isolated from the others' failures; it sends the lifecycle
signals in order between them, runs the housekeeping the reader asks for
(catching up with the journal, checking the triggers, pruning, sending
hearing checks), and runs the once receivers. It also replays journaled
events for an operator (``DBNotify.replay``). How one event reaches its
receivers is in ``_delivery``, shared with ``DBNotify.deliver``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import signals
from ._delivery import deliver_event, deliver_message, handle
from ._items import Drained, Gap, Lost, Notification
from ._log import RateLimited
from ._once import OnceRunner
from ._queue import Counts, HearingCheck, LifecycleSignal, Run, Task, raw_only
from .events import ChangeEvent

if TYPE_CHECKING:
    from ._registry import OnceReceiver, Served
    from .backends import Claimable, Feed

# The listener's logger, as documented: receivers' failures are logged there.
log = logging.getLogger("flask_dbnotify.listener")
_limited = RateLimited(log)

#: With durable watches, an idle dispatcher checks the journal this often;
#: with once receivers (retries are due on time), this often.
_CATCH_UP_EVERY = 5.0
_ONCE_EVERY = 1.0
#: Raw messages decoded and delivered together by the dispatcher: what
#: every delivery looks up is looked up once for them, and a stop waits
#: for at most this many.
_CHUNK = 256
#: Items of a batch that are not raw messages.
_CONTROL = (HearingCheck, Task, LifecycleSignal)
#: Journal rows read at a time by replay().
_REPLAY_BATCH = 500


class Dispatcher:
    """One app's dispatcher: one per process, serving each run in turn."""

    def __init__(
        self,
        served: Served,
        feed: Feed,
        counts: Counts,
        wake: Callable[[], None],
        is_current: Callable[[Run], bool],
    ) -> None:
        self._served = served
        #: What this process's listener reads, and how far it has read.
        self._feed = feed
        self._counts = counts
        #: Interrupts the reader's wait.
        self._wake = wake
        #: Whether a run is the listener's latest (only that one may rewind).
        self._is_current = is_current
        # Claims carry this process's pid: a fork makes a new dispatcher.
        self._once = OnceRunner(served)
        #: The marker a stopping listener waits for, and its signal.
        self._drain: tuple[str, threading.Event] | None = None

    def drain(self, deadline: float | None) -> None:
        """From a stopping listener's thread, while this one still runs:
        have the feed send a marker through the stream, and wait (until
        ``deadline``) until it is delivered, and with it what came before
        (WAL capture: what this process's leader relayed)."""
        token = secrets.token_hex(16)
        done = threading.Event()
        self._drain = (token, done)
        try:
            if not self._feed.send_drain(token):
                return
        except Exception as exc:  # noqa: BLE001 - stopping goes on
            log.warning("could not deliver what this process relayed before stopping: %s", exc)
            return
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not done.wait(left):
            log.warning("stopped before delivering all that this process relayed")

    # -- the queue ----------------------------------------------------------

    def loop(self, run: Run) -> None:
        """The dispatcher thread: deliver ``run``'s queue until it stops."""
        ready, queue = run.ready, run.queue
        while True:
            with ready:
                while not queue and not run.stop.is_set():
                    once = bool(self._served.registry.once_receivers())
                    tick = _ONCE_EVERY if once else _CATCH_UP_EVERY
                    # Once receivers of messages need no durable watch.
                    if not ready.wait(tick) and (once or self._durable_in_use()):
                        break  # Idle: catch up below, then wait again.
                if run.stop.is_set():
                    break
                batch = queue.popleft() if queue else [Task.CATCH_UP]
            try:
                self._dispatch(run, batch)
            except Exception:  # noqa: BLE001 - never let the dispatcher die
                log.exception("dispatcher error; going on")
        self.discard(run)
        self._feed.release_idle(0.0)

    def discard(self, run: Run) -> None:
        """Forget what was read but not delivered; a journaled backend will
        read it again after the next start."""
        with run.ready:
            raw = [item for batch in run.queue for item in raw_only(batch)]
            run.queue.clear()
            run.queued = 0
        if raw:
            log.info("listener stopped with %d messages undelivered", len(raw))
            if self._is_current(run):
                self._feed.rewind(raw)

    def _dispatch(self, run: Run, batch: list[Any]) -> None:
        with self._served.app.app_context():
            self._run_batch(run, batch)
            if self._served.registry.once_receivers():
                try:
                    self._once.run(run.stop)
                except Exception as exc:  # noqa: BLE001 - retried at the next tick
                    log.warning("could not run once receivers: %s", exc)
        with run.ready:
            run.queued -= self._feed.received(raw_only(batch))
            run.ready.notify()

    def _run_batch(self, run: Run, batch: list[Any]) -> None:
        """Control items one by one; raw messages up to :data:`_CHUNK` at a
        time, delivered in the feed's pieces, so that what every delivery
        looks up is looked up once per piece, not per event."""
        start, end = 0, len(batch)
        while start < end:
            item = batch[start]
            if isinstance(item, _CONTROL):
                if self._stopped(run, batch[start:]):
                    return
                start += 1
                try:
                    self._control(item)
                except Exception:  # noqa: BLE001 - the dispatcher must go on
                    log.exception("could not dispatch %r; skipped", item)
                continue
            stop = start + 1
            while stop < end and stop - start < _CHUNK and not isinstance(batch[stop], _CONTROL):
                stop += 1
            try:
                for items in self._feed.pieces(batch[start:stop]):
                    if self._stopped(run, batch[start:]):
                        return
                    self._deliver(items)
            except Exception:  # noqa: BLE001 - find the one, keep the rest
                log.exception("could not dispatch a batch; going through it one by one")
                self._one_by_one(batch[start:stop])
            start = stop

    def _stopped(self, run: Run, rest: list[Any]) -> bool:
        """Whether the run was stopped: then ``rest`` is left for the next
        start (a journaled backend reads it again; durable rows are
        replayed)."""
        if not run.stop.is_set():
            return False
        if self._is_current(run):
            self._feed.rewind(raw_only(rest))
        return True

    def _one_by_one(self, raws: list[Any]) -> None:
        """Decode and deliver ``raws`` each on its own: one that fails is
        logged and skipped, and the others are delivered."""
        for raw in raws:
            try:
                items = self._feed.decode(raw)
            except Exception:  # noqa: BLE001 - the dispatcher must go on
                log.exception("could not dispatch %r; skipped", raw)
                continue
            self._deliver(items)

    def _control(self, item: HearingCheck | Task | LifecycleSignal) -> None:
        if isinstance(item, HearingCheck):
            self._send_hearing_check(item)
        elif item is Task.CHECK_TRIGGERS:
            self._check_triggers()
        elif item is Task.PRUNE:
            self._prune()
        elif item is Task.CATCH_UP:
            if self._durable_in_use():
                self._catch_up()
        elif isinstance(item, LifecycleSignal):
            # Replay what the journal has and we missed before saying we
            # are (re)connected or that events dropped.
            if item.signal is not signals.listener_disconnected and self._durable_in_use():
                self._catch_up()
            self._send_lifecycle(item)

    # -- housekeeping -------------------------------------------------------

    def _durable_in_use(self) -> bool:
        return self._feed.replaying() or self._served.registry.any_durable()

    def _catch_up(self) -> None:
        try:
            items = self._feed.catch_up()
        except Exception as exc:  # noqa: BLE001 - retried at the next chance
            log.warning("could not replay the journal: %s", exc)
            return
        if items:
            self._counts.replayed += len(items)
            log.info("replayed %d journaled events", len(items))
            self._deliver(items)

    def _check_triggers(self) -> None:
        watches = self._served.registry.watches
        if not self._served.settings.check_triggers or not watches:
            return
        try:
            # Watch states only: the health figures can take a while.
            status = self._served.backend.admin.status(list(watches.values()), health=False)
        except Exception as exc:  # noqa: BLE001 - a check must not stop listening
            log.warning("could not check triggers: %s", exc)
            return
        for name, value in status.watches.items():
            detail = status.details.get(name, "")
            if value == "error":
                # The watch does not match the database: the error says what to fix.
                log.warning("watch %r does not match the database: %s", name, detail)
            elif value != "installed":
                log.warning(
                    "triggers for %r are %s%s: run `flask dbnotify install-triggers`",
                    name,
                    "not installed" if value == "missing" else value,
                    f" ({detail})" if detail else "",
                )

    def _send_hearing_check(self, check: HearingCheck) -> None:
        try:
            self._served.backend.send_check(check.channel, check.token)
        except Exception as exc:  # noqa: BLE001 - a check must not stop listening
            _limited.warning("could not send the listener's hearing check: %s", exc)
            check.failed = True
        else:
            check.sent_at = time.monotonic()
        self._wake()  # The reader's wait ends at the check's deadline.

    def _prune(self) -> None:
        try:
            self._feed.prune(self._served.settings.payload_retention)
        except Exception as exc:  # noqa: BLE001 - pruning is housekeeping
            log.warning("could not prune old payloads or journal rows: %s", exc)

    # -- delivery -----------------------------------------------------------

    def _deliver(self, items: list[Any], on_receivers: bool = True) -> None:
        """Deliver decoded ``items`` to the signals and, unless told not
        to, the ``on()`` receivers and the streams."""
        # What every event needs, looked up once per batch (a notification
        # carries dozens): a few hundred ns an event otherwise.
        served = self._served
        app, registry, counts = served.app, served.registry, self._counts
        watches, once = registry.watches, self._offer_once
        by_nature = served.backend.durable_by_nature
        delivered: list[Any] = []
        for item in items:
            try:
                if isinstance(item, ChangeEvent):
                    if item.id is None and (by_nature or registry.is_durable(item.table)):
                        # A durable watch's triggers, and WAL capture's relay,
                        # only ever send journal ids: anyone who can connect
                        # may send the rest (or another app in triggers mode,
                        # on the same channel, for a table this one does not
                        # watch: not worth a line).
                        if item.table in watches:
                            _limited.warning(
                                "ignored a notification for durable watch %r without a journal id",
                                item.table,
                            )
                        continue
                    deliver_event(app, registry, item, once=once, on_receivers=on_receivers)
                elif isinstance(item, Notification):
                    if item.id is None and not served.settings.fast_messages:
                        _limited.warning(
                            "ignored a message on %r that was not journaled", item.channel
                        )
                        continue
                    deliver_message(app, registry, item, once=once, on_receivers=on_receivers)
                else:
                    self._note(item)
                    continue
            except Exception:  # noqa: BLE001 - the dispatcher must go on
                log.exception("could not dispatch %r; skipped", item)
                continue
            delivered.append(item)
        counts.dispatched += len(delivered)
        if on_receivers:
            served.hub.publish(delivered)

    def _note(self, item: Lost | Gap | Drained) -> None:
        """What a feed yields besides events and messages."""
        if isinstance(item, Lost):
            self._counts.dropped += item.count
            self._send_lifecycle(LifecycleSignal(signals.events_dropped, count=item.count))
        elif isinstance(item, Gap):
            log.warning("events may have been missed: %s", item.reason)
            connected = signals.listener_connected
            self._send_lifecycle(LifecycleSignal(connected, reconnect=True, gap=True))
        else:
            drain = self._drain
            if drain is not None and drain[0] == item.token:
                drain[1].set()

    def _offer_once(self, sub: OnceReceiver, event: Claimable) -> None:
        # Only a journaled event can be claimed; the others are not offered.
        if event.id is not None:
            self._once.offer(sub, event)
        else:
            # Row events of durable watches always are: a message, then.
            _limited.warning(
                "once receiver %s did not get a message on %r: it was not journaled "
                "(send it with notify(..., durable=True))",
                sub.name,
                getattr(event, "channel", "?"),
            )

    def replay(self, since: int, until: int | None, receiver: str | None) -> int:
        """Deliver journaled events and messages from id ``since`` (to
        ``until``) again, in this thread: to signals and every ``on()`` and
        ``on_message()`` receiver, or to the one named ``receiver``. How
        many were replayed."""
        replayed = 0
        with self._served.app.app_context():
            while until is None or since <= until:
                items, last = self._served.backend.journal(since, _REPLAY_BATCH)
                if last is None:
                    break
                for event in items:
                    if not isinstance(event, (ChangeEvent, Notification)) or event.id is None:
                        continue
                    if until is None or event.id <= until:
                        self._redeliver(event, receiver)
                        replayed += 1
                since = last + 1
        return replayed

    def _redeliver(self, item: ChangeEvent | Notification, receiver: str | None) -> None:
        if receiver is None:
            self._deliver([item], on_receivers=False)
        registry = self._served.registry
        subs: list[OnceReceiver]
        if isinstance(item, ChangeEvent):
            subs = [s for s in registry.subscriptions_for(item.table) if s.matches(item)]
        else:
            subs = [s for s in registry.messages_for(item.channel) if s.matches(item)]
        for sub in subs:
            if receiver is None or sub.name == receiver:
                if sub.once:
                    self._once.claim_and_attempt(sub, item)
                else:
                    handle(self._served.app, sub, item)

    def _send_lifecycle(self, item: LifecycleSignal) -> None:
        if item.signal is signals.events_dropped:
            self._served.hub.publish([Gap(f"{item.kwargs['count']} events were dropped")])
        elif item.kwargs.get("gap"):
            self._served.hub.publish([Gap("changes may have been missed")])
        app = self._served.app
        for receiver in item.signal.receivers_for(app):
            try:
                receiver(app, **item.kwargs)
            except Exception:  # noqa: BLE001
                log.exception("%s receiver %r failed", item.signal.name, receiver)
