"""The listener: a reader thread, a bounded queue, a dispatcher thread.

The reader waits on the database connection and queues what arrives,
undecoded, so it stays cheap and leaves the CPU to the dispatcher, which
decodes and runs receivers with an app context pushed. A slow receiver
therefore never stops the reader from draining the connection: on
PostgreSQL a listener that stops reading holds back the server-wide
notification queue, and when that fills every notifying commit fails.

The queue holds ``DBNOTIFY_QUEUE_SIZE`` messages (PostgreSQL notifications
of up to ~8 kB of rows each, or SQLite journal rows). When it is full a
journaled backend simply stops reading (nothing is lost: the rows wait in
the journal); otherwise new messages are dropped and ``events_dropped``
reports how many events they held, in order, where they would have been.

A connection that answers queries may still receive no notifications (a
pooler in transaction or statement mode between it and the server). So on
connecting, and then when idle, the listener sends itself a notification
from another session, as real events come, and reports the connection as
deaf if it does not arrive in time.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from blinker import NamedSignal

from ._items import Lost, Notification
from ._log import RateLimited
from ._once import OnceRunner
from .backends import DEAF, Stream, reason
from .errors import DBNotifyError, ListenerError
from .events import ChangeEvent, Operation
from .signals import (
    events_dropped,
    listener_connected,
    listener_disconnected,
    notification_received,
    receiver_failed,
    row_changed,
    row_deleted,
    row_inserted,
    row_updated,
    table_truncated,
)

if TYPE_CHECKING:
    from .extension import _State

log = logging.getLogger(__name__)
_limited = RateLimited(log)


def _describe(error: BaseException) -> str:
    """``error`` as what the listener could not do: our errors say it
    themselves ("cannot connect to ...")."""
    if isinstance(error, DBNotifyError):
        return str(error)
    return f"could not start listening: {reason(error)}"


_OP_SIGNALS: dict[Operation, NamedSignal] = {
    Operation.INSERT: row_inserted,
    Operation.UPDATE: row_updated,
    Operation.DELETE: row_deleted,
}
_TRUNCATE = (table_truncated,)
#: Housekeeping runs at most this often (and twice per retention period).
_PRUNE_EVERY = 60.0
#: With durable watches, an idle dispatcher checks the journal this often;
#: with once receivers (retries are due on time), this often.
_CATCH_UP_EVERY = 5.0
_ONCE_EVERY = 1.0
#: After the hearing check made on connecting, an idle listener checks again
#: at most this often (while deaf, every probe interval): each check is a
#: NOTIFY, which wakes every listening session of the database.
_RECHECK_EVERY = 60.0


@dataclass(frozen=True)
class ListenerState:
    """A snapshot of one app's listener, from :meth:`DBNotify.listener_state`."""

    running: bool
    connected: bool
    #: When the current connection was made (``None`` while disconnected).
    connected_since: datetime | None
    #: Raw messages read from the database (a notification may hold many rows).
    received: int
    #: Events and application messages whose receivers have all run.
    dispatched: int
    #: Raw messages waiting for the dispatcher now.
    queued: int
    #: Events dropped because the queue was full.
    dropped: int
    reconnects: int
    last_error: str | None
    #: Events delivered from the journal rather than from a notification
    #: (durable watches, after a reconnect or a full queue).
    replayed: int = 0
    #: The connection answers queries but receives no notifications: the
    #: last hearing check (a notification the listener sends itself from
    #: another session, on connecting and then when idle) did not arrive
    #: within ``DBNOTIFY_CONNECT_TIMEOUT``. Typically a pooler in
    #: transaction or statement mode between the listener and the server.
    deaf: bool = False
    #: When a hearing check last arrived (``None`` before the first).
    heard_at: datetime | None = None


class _Signal:
    """A lifecycle signal queued between events, so receivers see it in order."""

    __slots__ = ("signal", "kwargs")

    def __init__(self, signal: NamedSignal, **kwargs: Any) -> None:
        self.signal = signal
        self.kwargs = kwargs


class _Run:
    """What one start() shares between its two threads. A thread left
    behind by a stop() that gave up keeps its own run, so it can neither
    touch the next run's queue nor be revived by the next start()."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.queue: deque[list[Any]] = deque()
        self.queued = 0
        self.ready = threading.Condition(threading.Lock())


#: Queue items that only ask the dispatcher for work: catch up with the
#: journal; check the triggers; prune. Housekeeping runs there so that the
#: reader never waits on anything but its own connection.
_CATCH_UP = _Signal(listener_connected)
_CHECK = _Signal(listener_connected)
_PRUNE = _Signal(listener_connected)


class _HearingCheck(_Signal):
    """Asks the dispatcher to send ``token`` to the stream's check channel;
    the reader waits for it on the stream from ``sent_at`` on."""

    __slots__ = ("channel", "token", "sent_at", "failed", "probed")

    def __init__(self, channel: str) -> None:
        super().__init__(listener_connected)
        self.channel = channel
        self.token = secrets.token_hex(8)
        self.sent_at: float | None = None
        self.failed = False
        self.probed = False


class Listener:
    """One app's listener threads and their queue."""

    def __init__(self, state: _State) -> None:
        self._state = state
        self._lock = threading.Lock()
        self._once = OnceRunner(state)
        self._feed = state.backend.feed()
        self._reset()
        self._received = self._dispatched = self._dropped = self._reconnects = 0
        self._replayed = 0
        self._connected_since: datetime | None = None
        self._last_error: str | None = None
        self._deaf = False
        self._heard_at: datetime | None = None
        # An outage is one warning (and its end one line), at most one a
        # minute however often the connection drops, with a count.
        self._outage_log = RateLimited(log, interval=60.0)
        self._deaf_log = RateLimited(log, interval=300.0)

    def _reset(self) -> None:
        """Fresh threads, pipe and queue (at init and after fork)."""
        self._reader: threading.Thread | None = None
        self._dispatcher: threading.Thread | None = None
        self._current = _Run()
        self._current.stop.set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stream: Stream | None = None
        self._check_pending = True
        self._first_attempt = threading.Event()
        self._first_error: BaseException | None = None
        self._first_raises = False

    @property
    def running(self) -> bool:
        thread = self._reader
        return thread is not None and thread.is_alive()

    def snapshot(self) -> ListenerState:
        return ListenerState(
            running=self.running,
            connected=self._stream is not None,
            connected_since=self._connected_since,
            received=self._received,
            dispatched=self._dispatched,
            queued=self._current.queued,
            dropped=self._dropped,
            reconnects=self._reconnects,
            last_error=self._last_error,
            replayed=self._replayed,
            deaf=self._deaf,
            heard_at=self._heard_at,
        )

    def start(self, timeout: float | None, raise_on_failure: bool) -> None:
        """Start the threads and wait for the first connection attempt."""
        with self._lock:
            if self.running and not self._current.stop.is_set():
                return
            self._discard_queue(self._current)
            run = self._current = _Run()
            self._first_attempt = threading.Event()
            self._first_error = None
            # start() raises the first failure itself: no warning for it.
            self._first_raises = raise_on_failure and (timeout is None or timeout > 0)
            self._check_pending = True
            name = self._state.app.name
            self._dispatcher = threading.Thread(
                target=self._dispatch_loop,
                args=(run,),
                name=f"dbnotify-dispatch[{name}]",
                daemon=True,
            )
            self._reader = threading.Thread(
                target=self._run, args=(run,), name=f"dbnotify-listener[{name}]", daemon=True
            )
            self._dispatcher.start()
            self._reader.start()
        if timeout is None or timeout > 0:
            answered = self._first_attempt.wait(timeout)
            error = self._first_error
            if error is not None and raise_on_failure:
                self.stop()
                raise ListenerError(f"the listener {_describe(error)}") from error
            if not answered and raise_on_failure:
                self.stop()
                raise ListenerError(f"the listener did not connect within {timeout:g}s")

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop both threads and close the connection; safe to call twice.

        The batch being delivered finishes; what is still queued is not
        delivered (a journaled backend, SQLite, delivers it after the next
        ``start()``)."""
        with self._lock:
            threads = [t for t in (self._reader, self._dispatcher) if t is not None]
            run = self._current
            run.stop.set()
            self.wake()
            with run.ready:
                run.ready.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            if thread is threading.current_thread():
                continue  # stop() from a receiver: the thread ends on return
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s still busy after %ss; left as a daemon", thread.name, timeout)

    def wake(self) -> None:
        """Interrupt the reader's wait (to stop, or to re-check triggers)."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # A full pipe wakes the reader just as well.

    def recheck_triggers(self) -> None:
        self._check_pending = True
        if self.running:
            self.wake()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's threads and connection."""
        stream = self._stream
        if stream is not None:
            stream.discard()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._lock = threading.Lock()
        self._once = OnceRunner(self._state)  # claims carry this process's pid
        self._feed = self._state.backend.feed()  # reads from now on, as a new listener
        self._reset()
        self._received = self._dispatched = self._dropped = self._reconnects = 0
        self._replayed = 0
        self._connected_since = None
        self._deaf, self._heard_at = False, None

    # -- the reader ---------------------------------------------------------

    def _run(self, run: _Run) -> None:
        state = self._state
        connected_before = False
        failures = 0  # since the last connection, a loss included (for the backoff)
        attempts = 0  # failed attempts to connect since the last connection
        reported = False  # whether this outage was warned about
        while not run.stop.is_set():
            try:
                stream = self._feed.open_stream(state.settings)
            except Exception as exc:  # noqa: BLE001 - any failure means retry
                self._last_error = str(exc)
                first = not self._first_attempt.is_set()
                if first:
                    self._first_error = exc
                    self._first_attempt.set()
                if not (first and self._first_raises):
                    said = f"{_describe(exc)} (retrying)"
                    reported = self._outage_log.warning("the listener %s", said) or reported
                failures += 1
                attempts += 1
                self._backoff(run, failures)
                continue
            self._stream = stream
            self._connected_since = datetime.now(UTC)
            if reported:
                # Ends the outage warned about, with its count of attempts.
                log.warning(
                    "the listener is connected to %s%s%s",
                    state.backend.listen_where,
                    " again" if connected_before else "",
                    f", after {attempts} failed attempt(s)" if attempts else "",
                )
            reported = False
            if connected_before:
                self._reconnects += 1
            failures = attempts = 0
            gap = connected_before and not (state.backend.durable_by_nature or self._all_durable())
            self._put(run, [_Signal(listener_connected, reconnect=connected_before, gap=gap)], 0)
            self._first_attempt.set()
            connected_before = True
            try:
                self._serve(run, stream)
            except Exception as exc:  # noqa: BLE001 - the connection is gone
                if run.stop.is_set():
                    break
                self._last_error = str(exc)
                where, why = state.backend.listen_where, reason(exc)
                said = f"lost its connection to {where}: {why} (reconnecting)"
                reported = self._outage_log.warning("the listener %s", said)
                self._put(run, [_Signal(listener_disconnected, error=exc)], 0)
                failures += 1
                self._backoff(run, failures)
            finally:
                if self._stream is stream:
                    self._stream = None
                    self._connected_since = None
                try:
                    stream.close()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass
        self._first_attempt.set()

    def _backoff(self, run: _Run, failures: int) -> None:
        cap = self._state.settings.reconnect_max_delay
        delay = min(cap, 0.05 * 2 ** min(failures, 16))
        run.stop.wait(delay * random.uniform(0.5, 1.0))

    def _serve(self, run: _Run, stream: Stream) -> None:
        settings = self._state.settings
        idle_limit = settings.probe_interval
        answer_within = settings.connect_timeout
        prune_every = min(_PRUNE_EVERY, settings.payload_retention / 2)
        last_seen = last_prune = last_check = time.monotonic()
        check = self._ask_hearing(run, stream)
        while True:
            if self._check_pending:
                self._check_pending = False
                self._put(run, [_CHECK], 0)
            timeout = min(idle_limit, prune_every)
            if check is not None and check.sent_at is not None:
                left = check.sent_at + answer_within - time.monotonic()
                timeout = max(0.0, min(timeout, left))
            stream.wait(timeout, self._wake_r)
            self._drain_wake()
            if run.stop.is_set():
                return
            raw = stream.read()
            now = time.monotonic()
            if raw:
                last_seen = now
                self._received += len(raw)
                self._put(run, raw, len(raw))
                # Notifications arrive, so a connection thought deaf may
                # hear after all: check again without waiting to be idle.
                if self._deaf and check is None and now - last_check >= idle_limit:
                    check = self._ask_hearing(run, stream)
            elif now - last_seen >= idle_limit:
                stream.probe()
                last_seen = now
                # Liveness first: a check cannot arrive during that query.
                recheck = idle_limit if self._deaf else _RECHECK_EVERY
                if check is None and now - last_check >= recheck:
                    check = self._ask_hearing(run, stream)
            if check is not None and self._judge_hearing(check, stream, now, answer_within):
                check, last_check = None, now
                stream.expect(None)
            if now - last_prune >= prune_every:
                last_prune = now
                self._put(run, [_PRUNE], 0)
            # An idle process keeps one connection: this one.
            self._state.backend.release_idle(idle_limit)

    def _ask_hearing(self, run: _Run, stream: Stream) -> _HearingCheck | None:
        """Have the dispatcher send the stream a hearing check, if it takes them."""
        if stream.check_channel is None:
            return None
        check = _HearingCheck(stream.check_channel)
        stream.expect(check.token)
        self._put(run, [check], 0)
        return check

    def _judge_hearing(
        self, check: _HearingCheck, stream: Stream, now: float, answer_within: float
    ) -> bool:
        """Settle ``check`` if it can be: whether it is done with."""
        if stream.heard():
            self._heard_at = datetime.now(UTC)
            if self._deaf:
                self._deaf = False
                where = self._state.backend.listen_where
                log.warning("the listener's connection to %s receives notifications again", where)
            return True
        if check.failed:
            return True  # Not sent: no verdict; another check comes later.
        if check.sent_at is None or now - check.sent_at < answer_within:
            return False
        if not check.probed:
            # Not arrived in time. If the connection were dead, that would
            # be why: the probe raises then, and the listener reconnects.
            # What the probe brought in is read on the next round.
            stream.probe()
            check.probed = True
            return False
        self._deaf = True
        self._deaf_log.warning(
            "the listener's connection to %s %s", self._state.backend.listen_where, DEAF
        )
        return True

    def _put(self, run: _Run, items: list[Any], count: int) -> None:
        """Queue ``items`` (``count`` of them raw messages, the rest signals)."""
        capacity = self._state.settings.queue_size
        durable = self._state.backend.durable_by_nature
        with run.ready:
            while durable and count and run.queued >= capacity and not run.stop.is_set():
                # Journaled: stop reading until there is room; nothing is lost.
                run.ready.wait(0.5)
            room = capacity - run.queued
            if count <= room or durable:
                run.queue.append(items)
                run.queued += count
                run.ready.notify()
                return
            kept, lost = items[: max(room, 0)], items[max(room, 0) :]
            if kept:
                run.queue.append(kept)
                run.queued += len(kept)
        events = sum(self._feed.count(raw) for raw in lost)
        self._dropped += events
        with run.ready:
            last = run.queue[-1] if run.queue else None
            if last and isinstance(last[-1], _Signal) and last[-1].signal is events_dropped:
                # Still overflowing: one report for the whole loss.
                last[-1].kwargs["count"] += events
            elif events:
                _limited.warning("dispatch queue full (%d messages): dropping events", capacity)
                run.queue.append([_Signal(events_dropped, count=events)])
            else:
                # Only durable notifications: replayed from the journal.
                run.queue.append([_CATCH_UP])
            run.ready.notify()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass

    def _check_triggers(self) -> None:
        state = self._state
        if not state.settings.check_triggers or not state.ext.watches:
            return
        try:
            # Watch states only: the health figures can take a while.
            status = state.backend.admin.status(list(state.ext.watches.values()), health=False)
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

    def _send_hearing_check(self, check: _HearingCheck) -> None:
        try:
            self._state.backend.send_check(check.channel, check.token)
        except Exception as exc:  # noqa: BLE001 - a check must not stop listening
            _limited.warning("could not send the listener's hearing check: %s", exc)
            check.failed = True
        else:
            check.sent_at = time.monotonic()
        self.wake()  # The reader's wait ends at the check's deadline.

    def _prune(self) -> None:
        try:
            self._feed.prune(self._state.settings.payload_retention)
        except Exception as exc:  # noqa: BLE001 - pruning is housekeeping
            log.warning("could not prune old payloads or journal rows: %s", exc)

    # -- the dispatcher -----------------------------------------------------

    def _all_durable(self) -> bool:
        watches = self._state.ext.watches.values()
        return bool(watches) and all(w.durable for w in watches)

    def _durable_in_use(self) -> bool:
        return self._feed.replaying() or any(w.durable for w in self._state.ext.watches.values())

    def _dispatch_loop(self, run: _Run) -> None:
        ready, queue = run.ready, run.queue
        while True:
            with ready:
                while not queue and not run.stop.is_set():
                    tick = _ONCE_EVERY if self._once.receivers() else _CATCH_UP_EVERY
                    if not ready.wait(tick) and self._durable_in_use():
                        break  # Idle: catch up below, then wait again.
                if run.stop.is_set():
                    break
                batch = queue.popleft() if queue else [_CATCH_UP]
            try:
                self._dispatch(run, batch)
            except Exception:  # noqa: BLE001 - never let the dispatcher die
                log.exception("dispatcher error; going on")
        self._discard_queue(run)

    def _discard_queue(self, run: _Run) -> None:
        """Forget what was read but not delivered; a journaled backend will
        read it again after the next start."""
        with run.ready:
            raw = [r for batch in run.queue for r in batch if not isinstance(r, _Signal)]
            run.queue.clear()
            run.queued = 0
        if raw:
            log.info("listener stopped with %d messages undelivered", len(raw))
            if run is self._current:
                self._feed.rewind(raw)

    def _dispatch(self, run: _Run, batch: list[Any]) -> None:
        subscriptions = self._state.ext.subscriptions
        feed = self._feed
        decode = feed.decode
        with self._state.app.app_context():
            for n, raw in enumerate(batch):
                if run.stop.is_set():
                    # Left for the next start (a journaled backend reads it
                    # again; durable rows are replayed).
                    if run is self._current:
                        feed.rewind([r for r in batch[n:] if not isinstance(r, _Signal)])
                    break
                try:
                    if isinstance(raw, _HearingCheck):
                        self._send_hearing_check(raw)
                    elif raw is _CHECK:
                        self._check_triggers()
                    elif raw is _PRUNE:
                        self._prune()
                    elif isinstance(raw, _Signal):
                        # Replay what the journal has and we missed before
                        # saying we are (re)connected or that events dropped.
                        if raw.signal is not listener_disconnected and self._durable_in_use():
                            self._catch_up(subscriptions)
                        if raw is not _CATCH_UP:
                            self._send_lifecycle(raw)
                    else:
                        self._deliver(decode(raw), subscriptions)
                except Exception:  # noqa: BLE001 - the dispatcher must go on
                    log.exception("could not dispatch %r; skipped", raw)
            if self._once.receivers():
                try:
                    self._once.run(run.stop)
                except Exception as exc:  # noqa: BLE001 - retried at the next tick
                    log.warning("could not run once receivers: %s", exc)
        with run.ready:
            run.queued -= sum(1 for raw in batch if not isinstance(raw, _Signal))
            run.ready.notify()

    def _catch_up(self, subscriptions: dict[str, Any]) -> None:
        try:
            items = self._feed.catch_up()
        except Exception as exc:  # noqa: BLE001 - retried at the next chance
            log.warning("could not replay the journal: %s", exc)
            return
        if items:
            self._replayed += len(items)
            log.info("replayed %d journaled events", len(items))
            self._deliver(items, subscriptions)

    def _deliver(self, items: list[Any], subscriptions: dict[str, Any]) -> None:
        watches = self._state.ext.watches
        for item in items:
            if isinstance(item, ChangeEvent):
                table = item.table
                if item.id is None and table in watches and watches[table].durable:
                    # A durable watch's triggers only ever send journal ids:
                    # anyone who can connect may send the rest.
                    _limited.warning(
                        "ignored a notification for durable watch %r without a journal id", table
                    )
                    continue
                op = item.op
                signals = _TRUNCATE if op is Operation.TRUNCATE else (_OP_SIGNALS[op], row_changed)
                for signal in signals:
                    if signal.receivers:
                        for receiver in signal.receivers_for(table):
                            self._call(receiver, item, table, event=item)
                for sub in subscriptions.get(table, ()):
                    if sub.matches(item):
                        if not sub.once:
                            self._call(sub.func, item, item)
                        elif item.id is not None:
                            self._once.offer(sub, item)
            elif isinstance(item, Notification):
                if item.id is None and not self._state.settings.fast_messages:
                    _limited.warning("ignored a message on %r that was not journaled", item.channel)
                    continue
                if notification_received.receivers:
                    for receiver in notification_received.receivers_for(item.channel):
                        self._call(receiver, item.payload, item.channel, payload=item.payload)
            elif isinstance(item, Lost):
                self._dropped += item.count
                self._send_lifecycle(_Signal(events_dropped, count=item.count))
                continue
            self._dispatched += 1

    def redeliver(self, event: ChangeEvent, receiver: str | None) -> None:
        """Deliver a journaled event again (``DBNotify.replay``): to signals
        and every on() receiver, or to the one named ``receiver``."""
        if receiver is None:
            self._deliver([event], {event.table: ()})
        for sub in self._state.ext.subscriptions.get(event.table, ()):
            if (receiver is None or sub.name == receiver) and sub.matches(event):
                if sub.once:
                    assert event.id is not None
                    self._once.claim_and_attempt(sub, event)
                else:
                    self._call(sub.func, event, event)

    def _call(
        self, receiver: Callable[..., Any], subject: Any, /, *args: Any, **kwargs: Any
    ) -> None:
        try:
            receiver(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - isolate receivers
            log.exception("receiver %r failed", receiver)
            app = self._state.app
            for failed in receiver_failed.receivers_for(app):
                try:
                    failed(app, receiver=receiver, event=subject, error=exc)
                except Exception:  # noqa: BLE001
                    log.exception("receiver_failed receiver %r failed", failed)

    def _send_lifecycle(self, item: _Signal) -> None:
        app = self._state.app
        for receiver in item.signal.receivers_for(app):
            try:
                receiver(app, **item.kwargs)
            except Exception:  # noqa: BLE001
                log.exception("%s receiver %r failed", item.signal.name, receiver)


def stop_all(listeners: list[Listener]) -> None:
    for listener in listeners:
        try:
            listener.stop(timeout=2.0)
        except Exception:  # noqa: BLE001 - interpreter exit
            pass
