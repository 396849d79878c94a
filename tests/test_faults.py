"""The listener under real faults: a killed session, a server restart, a
half-open connection, a slow receiver, stop() during a receiver, interpreter
exit; and ``flask dbnotify status`` while listeners run.

Timings are printed (run with ``-s`` to see them); they are asserted only
against generous upper bounds.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy.engine import make_url

from flask_dbnotify import (
    ChangeEvent,
    DBNotify,
    events_dropped,
)

from ._helpers import (
    SQL,
    WAIT,
    Lifecycle,
    Lines,
    Proxy,
    Recorder,
    captured_notifications,
    listener_backends,
    orders_app,
    poll_until,
    wait_for_backends,
    wait_for_state,
)
from ._postgres import ThrowawayServer

MakeApp = Callable[..., tuple[Flask, DBNotify]]
ROOT = Path(__file__).resolve().parent.parent


# -- a killed session ---------------------------------------------------------


def test_listener_state_after_the_session_is_killed(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """After pg_terminate_backend, listener_state() counts one reconnect,
    keeps the error that listener_disconnected carried, and dates
    connected_since from the new connection; read and dispatched counts
    cover the events on both sides of the kill."""
    app, ext = orders_app(make_app, sql, DBNOTIFY_RECONNECT_MAX_DELAY=0.5)
    with Lifecycle().connected() as life:
        ext.start(app)
        state = ext.listener_state(app)
        assert state.running and state.connected, state
        assert state.reconnects == 0 and state.last_error is None, state
        assert state.connected_since is not None and state.connected_since.tzinfo is not None
        sql("INSERT INTO orders VALUES (1, 'before')")
        events.wait_for(1)

        ((pid, _, _),) = listener_backends(sql)
        killed_at = datetime.now(UTC)
        t_kill = time.monotonic()
        assert sql("SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
        _, lost, t_lost = life.wait_for_name("disconnected")
        _, again, t_again = life.wait_for_name("connected", 2)
        print(
            f"\nkilled session: listener_disconnected after {t_lost - t_kill:.3f}s, "
            f"listener_connected after {t_again - t_kill:.3f}s"
        )
        sql("INSERT INTO orders VALUES (2, 'after')")
        assert [e.pk for e in events.wait_for(2)] == [1, 2]

    assert [name for name, _ in life.names()] == ["connected", "disconnected", "connected"]
    assert again == {"reconnect": True, "gap": True}
    state = wait_for_state(ext, app, lambda s: s.dispatched == 2, "both events dispatched")
    assert state.running and state.connected, state
    assert state.reconnects == 1, state
    assert state.last_error == str(lost["error"]), state
    assert state.connected_since is not None and state.connected_since > killed_at, (
        f"connected_since {state.connected_since} is not after the kill at {killed_at}"
    )
    assert (state.received, state.queued, state.dropped) == (2, 0, 0), state


# -- a private server, stopped and started ----------------------------------


_databases = itertools.count()


@pytest.fixture()
def private_url(private_server: ThrowawayServer) -> Iterator[str]:
    """A fresh database on the private server (started if a test left it down)."""
    if not private_server.running:
        private_server.start()
    name = f"faults_{next(_databases)}"
    admin = SQL(private_server.url)
    admin(f'CREATE DATABASE "{name}"')
    admin.close()
    yield make_url(private_server.url).set(database=name).render_as_string(hide_password=False)
    if not private_server.running:
        private_server.start()
    admin = SQL(private_server.url)
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def test_pooled_connections_closed_by_a_restart_are_replaced(
    private_url: str,
    private_server: ThrowawayServer,
    make_app: MakeApp,
) -> None:
    """A restart closes the connections our pool holds; the next
    ``notify()`` gets a live one (each is pinged before it is lent), and
    does not fail with the dead one's error, however soon it comes."""
    app, ext = make_app(DBNOTIFY_DATABASE_URI=private_url)
    ext.notify("shop", "before", app=app)  # the pool now holds a connection
    private_server.stop("fast")
    private_server.start()
    heard = captured_notifications(private_url, lambda: ext.notify("shop", "after", app=app))
    assert [json.loads(p)["p"] for p in heard] == ["after"]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_listener_rides_out_a_server_restart(
    private_url: str,
    private_server: ThrowawayServer,
    make_app: MakeApp,
    events: Recorder,
    mode: str,
) -> None:
    """The server stops (``pg_ctl -m fast``: sessions end with an error;
    ``-m immediate``: as in a crash): listener_disconnected arrives, the app
    keeps serving requests at once while the database is down, and once the
    server is back the listener reconnects by itself within about the
    reconnect cap, reports gap=True, and delivers later events."""
    writer = SQL(private_url)
    writer("CREATE TABLE orders (id int PRIMARY KEY, note text)")
    app, ext = make_app(DBNOTIFY_DATABASE_URI=private_url, DBNOTIFY_RECONNECT_MAX_DELAY=0.5)
    ext.watch("orders")
    ext.install_triggers(app)

    @app.get("/health")
    def health() -> dict[str, Any]:
        state = ext.listener_state()
        return {"connected": state.connected, "last_error": state.last_error}

    client = app.test_client()
    with Lifecycle().connected() as life:
        ext.start(app)
        writer("INSERT INTO orders VALUES (1, 'before')")
        events.wait_for(1)
        # The private server runs with synchronous_commit=off: without a
        # checkpoint a crash could lose the triggers installed above.
        writer("CHECKPOINT")
        writer.close()

        t_stop = time.monotonic()
        private_server.stop(mode)
        t_down = time.monotonic()
        _, lost, t_lost = life.wait_for_name("disconnected")
        assert isinstance(lost["error"], Exception)

        # Requests do not wait for the listener, nor for the database.
        t_request = time.monotonic()
        response = client.get("/health")
        request_time = time.monotonic() - t_request
        assert response.status_code == 200
        assert request_time < 2, f"a request took {request_time:.2f}s while the database was down"
        # It keeps trying: last_error moves on to the failed attempts.
        poll_until(
            lambda: ext.listener_state(app).last_error not in (None, str(lost["error"])),
            "a failed reconnection attempt while the server is down",
        )
        body = client.get("/health").json
        assert body is not None and body["connected"] is False and body["last_error"], body

        t_start = time.monotonic()
        private_server.start()
        t_up = time.monotonic()
        _, again, t_again = life.wait_for_name("connected", 2)
        print(
            f"\nserver stop -m {mode}: pg_ctl stop took {t_down - t_stop:.3f}s; "
            f"listener_disconnected {t_lost - t_stop:.3f}s after it began; "
            f"a request while down took {request_time * 1000:.1f}ms; "
            f"pg_ctl start took {t_up - t_start:.3f}s; listener_connected "
            f"{t_again - t_up:.3f}s after the server was up"
        )
        assert again == {"reconnect": True, "gap": True}
        assert t_again - t_up < 3, "no reconnection within about the 0.5s reconnect cap"
        assert client.get("/health").json == {
            "connected": True,
            "last_error": ext.listener_state(app).last_error,
        }

        writer = SQL(private_url)
        writer("INSERT INTO orders VALUES (2, 'after')")
        assert [e.pk for e in events.wait_for(2)] == [1, 2]
        writer.close()
    assert [name for name, _ in life.names()] == ["connected", "disconnected", "connected"]
    assert ext.listener_state(app).reconnects == 1


# -- a half-open connection -----------------------------------------------------


def _proxied_orders_app(
    make_app: MakeApp, sql: SQL, pg_url: str, proxy: Proxy, **config: Any
) -> tuple[Flask, DBNotify]:
    """The orders app whose listener (only) connects through ``proxy``."""
    listen = make_url(pg_url).set(host="127.0.0.1", port=proxy.port)
    app, ext = orders_app(
        make_app,
        sql,
        DBNOTIFY_LISTEN_URI=listen.render_as_string(hide_password=False),
        DBNOTIFY_RECONNECT_MAX_DELAY=0.5,
        **config,
    )
    return app, ext


def test_half_open_connection_is_noticed_by_the_probe(
    make_app: MakeApp, sql: SQL, pg_url: str, proxy: Proxy, events: Recorder
) -> None:
    """The path to the server goes silent without closing (the proxy stops
    relaying and reading). With DBNOTIFY_PROBE_INTERVAL=0.5 and
    DBNOTIFY_CONNECT_TIMEOUT=1 the liveness probe notices within a few
    seconds; connection attempts that get no answer are given up after the
    timeout; once new connections go through, the listener reconnects with
    gap=True. The row committed into the black hole is lost, later rows
    arrive."""
    app, ext = _proxied_orders_app(
        make_app, sql, pg_url, proxy, DBNOTIFY_PROBE_INTERVAL=0.5, DBNOTIFY_CONNECT_TIMEOUT=1
    )
    with Lifecycle().connected() as life:
        ext.start(app)
        sql("INSERT INTO orders VALUES (1, 'relayed')")
        events.wait_for(1)
        assert proxy.accepted == 1

        t_hole = time.monotonic()
        proxy.black_hole()
        sql("INSERT INTO orders VALUES (2, 'into the black hole')")
        _, lost, t_lost = life.wait_for_name("disconnected")
        detect = t_lost - t_hole
        assert detect < 5, f"a silent connection went unnoticed for {detect:.1f}s"
        # Two more attempts reach the proxy: the first one, unanswered, was
        # abandoned after DBNOTIFY_CONNECT_TIMEOUT rather than waited on forever.
        poll_until(lambda: proxy.accepted >= 3, "a second swallowed connection attempt")
        assert not ext.listener_state(app).connected
        t_attempts = time.monotonic()
        swallowed = proxy.accepted - 1

        proxy.forward()
        _, again, t_again = life.wait_for_name("connected", 2)
        print(
            f"\nhalf-open (probe 0.5s, timeout 1s): listener_disconnected {detect:.3f}s after "
            f"the black hole ({lost['error']}); {swallowed} connection attempts "
            f"swallowed in {t_attempts - t_lost:.3f}s; listener_connected "
            f"{t_again - t_attempts:.3f}s after the proxy forwarded again"
        )
        assert again == {"reconnect": True, "gap": True}
        assert t_again - t_attempts < 4, "no reconnection within about timeout + backoff"

        sql("INSERT INTO orders VALUES (3, 'after')")
        assert [e.pk for e in events.wait_for(2)] == [1, 3]
        events.assert_no_more(2, marker=lambda: ext.notify("marker", app=app))
    assert [name for name, _ in life.names()] == ["connected", "disconnected", "connected"]
    state = ext.listener_state(app)
    assert state.connected and state.reconnects == 1, state
    assert state.last_error is not None and "no answer" in state.last_error, state


def test_an_outage_is_one_warning_that_names_the_server(
    make_app: MakeApp, sql: SQL, pg_url: str, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """While connections are refused the listener retries fast (backoff
    capped at 0.05 s here) but warns once, naming host, port, database and
    user and what to do; once through, one line ends the outage with the
    number of failed attempts."""
    caplog.set_level(logging.WARNING, logger="flask_dbnotify")
    url = make_url(pg_url)
    listen = url.set(host="127.0.0.1", port=proxy.port)
    proxy.refuse()
    app, ext = orders_app(
        make_app,
        sql,
        DBNOTIFY_LISTEN_URI=listen.render_as_string(hide_password=False),
        DBNOTIFY_RECONNECT_MAX_DELAY=0.05,
    )
    with Lifecycle().connected() as life:
        ext.start(app, timeout=0)
        poll_until(lambda: proxy.accepted >= 20, "20 refused connection attempts")
        proxy.forward()
        life.wait_for_name("connected")
        failed = proxy.accepted - 1
    where = f"PostgreSQL at 127.0.0.1:{proxy.port} (database {url.database}, user {url.username})"
    lines = [r.getMessage() for r in caplog.records if r.name == "flask_dbnotify.listener"]
    assert lines == [
        f"the listener cannot connect to {where}: server closed the connection "
        "unexpectedly; is the server running there? Check the host and port in the URL "
        "(retrying)",
        f"the listener is connected to {where}, after {failed} failed attempt(s)",
    ], lines


def test_a_connection_that_keeps_dropping_is_one_warning(
    make_app: MakeApp, sql: SQL, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener's session is killed four times in a row: one warning
    for the first loss and one line when connected again; the other three
    within the minute are held back (and counted on the next warning)."""
    caplog.set_level(logging.WARNING, logger="flask_dbnotify")
    app, ext = orders_app(make_app, sql, DBNOTIFY_RECONNECT_MAX_DELAY=0.05)
    with Lifecycle().connected() as life:
        ext.start(app)
        for n in range(2, 6):
            ((pid, _, _),) = wait_for_backends(sql, 1, "the listener's session")
            assert sql("SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
            life.wait_for_name("connected", n)
    url = make_url(pg_url)
    where = f"PostgreSQL at {url.host}:{url.port} (database {url.database}, user {url.username})"
    lines = [r.getMessage() for r in caplog.records if r.name == "flask_dbnotify.listener"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"the listener lost its connection to {where}: "), lines
    assert lines[0].endswith(" (reconnecting)"), lines
    assert lines[1] == f"the listener is connected to {where} again", lines


def test_half_open_connection_is_noticed_with_default_timings(
    make_app: MakeApp, sql: SQL, pg_url: str, proxy: Proxy, events: Recorder
) -> None:
    """With the default probe interval (10 s) and timeout (5 s) a silent
    connection is noticed within about 15 s; new connections work at once,
    so the listener is back right after."""
    app, ext = _proxied_orders_app(make_app, sql, pg_url, proxy)
    settings = app.extensions["dbnotify"].settings
    assert (settings.probe_interval, settings.connect_timeout) == (10, 5)
    with Lifecycle().connected() as life:
        ext.start(app)
        sql("INSERT INTO orders VALUES (1, 'relayed')")
        events.wait_for(1)

        t_hole = time.monotonic()
        proxy.black_hole(new_connections=False)
        _, lost, t_lost = life.wait_for_name("disconnected", timeout=25)
        _, again, t_again = life.wait_for_name("connected", 2)
        print(
            f"\nhalf-open (defaults): listener_disconnected {t_lost - t_hole:.3f}s after the "
            f"black hole ({lost['error']}); listener_connected {t_again - t_lost:.3f}s later"
        )
        assert t_lost - t_hole < 20, "a silent connection went unnoticed for over 20s"
        assert again == {"reconnect": True, "gap": True}
        sql("INSERT INTO orders VALUES (2, 'after')")
        assert [e.pk for e in events.wait_for(2)] == [1, 2]


# -- a slow receiver --------------------------------------------------------------


def test_a_slow_receiver_does_not_stop_the_reader(private_url: str, make_app: MakeApp) -> None:
    """With DBNOTIFY_QUEUE_SIZE=50 and a receiver stuck on the first event,
    the reader still reads every notification (the server's notification
    queue is drained), keeps the first 50, and reports the events of the
    rest with one events_dropped, in order; once the receiver returns, the
    kept events and later ones are delivered, and every row was either
    delivered or counted as dropped.

    2000 rows of 3 kB: enough that a session which stopped reading would
    hold them in the server's queue (500 small rows fit in socket buffers).
    The private server keeps other test runs' listeners out of that queue."""
    rows = 2000
    writer = SQL(private_url)
    writer("CREATE TABLE orders (id int PRIMARY KEY, pad text)")
    app, ext = make_app(DBNOTIFY_DATABASE_URI=private_url, DBNOTIFY_QUEUE_SIZE=50)
    ext.watch("orders")
    ext.install_triggers(app)
    release = threading.Event()
    seen = Recorder()

    @ext.on("orders")
    def slow(event: ChangeEvent) -> None:
        seen.add(("event", event.pk))
        if event.pk == 1:
            release.wait(3 * WAIT)

    try:
        with events_dropped.connected_to(lambda sender, count: seen.add(("dropped", count))):
            ext.start(app)
            t0 = time.monotonic()
            sent = len(
                captured_notifications(
                    private_url,
                    lambda: writer(
                        "INSERT INTO orders SELECT g, repeat('x', 3000) "
                        "FROM generate_series(1, %s) g",
                        (rows,),
                    ),
                )
            )
            assert seen.wait_for(1, "the first event") == [("event", 1)]
            state = wait_for_state(
                ext,
                app,
                lambda s: s.received == sent,
                f"the reader reading all {sent} notifications while the receiver is stuck",
            )
            t_read = time.monotonic()
            assert (state.dispatched, state.queued) == (0, 50), state
            assert 0 < state.dropped < rows, state
            poll_until(
                lambda: writer("SELECT pg_notification_queue_usage()") == [(0.0,)],
                "the server's notification queue empty while the receiver is stuck",
            )
            t_empty = time.monotonic()
            assert seen.items == [("event", 1)]

            release.set()
            wait_for_state(
                ext,
                app,
                lambda s: s.dispatched + s.dropped == rows,
                "every row delivered or counted as dropped",
            )
            writer("INSERT INTO orders VALUES (%s, 'later')", (rows + 1,))
            poll_until(lambda: ("event", rows + 1) in seen.items, "the event after the loss")
            items = list(seen.items)
    finally:
        release.set()
        writer.close()
    dropped = [count for name, count in items if name == "dropped"]
    kept = rows - state.dropped
    print(
        f"\nslow receiver: {rows} rows in {sent} notifications, all read "
        f"{t_read - t0:.3f}s after the insert began, server queue empty after "
        f"{t_empty - t0:.3f}s; {kept} events kept, {state.dropped} dropped, reported by "
        f"{len(dropped)} events_dropped signals: {dropped[:5]}..."
    )
    assert sum(dropped) == state.dropped, dropped
    assert items[:kept] == [("event", pk) for pk in range(1, kept + 1)]
    assert items[kept:] == [("dropped", rows - kept), ("event", rows + 1)], (
        f"expected one events_dropped({rows - kept}) between the kept events and the next, "
        f"got {len(dropped)} events_dropped signals: {items[kept : kept + 3]!r}..."
    )
    state = wait_for_state(
        ext, app, lambda s: s.dispatched == kept + 1, "the later event dispatched"
    )
    assert (state.received, state.queued, state.dropped) == (sent + 1, 0, rows - kept), state


# -- stop() while a receiver runs ----------------------------------------------


class Blocking:
    """An ``on()`` receiver that blocks on the first row until released and
    logs what runs, so a test can see which receivers ran and when."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def note(self, text: str) -> None:
        with self.lock:
            self.log.append(text)

    def __call__(self, event: ChangeEvent) -> None:
        self.note(f"entered {event.pk}")
        if event.pk == 1:
            self.entered.set()
            self.release.wait(3 * WAIT)
        self.note(f"returned {event.pk}")


def test_stop_waits_for_the_running_receiver_and_drops_the_queue(
    make_app: MakeApp, sql: SQL
) -> None:
    """stop() while a receiver runs: the connection closes at once, stop()
    returns as soon as that receiver returns, and the events read meanwhile
    and still queued behind it are not delivered."""
    app, ext = orders_app(make_app, sql)
    receiver = Blocking()
    ext.on("orders")(receiver)
    try:
        ext.start(app)
        sql("INSERT INTO orders VALUES (1, 'a')")
        assert receiver.entered.wait(WAIT), "the receiver did not start"
        sql("INSERT INTO orders VALUES (2, 'b'), (3, 'c')")
        sql("INSERT INTO orders VALUES (4, 'd')")
        wait_for_state(ext, app, lambda s: s.received == 3, "all three notifications read")

        def stop() -> None:
            ext.stop(app)
            receiver.note("stop returned")

        stopper = threading.Thread(target=stop)
        stopper.start()
        wait_for_backends(sql, 0, "once stop() began, with the receiver still running")
        assert stopper.is_alive(), "stop() returned while a receiver was still running"
        t_release = time.monotonic()
        receiver.release.set()
        stopper.join(WAIT)
        waited = time.monotonic() - t_release
        print(f"\nstop() returned {waited * 1000:.1f}ms after the receiver was released")
        assert not stopper.is_alive(), f"stop() still waiting {WAIT}s after the receiver"
    finally:
        receiver.release.set()
    assert receiver.log == ["entered 1", "returned 1", "stop returned"]
    assert not [t for t in threading.enumerate() if t.name.startswith("dbnotify-")]
    state = ext.listener_state(app)
    assert not state.running and not state.connected, state
    assert state.dispatched == 1, state


def test_stop_gives_up_on_a_receiver_that_never_returns(make_app: MakeApp, sql: SQL) -> None:
    """A receiver that never returns cannot make stop() hang: it returns
    after its timeout, the connection is closed, and the thread left behind
    ends once the receiver does. (``DBNotify.stop()`` has no ``timeout``: it
    waits up to 10 s, so the listener's own stop() is used here.)"""
    app, ext = orders_app(make_app, sql)
    receiver = Blocking()
    ext.on("orders")(receiver)
    try:
        ext.start(app)
        sql("INSERT INTO orders VALUES (1, 'stuck')")
        assert receiver.entered.wait(WAIT), "the receiver did not start"
        listener = app.extensions["dbnotify"].listener
        t0 = time.monotonic()
        listener.stop(timeout=1)
        took = time.monotonic() - t0
        print(f"\nstop(timeout=1) with a stuck receiver returned after {took:.3f}s")
        assert took < 3, f"stop(timeout=1) took {took:.1f}s"
        assert not ext.is_running(app)
        wait_for_backends(sql, 0, "after stop() gave up on the receiver")
        stuck = [t for t in threading.enumerate() if t.name.startswith("dbnotify-dispatch")]
        assert len(stuck) == 1, stuck
    finally:
        receiver.release.set()
    stuck[0].join(WAIT)
    assert not stuck[0].is_alive(), "the dispatcher did not end after its receiver returned"
    assert receiver.log == ["entered 1", "returned 1"]


def test_restart_after_a_stop_that_gave_up_runs_one_dispatcher(make_app: MakeApp, sql: SQL) -> None:
    """start() after a stop() that left a stuck receiver behind: when that
    receiver finally returns, its thread must not go on dispatching beside
    the new one: receivers never run two at a time, and events stay in order."""
    app, ext = orders_app(make_app, sql)
    receiver = Blocking()
    second = threading.Event()
    active: list[int] = []
    overlaps: list[tuple[int, list[int]]] = []

    @ext.on("orders")
    def track(event: ChangeEvent) -> None:
        # Row 1's receiver was abandoned by stop(): only later rows count.
        running = [pk for pk in active if pk != 1]
        if running:
            overlaps.append((event.pk, running))
        active.append(event.pk)
        try:
            receiver(event)
            if event.pk == 2:
                second.wait(3 * WAIT)
        finally:
            active.remove(event.pk)

    try:
        ext.start(app)
        sql("INSERT INTO orders VALUES (1, 'stuck')")
        assert receiver.entered.wait(WAIT), "the receiver did not start"
        app.extensions["dbnotify"].listener.stop(timeout=0.5)
        ext.start(app)
        sql("INSERT INTO orders VALUES (2, 'blocks the new dispatcher')")
        poll_until(lambda: "entered 2" in receiver.log, "the new dispatcher running row 2")
        receiver.release.set()  # the old dispatcher's receiver returns
        poll_until(lambda: "returned 1" in receiver.log, "the stuck receiver returning")
        sql("INSERT INTO orders VALUES (3, 'next')")
        wait_for_state(ext, app, lambda s: s.received == 3, "row 3 read")
        second.set()
        poll_until(lambda: "returned 3" in receiver.log, "row 3 delivered")
    finally:
        receiver.release.set()
        second.set()
    assert overlaps == [], f"receivers ran at the same time: (row, already running) {overlaps}"
    assert [x for x in receiver.log if x.startswith("entered")] == [
        "entered 1",
        "entered 2",
        "entered 3",
    ], receiver.log


# -- interpreter exit -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["returns", "stuck"])
def test_interpreter_exits_cleanly_with_a_listener(
    pg_url: str, make_app: MakeApp, sql: SQL, mode: str
) -> None:
    """A script whose app listens exits on its own once its main thread
    ends, with status 0 and no traceback: after its receiver returned, and
    while a receiver is still running (after the stop timeout)."""
    orders_app(make_app, sql)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    env.update(DBNOTIFY_TEST_APP_DATABASE_URL=pg_url, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.exit_app", mode],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out = Lines(proc.stdout, "stdout")
        assert out.readline("listening", timeout=20) == "listening"
        sql("INSERT INTO orders VALUES (1, 'x')")
        assert out.readline("the event") == "received 1"
        assert out.readline("exiting") == "exiting"
        t_exit = time.monotonic()
        code = proc.wait(timeout=WAIT)
        took = time.monotonic() - t_exit
        assert proc.stdout is not None and proc.stderr is not None
        rest, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=WAIT)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    print(f"\ninterpreter exit ({mode}): the process ended {took:.3f}s after its main thread")
    assert code == 0, stderr
    assert rest == ""
    for bad in ("Traceback", "Exception ignored", "Fatal Python error"):
        assert bad not in stderr, stderr
    assert took < 6, f"the process took {took:.1f}s to exit"
    wait_for_backends(sql, 0, "after the process exited")


# -- flask dbnotify status ------------------------------------------------------------


def test_status_shows_queue_usage_and_listener_sessions(
    pg_url: str, make_app: MakeApp, sql: SQL
) -> None:
    """`flask dbnotify status` reports the notification queue and each
    listener session of the database (two apps listening here); it starts
    none itself."""
    app, ext = orders_app(make_app, sql)
    other, other_ext = make_app()
    other_ext.watch("orders")
    ext.start(app)
    other_ext.start(other)
    pids = sorted(pid for pid, _, _ in listener_backends(sql))
    assert len(pids) == 2
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    env.update(DBNOTIFY_TEST_APP_DATABASE_URL=pg_url, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "flask"), "--app", "tests.apps.orders_app"]
        + ["dbnotify", "status"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "installed  orders" in lines, lines
    queue = [line for line in lines if line.startswith("notification queue: ")]
    assert len(queue) == 1 and queue[0].endswith("% used"), lines
    assert "listeners: 2" in lines, lines
    for pid in pids:
        (line,) = [x for x in lines if x.startswith(f"listener {pid}: ")]
        assert " from " in line and line.endswith(", idle"), line
    assert sorted(pid for pid, _, _ in listener_backends(sql)) == pids
