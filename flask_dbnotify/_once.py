"""Exactly-once receivers: ``DBNotify.on(..., once=True)``, and
``DBNotify.on_message(..., once=True)`` for journaled typed messages.

Each process's dispatcher runs :meth:`OnceRunner.run` after deliveries and
on an idle tick. For every once-receiver it reads the journal past the
receiver's watermark (the row events of its watch, or the messages of its
channel), claims the events in one statement (the primary key
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
from typing import TYPE_CHECKING, Any

from ._channels import MessageSubscription
from ._delivery import report

if TYPE_CHECKING:
    from ._registry import OnceReceiver, Served
    from .backends import Claimable, OnceStore

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
        self.offered: list[tuple[OnceReceiver, Claimable]] = []

    def offer(self, sub: OnceReceiver, event: Claimable) -> None:
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

    def register_new(self, receivers: list[tuple[str, OnceReceiver]]) -> None:
        """Register the receivers this process has not registered yet."""
        names = {sub.name for _, sub in receivers}
        if not names <= self.registered:
            register(self.store, sorted(names - self.registered))
            self.registered |= names

    def run_offered(self, receivers: list[tuple[str, OnceReceiver]], stop: threading.Event) -> bool:
        """Claim what arrived live and run what this process won; False
        if ``stop`` was set meanwhile."""
        offered, self.offered = self.offered, []
        by_receiver: dict[str, list[Claimable]] = {}
        subs = {sub.name: sub for _, sub in receivers}
        for sub, event in offered:
            by_receiver.setdefault(sub.name, []).append(event)
        for name, events in by_receiver.items():
            won = self.store.claim(name, [e.id for e in events if e.id], self.worker)
            if not self.attempt_all(subs[name], [e for e in events if e.id in won], stop):
                return False
        return True

    def scan(self, key: str, sub: OnceReceiver, stop: threading.Event) -> bool:
        """Claim and run the journal's events of ``key`` (a watched table,
        or a channel) past the receiver's watermark, moving it on; False if
        ``stop`` was set."""
        store = self.store
        while True:
            found, wanted, cursor = self.read(key, sub)
            won = store.claim(sub.name, [e.id for e in wanted if e.id], self.worker)
            store.advance(sub.name, cursor)
            if not self.attempt_all(sub, [e for e in wanted if e.id in won], stop):
                return False
            if found < _BATCH:
                return True

    def read(self, key: str, sub: OnceReceiver) -> tuple[int, list[Claimable], Any]:
        """One batch past the receiver's watermark: how many journal rows
        were found, those the receiver wants, and the cursor past them."""
        if isinstance(sub, MessageSubscription):
            notes, cursor = self.store.scan_messages(sub.name, key, _BATCH)
            return len(notes), list(notes), cursor
        events, cursor = self.store.scan(sub.name, [key], _BATCH)
        return len(events), [e for e in events if sub.matches(e)], cursor

    def take_over_due(self, sub: OnceReceiver, stop: threading.Event) -> bool:
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
        self, sub: OnceReceiver, events: list[Claimable], stop: threading.Event
    ) -> bool:
        """First attempts of events this process claimed; False (with the
        rest given back) if ``stop`` is set meanwhile."""
        for n, event in enumerate(events):
            if stop.is_set():
                self.store.release(sub.name, [e.id for e in events[n:] if e.id])
                return False
            self.attempt(sub, event, 1)
        return True

    def claim_and_attempt(self, sub: OnceReceiver, event: Claimable) -> None:
        """Run a once receiver for an operator's replay: claim the event if
        nobody has, then attempt it whatever its claim said."""
        assert event.id is not None
        self.store.reset(sub.name, event.id, self.worker)
        self.attempt(sub, event, 1)

    def attempt(self, sub: OnceReceiver, event: Claimable, attempt: int) -> None:
        assert event.id is not None
        store, settings = self.store, self.served.settings
        try:
            sub.handle(event)  # type: ignore[arg-type] # sub.matches(event) held
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
            report(self.served.app, sub.func, event, exc)
            return
        store.finish(sub.name, event.id, None, None)
