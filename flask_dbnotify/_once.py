"""Exactly-once receivers: ``DBNotify.on(..., once=True)``.

Each process's dispatcher runs :meth:`OnceRunner.run` after deliveries and
on an idle tick. For every once-receiver it reads the journal past the
receiver's watermark, claims the events in one statement (the primary key
(receiver, event id) lets exactly one process win each), moves the
watermark, then runs the events it won. A receiver that raises is retried
with exponential backoff up to ``DBNOTIFY_ONCE_ATTEMPTS`` times, then
marked failed (kept for inspection) and reported with ``receiver_failed``.
A claim whose process died is taken over after ``DBNOTIFY_ONCE_LEASE``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

from .events import ChangeEvent
from .signals import receiver_failed

if TYPE_CHECKING:
    from ._registry import Served
    from ._watch import Subscription
    from .backends import OnceStore

log = logging.getLogger(__name__)

_BATCH = 500
_MAX_RETRY_DELAY = 300.0


def register(store: OnceStore, names: list[str]) -> None:
    """Make the journal keep events for the once receivers ``names`` from
    now on, whether or not a process runs them yet."""
    if names:
        store.register(names)


class OnceRunner:
    def __init__(self, served: Served) -> None:
        self.served = served
        self.store = served.backend.once
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.registered: set[str] = set()
        # Events that arrived live since the last run(): claimed first, so
        # a long transaction elsewhere (which holds back the journal scan)
        # does not hold them back.
        self.offered: list[tuple[Subscription, ChangeEvent]] = []

    def offer(self, sub: Subscription, event: ChangeEvent) -> None:
        self.offered.append((sub, event))

    def run(self, stop: threading.Event) -> None:
        """Claim and run whatever is due; called on the dispatcher thread
        with an app context pushed. When ``stop`` is set, claims not yet
        run are given back, so another process takes them at once."""
        receivers = self.served.registry.once_receivers()
        if not receivers:
            return
        self.register_new(receivers)
        if not self.run_offered(receivers, stop):
            return
        for table, sub in receivers:
            if not self.scan(table, sub, stop) or not self.take_over_due(sub, stop):
                return

    def register_new(self, receivers: list[tuple[str, Subscription]]) -> None:
        """Register the receivers this process has not registered yet."""
        names = {sub.name for _, sub in receivers}
        if not names <= self.registered:
            register(self.store, sorted(names - self.registered))
            self.registered |= names

    def run_offered(self, receivers: list[tuple[str, Subscription]], stop: threading.Event) -> bool:
        """Claim what arrived live and run what this process won; False
        if ``stop`` was set meanwhile."""
        offered, self.offered = self.offered, []
        by_receiver: dict[str, list[ChangeEvent]] = {}
        subs = {sub.name: sub for _, sub in receivers}
        for sub, event in offered:
            by_receiver.setdefault(sub.name, []).append(event)
        for name, events in by_receiver.items():
            won = self.store.claim(name, [e.id for e in events if e.id], self.worker)
            if not self.attempt_all(subs[name], [e for e in events if e.id in won], stop):
                return False
        return True

    def scan(self, table: str, sub: Subscription, stop: threading.Event) -> bool:
        """Claim and run the journal's events of ``table`` past the
        receiver's watermark, moving it on; False if ``stop`` was set."""
        store = self.store
        while True:
            events, cursor = store.scan(sub.name, [table], _BATCH)
            wanted = [e for e in events if sub.matches(e)]
            won = store.claim(sub.name, [e.id for e in wanted if e.id], self.worker)
            store.advance(sub.name, cursor)
            if not self.attempt_all(sub, [e for e in wanted if e.id in won], stop):
                return False
            if len(events) < _BATCH:
                return True

    def take_over_due(self, sub: Subscription, stop: threading.Event) -> bool:
        """Retry this process's failed events that are due, and take over
        claims whose lease ran out; False (with the rest given back) if
        ``stop`` was set."""
        store = self.store
        due_now = store.due(sub.name, self.worker, self.served.settings.once_lease, _BATCH)
        for n, (event_id, attempt, due) in enumerate(due_now):
            if stop.is_set():
                store.release(sub.name, [i for i, _, _ in due_now[n:]])
                return False
            if due is None:
                store.finish(sub.name, event_id, "journal row is gone", None)
            else:
                self.attempt(sub, due, attempt)
        return True

    def attempt_all(
        self, sub: Subscription, events: list[ChangeEvent], stop: threading.Event
    ) -> bool:
        """First attempts of events this process claimed; False (with the
        rest given back) if ``stop`` is set meanwhile."""
        for n, event in enumerate(events):
            if stop.is_set():
                self.store.release(sub.name, [e.id for e in events[n:] if e.id])
                return False
            self.attempt(sub, event, 1)
        return True

    def claim_and_attempt(self, sub: Subscription, event: ChangeEvent) -> None:
        """Run a once receiver for an operator's replay: claim the event if
        nobody has, then attempt it whatever its claim said."""
        assert event.id is not None
        self.store.reset(sub.name, event.id, self.worker)
        self.attempt(sub, event, 1)

    def attempt(self, sub: Subscription, event: ChangeEvent, attempt: int) -> None:
        assert event.id is not None
        store, settings = self.store, self.served.settings
        try:
            sub.func(event)
        except Exception as exc:  # noqa: BLE001 - recorded, retried, reported
            error = f"{type(exc).__name__}: {exc}"
            if attempt < settings.once_attempts:
                delay = min(settings.once_retry_delay * 2 ** (attempt - 1), _MAX_RETRY_DELAY)
                log.warning(
                    "once receiver %s failed on event %s (attempt %d); retrying in %.1fs: %s",
                    sub.name,
                    event.id,
                    attempt,
                    delay,
                    error,
                )
                store.finish(sub.name, event.id, error, delay)
                return
            log.error(
                "once receiver %s failed on event %s after %d attempts: %s",
                sub.name,
                event.id,
                attempt,
                error,
            )
            store.finish(sub.name, event.id, error, None)
            app = self.served.app
            for failed in receiver_failed.receivers_for(app):
                try:
                    failed(app, receiver=sub.func, event=event, error=exc)
                except Exception:  # noqa: BLE001
                    log.exception("receiver_failed receiver %r failed", failed)
            return
        store.finish(sub.name, event.id, None, None)
