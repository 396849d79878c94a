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

This module holds the threads, start and stop, and the reader (connecting,
backoff, probing, housekeeping requests); the queue and its control items
are in ``_queue``, what the dispatcher does in ``_dispatch``, and the
hearing checks' verdicts in ``_hearing``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ._dispatch import Dispatcher
from ._hearing import Hearing
from ._log import RateLimited
from ._queue import Counts, HearingCheck, LifecycleSignal, Run, Task, Waker
from .backends import Stream, reason
from .errors import DBNotifyError, ListenerError
from .signals import listener_connected, listener_disconnected

if TYPE_CHECKING:
    from ._registry import Served

log = logging.getLogger(__name__)
_limited = RateLimited(log)


def _describe(error: BaseException) -> str:
    """``error`` as what the listener could not do: our errors say it
    themselves ("cannot connect to ...")."""
    if isinstance(error, DBNotifyError):
        return str(error)
    return f"could not start listening: {reason(error)}"


#: Housekeeping runs at most this often (and twice per retention period).
_PRUNE_EVERY = 60.0


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


class Listener:
    """One app's listener threads and their queue."""

    def __init__(self, served: Served) -> None:
        self._served = served
        self._lock = threading.Lock()
        self._hearing = Hearing(served.backend.listen_where)
        self._reset()
        self._last_error: str | None = None
        # An outage is one warning (and its end one line), at most one a
        # minute however often the connection drops, with a count.
        self._outage_log = RateLimited(log, interval=60.0)

    def _reset(self) -> None:
        """Fresh threads, pipe, queue and counters (at init and after fork)."""
        self._reader: threading.Thread | None = None
        self._dispatch_thread: threading.Thread | None = None
        self._current = Run()
        self._current.stop.set()
        self._waker = Waker()
        self._stream: Stream | None = None
        self._check_pending = True
        self._first_attempt = threading.Event()
        self._first_error: BaseException | None = None
        self._first_raises = False
        self._counts = Counts()
        self._connected_since: datetime | None = None
        self._hearing.reset()
        # Reads from now on: a forked child is a listener of its own.
        self._feed = self._served.backend.feed()
        # Claims of once receivers carry this process's pid: a new one after fork.
        self._dispatcher = Dispatcher(
            self._served,
            self._feed,
            self._counts,
            self.wake,
            lambda run: run is self._current,
        )

    @property
    def running(self) -> bool:
        thread = self._reader
        return thread is not None and thread.is_alive()

    def snapshot(self) -> ListenerState:
        return ListenerState(
            running=self.running,
            connected=self._stream is not None,
            connected_since=self._connected_since,
            received=self._counts.received,
            dispatched=self._counts.dispatched,
            queued=self._current.queued,
            dropped=self._counts.dropped,
            reconnects=self._counts.reconnects,
            last_error=self._last_error,
            replayed=self._counts.replayed,
            deaf=self._hearing.deaf,
            heard_at=self._hearing.heard_at,
        )

    def start(self, timeout: float | None, raise_on_failure: bool) -> None:
        """Start the threads and wait for the first connection attempt."""
        with self._lock:
            if self.running and not self._current.stop.is_set():
                return
            self._waker.open()
            self._dispatcher.discard(self._current)
            run = self._current = Run()
            self._first_attempt = threading.Event()
            self._first_error = None
            # start() raises the first failure itself: no warning for it.
            self._first_raises = raise_on_failure and (timeout is None or timeout > 0)
            self._check_pending = True
            name = self._served.app.name
            self._dispatch_thread = threading.Thread(
                target=self._dispatcher.loop,
                args=(run,),
                name=f"dbnotify-dispatch[{name}]",
                daemon=True,
            )
            self._reader = threading.Thread(
                target=self._run, args=(run,), name=f"dbnotify-listener[{name}]", daemon=True
            )
            self._dispatch_thread.start()
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
        ``start()``), but for what WAL capture's leader in this process
        relayed, which is delivered first, within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # First the feed's side work (WAL capture: the leader); then what it
        # wrote is delivered here, while this listener still listens.
        self._feed.close()
        listening = self._stream is not None and not self._current.stop.is_set()
        if listening and threading.current_thread() is not self._dispatch_thread:
            self._dispatcher.drain(deadline)  # Not from a receiver: it would wait for itself.
        with self._lock:
            threads = [t for t in (self._reader, self._dispatch_thread) if t is not None]
            run = self._current
            run.stop.set()
            self.wake()
            with run.ready:
                run.ready.notify_all()
        for thread in threads:
            if thread is threading.current_thread():
                continue  # stop() from a receiver: the thread ends on return
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s still busy after %ss; left as a daemon", thread.name, timeout)

    def wake(self) -> None:
        """Interrupt the reader's wait (to stop, or to re-check triggers)."""
        self._waker.wake()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop, and close what start() opens again (the app is closed)."""
        self.stop(timeout)
        if not self.running:
            self._waker.close()

    def recheck_triggers(self) -> None:
        self._check_pending = True
        if self.running:
            self.wake()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's threads and connection."""
        stream = self._stream
        if stream is not None:
            stream.discard()
        self._feed.discard()
        self._served.hub.renew()
        self._waker.discard()
        self._lock = threading.Lock()
        self._reset()

    def replay(self, since: int, until: int | None, receiver: str | None) -> int:
        """Deliver journaled events again, in this thread (``DBNotify.replay``)."""
        return self._dispatcher.replay(since, until, receiver)

    # -- the reader ---------------------------------------------------------

    def _run(self, run: Run) -> None:
        backend = self._served.backend
        connected_before = False
        failures = 0  # since the last connection, a loss included (for the backoff)
        attempts = 0  # failed attempts to connect since the last connection
        reported = False  # whether this outage was warned about
        while not run.stop.is_set():
            try:
                stream = self._feed.open_stream(self._served.settings)
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
                    backend.listen_where,
                    " again" if connected_before else "",
                    f", after {attempts} failed attempt(s)" if attempts else "",
                )
            reported = False
            if connected_before:
                self._counts.reconnects += 1
            failures = attempts = 0
            gap = connected_before and not (
                backend.durable_by_nature or self._served.registry.all_durable()
            )
            connected = LifecycleSignal(listener_connected, reconnect=connected_before, gap=gap)
            self._put(run, [connected], 0)
            self._first_attempt.set()
            connected_before = True
            try:
                self._serve(run, stream)
            except Exception as exc:  # noqa: BLE001 - the connection is gone
                if run.stop.is_set():
                    break
                self._last_error = str(exc)
                where, why = backend.listen_where, reason(exc)
                said = f"lost its connection to {where}: {why} (reconnecting)"
                reported = self._outage_log.warning("the listener %s", said)
                self._put(run, [LifecycleSignal(listener_disconnected, error=exc)], 0)
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

    def _backoff(self, run: Run, failures: int) -> None:
        cap = self._served.settings.reconnect_max_delay
        delay = min(cap, 0.05 * 2 ** min(failures, 16))
        run.stop.wait(delay * random.uniform(0.5, 1.0))

    def _serve(self, run: Run, stream: Stream) -> None:
        settings = self._served.settings
        idle_limit = settings.probe_interval
        answer_within = settings.connect_timeout
        prune_every = min(_PRUNE_EVERY, settings.payload_retention / 2)
        last_seen = last_prune = last_check = time.monotonic()
        check = self._ask_hearing(run, stream)
        while True:
            if self._check_pending:
                self._check_pending = False
                self._put(run, [Task.CHECK_TRIGGERS], 0)
            timeout = min(idle_limit, prune_every)
            if check is not None and check.sent_at is not None:
                left = check.sent_at + answer_within - time.monotonic()
                timeout = max(0.0, min(timeout, left))
            stream.wait(timeout, self._waker.fd)
            self._waker.drain()
            if run.stop.is_set():
                return
            raw = stream.read()
            now = time.monotonic()
            if raw:
                last_seen = now
                count = self._feed.received(raw)
                self._counts.received += count
                self._put(run, raw, count)
                # Notifications arrive, so a connection thought deaf may
                # hear after all: check again without waiting to be idle.
                if self._hearing.deaf and check is None and now - last_check >= idle_limit:
                    check = self._ask_hearing(run, stream)
            elif now - last_seen >= idle_limit:
                stream.probe()
                last_seen = now
                # Liveness first: a check cannot arrive during that query.
                recheck = self._hearing.recheck_after(idle_limit)
                if check is None and now - last_check >= recheck:
                    check = self._ask_hearing(run, stream)
            if check is not None and self._hearing.judge(check, stream, now, answer_within):
                check, last_check = None, now
                stream.expect(None)
            if now - last_prune >= prune_every:
                last_prune = now
                self._put(run, [Task.PRUNE], 0)
            # An idle process keeps one connection: this one.
            self._feed.release_idle(idle_limit)
            self._served.backend.release_idle(idle_limit)

    def _ask_hearing(self, run: Run, stream: Stream) -> HearingCheck | None:
        """Have the dispatcher send the stream a hearing check, if it takes them."""
        check = self._hearing.ask(stream)
        if check is not None:
            self._put(run, [check], 0)
        return check

    def _put(self, run: Run, items: list[Any], count: int) -> None:
        """Queue ``items``: ``count`` raw messages, or control items (``count`` 0)."""
        capacity = self._served.settings.queue_size
        lost = run.put(items, count, capacity, self._served.backend.durable_by_nature)
        if not lost:
            return
        events = sum(self._feed.count(raw) for raw in lost)
        self._counts.dropped += events
        if run.report_lost(events):
            _limited.warning("dispatch queue full (%d messages): dropping events", capacity)


def stop_all(listeners: list[Listener]) -> None:
    for listener in listeners:
        try:
            listener.stop(timeout=2.0)
        except Exception:  # noqa: BLE001 - interpreter exit
            pass
