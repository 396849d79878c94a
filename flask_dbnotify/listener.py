"""The listener thread: wait, read, dispatch, reconnect."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blinker import NamedSignal

from .backends import Item, Notification, Stream
from .errors import ListenerError
from .events import ChangeEvent, Operation
from .signals import (
    listener_connected,
    listener_disconnected,
    notification_received,
    receiver_failed,
    row_changed,
    row_deleted,
    row_inserted,
    row_updated,
)

if TYPE_CHECKING:
    from .extension import _State

log = logging.getLogger(__name__)

_OP_SIGNALS: dict[Operation, NamedSignal] = {
    Operation.INSERT: row_inserted,
    Operation.UPDATE: row_updated,
    Operation.DELETE: row_deleted,
}
#: Housekeeping runs at most this often (and twice per retention period).
_PRUNE_EVERY = 60.0


class Listener:
    """One app's listener: a daemon thread that owns a :class:`Stream`."""

    def __init__(self, state: _State) -> None:
        self._state = state
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stream: Stream | None = None
        self._check_pending = True
        self._first_attempt = threading.Event()
        self._first_error: BaseException | None = None

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self, timeout: float | None, raise_on_failure: bool) -> None:
        """Start the thread and wait for its first connection attempt."""
        with self._lock:
            if self.running:
                return
            self._stop.clear()
            self._first_attempt = threading.Event()
            self._first_error = None
            self._check_pending = True
            thread = threading.Thread(
                target=self._run,
                name=f"dbnotify-listener[{self._state.app.name}]",
                daemon=True,
            )
            self._thread = thread
            thread.start()
        if timeout is None or timeout > 0:
            self._first_attempt.wait(timeout)
            error = self._first_error
            if error is not None and raise_on_failure:
                self.stop()
                raise ListenerError(f"the listener could not connect: {error}") from error

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread and close its connection; safe to call twice."""
        with self._lock:
            thread = self._thread
            self._stop.set()
            self.wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("listener thread still busy after %.1fs; left as daemon", timeout)

    def wake(self) -> None:
        """Interrupt the thread's wait (to stop, or to re-check triggers)."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # A full pipe wakes the thread just as well.

    def recheck_triggers(self) -> None:
        self._check_pending = True
        if self.running:
            self.wake()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's thread and connection."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.discard()
        self._lock = threading.Lock()
        self._thread = None
        self._stop = threading.Event()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- the thread ---------------------------------------------------------

    def _run(self) -> None:
        state = self._state
        settings = state.settings
        connected_before = False
        failures = 0
        while not self._stop.is_set():
            try:
                stream = state.backend.open_stream(settings)
            except Exception as exc:  # noqa: BLE001 - any failure means retry
                if not self._first_attempt.is_set():
                    self._first_error = exc
                    self._first_attempt.set()
                log.warning("listener could not connect: %s", exc)
                failures += 1
                self._backoff(failures)
                continue
            self._stream = stream
            failures = 0
            gap = connected_before and not state.backend.durable_by_nature
            self._first_attempt.set()
            self._send_lifecycle(listener_connected, reconnect=connected_before, gap=gap)
            connected_before = True
            try:
                self._serve(stream)
            except Exception as exc:  # noqa: BLE001 - the connection is gone
                if self._stop.is_set():
                    break
                log.warning("listener lost its connection: %s", exc)
                self._send_lifecycle(listener_disconnected, error=exc)
                failures += 1
                self._backoff(failures)
            finally:
                self._stream = None
                try:
                    stream.close()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass
        self._first_attempt.set()

    def _backoff(self, failures: int) -> None:
        cap = self._state.settings.reconnect_max_delay
        delay = min(cap, 0.05 * 2 ** min(failures, 16))
        self._stop.wait(delay * random.uniform(0.5, 1.0))

    def _serve(self, stream: Stream) -> None:
        settings = self._state.settings
        idle_limit = settings.probe_interval
        prune_every = min(_PRUNE_EVERY, settings.payload_retention / 2)
        last_seen = last_prune = time.monotonic()
        while True:
            if self._check_pending:
                self._check_pending = False
                self._check_triggers()
            stream.wait(min(idle_limit, prune_every), self._wake_r)
            self._drain_wake()
            if self._stop.is_set():
                return
            items = stream.read()
            now = time.monotonic()
            if items:
                last_seen = now
                self._dispatch(items)
            elif now - last_seen >= idle_limit:
                stream.probe()
                last_seen = now
            if now - last_prune >= prune_every:
                last_prune = now
                self._prune()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def _check_triggers(self) -> None:
        state = self._state
        if not state.settings.check_triggers or not state.ext.watches:
            return
        try:
            status = state.backend.status(list(state.ext.watches.values()))
        except Exception as exc:  # noqa: BLE001 - a check must not stop listening
            log.warning("could not check triggers: %s", exc)
            return
        for name, value in status.watches.items():
            if value != "installed":
                detail = status.details.get(name, "")
                log.warning(
                    "triggers for %r are %s%s: run `flask dbnotify install-triggers`",
                    name,
                    value,
                    f" ({detail})" if detail else "",
                )

    def _prune(self) -> None:
        try:
            self._state.backend.prune(self._state.settings.payload_retention)
        except Exception as exc:  # noqa: BLE001 - pruning is housekeeping
            log.debug("could not prune stored payloads: %s", exc)

    # -- dispatch -----------------------------------------------------------

    def _dispatch(self, items: list[Item]) -> None:
        app = self._state.app
        subscriptions = self._state.ext.subscriptions
        with app.app_context():
            for item in items:
                if isinstance(item, ChangeEvent):
                    table = item.table
                    for signal in (_OP_SIGNALS[item.op], row_changed):
                        if signal.receivers:
                            for receiver in signal.receivers_for(table):
                                self._call(receiver, item, table, event=item)
                    for sub in subscriptions.get(table, ()):
                        if sub.matches(item):
                            self._call(sub.func, item, item)
                elif isinstance(item, Notification):
                    if notification_received.receivers:
                        for receiver in notification_received.receivers_for(item.channel):
                            self._call(receiver, item.payload, item.channel, payload=item.payload)

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

    def _send_lifecycle(self, signal: NamedSignal, **kwargs: Any) -> None:
        app = self._state.app
        with app.app_context():
            for receiver in signal.receivers_for(app):
                try:
                    receiver(app, **kwargs)
                except Exception:  # noqa: BLE001
                    log.exception("%s receiver %r failed", signal.name, receiver)


def stop_all(listeners: list[Listener]) -> None:
    for listener in listeners:
        try:
            listener.stop(timeout=2.0)
        except Exception:  # noqa: BLE001 - interpreter exit
            pass


__all__ = ["Listener", "ListenerError"]
