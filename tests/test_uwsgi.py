"""Under a real uWSGI: one listener per worker and none in the master, in
its default mode (the master loads the app, then forks the workers) and
with lazy-apps (each worker loads it); each committed row reaches each
worker exactly once; the master's signal stops it all promptly, with no
traceback, and the sessions close; a killed worker's replacement gets its
own listener. Also without --master, where the first worker is the process
that loaded the app.

uWSGI forks its workers without Python's fork handlers, so the extension
starts their listeners from ``uwsgi.post_fork_hook``. uWSGI before 2.0.27
without --enable-threads runs Python threads only while a request runs:
that is refused with an error naming the option (checked here with a
stand-in ``uwsgi`` module, as the uWSGI these tests install always has
threads).

The app is tests/apps/workers_app.py; the helpers are test_gunicorn's.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from flask_dbnotify import DBNotify

from ._helpers import SQL, free_port, listener_count, orders_app, wait_for_listeners
from .test_gunicorn import APP, Server, app_env, assert_sessions_held_by, require

MakeApp = Callable[..., tuple[Flask, DBNotify]]


@pytest.fixture()
def uwsgi(
    pg_url: str, sql: SQL, tmp_path: Path, make_app: MakeApp
) -> Iterator[Callable[..., Server]]:
    """Start uWSGI with the given options, serving workers_app over HTTP (the
    orders table and its triggers exist); afterwards its whole process group
    is killed and its listener sessions are gone."""
    program = require("uwsgi")
    orders_app(make_app, sql)
    env = app_env(pg_url)
    started: list[Server] = []

    def start(*options: str) -> Server:
        port = free_port()
        argv = [str(program), "--http-socket", f"127.0.0.1:{port}", "--module", f"{APP}:app"]
        # The venv's packages; fail rather than serve without the app;
        # no line per request on stderr.
        argv += ["--virtualenv", sys.prefix, "--need-app", "--disable-logging", *options]
        server = Server(argv, env, port, tmp_path / f"uwsgi-{len(started)}.err")
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
    wait_for_listeners(sql, 0, "after uWSGI ended")


def _rows_reach_each_worker_once(server: Server, sql: SQL, workers: set[int]) -> None:
    for pk in (1, 2, 3):
        sql("INSERT INTO orders VALUES (%s, 'x')", (pk,))
    # Row 4 is a marker: once each worker has printed it, it has printed
    # everything before it.
    sql("INSERT INTO orders VALUES (4, 'marker')")
    server.wait_received(workers, 4)
    got = server.received()
    assert got == {pid: [1, 2, 3, 4] for pid in workers}, got


@pytest.mark.parametrize(
    ("options", "stop"),
    [
        (("--master", "--processes", "2"), signal.SIGINT),
        # uWSGI 2.0 reloads on SIGTERM unless told to die on it.
        (
            ("--master", "--processes", "2", "--lazy-apps", "--enable-threads", "--die-on-term"),
            signal.SIGTERM,
        ),
    ],
    ids=["default", "lazy-apps"],
)
def test_each_worker_listens_receives_each_row_once_and_stops(
    uwsgi: Callable[..., Server], sql: SQL, options: tuple[str, ...], stop: signal.Signals
) -> None:
    """Each of the two workers has its own listener session, the master
    none, before any request; each row reaches each worker once. By
    default the master imported the app and did not listen (it would hang
    the workers it forks); with lazy-apps each worker imported it. The
    master's signal ends it all, with no traceback, and the sessions close."""
    t0 = time.monotonic()
    server = uwsgi(*options)
    workers = server.wait_listeners(2)
    assert server.master not in workers, "the uWSGI master started a listener"
    wait_for_listeners(sql, 2, "with two workers")
    t_listening = time.monotonic() - t0
    assert_sessions_held_by(sql, workers, [server.master])
    imported = server.pids("imported")
    if "--lazy-apps" in options:
        assert sorted(imported) == sorted(workers), server.lines
    else:
        assert imported == [server.master], server.lines
    assert server.threads() == {"a thread of their own"}, server.lines
    _rows_reach_each_worker_once(server, sql, workers)

    response = server.get("/")
    assert response.startswith(b"HTTP/1.1 200") or response.startswith(b"HTTP/1.0 200")
    assert int(response.rsplit(b"ok ", 1)[1]) in workers
    assert listener_count(sql) == 2

    took = server.stop(stop)
    wait_for_listeners(sql, 0, "after uWSGI stopped")
    print(
        f"\nuWSGI {' '.join(options)}: workers listening {t_listening:.3f}s after start; "
        f"stopped {took:.3f}s after {stop.name}"
    )


def test_one_worker_under_a_master_and_its_replacement_listen(
    uwsgi: Callable[..., Server], sql: SQL
) -> None:
    """--master --processes 1: the one worker listens, the master does not;
    SIGKILL the worker: the master forks a replacement, which listens on
    its own session and receives each row once."""
    server = uwsgi("--master", "--processes", "1")
    (worker,) = server.wait_listeners(1)
    assert worker != server.master
    assert_sessions_held_by(sql, {worker}, [server.master])
    t_kill = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    server.wait(
        lambda _: any(pid != worker for pid in server.pids("listener connected")),
        "the replacement worker's listener",
    )
    t_replaced = time.monotonic() - t_kill
    (replacement,) = [p for p in server.pids("listener connected") if p != worker]
    assert replacement != server.master
    assert_sessions_held_by(sql, {replacement}, [server.master])
    _rows_reach_each_worker_once(server, sql, {replacement})
    server.stop(signal.SIGINT)
    print(f"\nuWSGI worker {worker} killed: replacement listening after {t_replaced:.3f}s")


def test_without_master_each_worker_listens(uwsgi: Callable[..., Server], sql: SQL) -> None:
    """--processes 2 without --master: the first process loads the app and
    becomes worker 1 (not a fork), then forks worker 2; each listens once,
    receives each row once, and SIGINT to the group stops both."""
    server = uwsgi("--processes", "2")
    workers = server.wait_listeners(2)
    assert server.master in workers, "worker 1 (the process that loaded the app) did not listen"
    assert server.pids("imported") == [server.master], server.lines
    assert_sessions_held_by(sql, workers, [])
    _rows_reach_each_worker_once(server, sql, workers)
    # Without a master nothing passes a signal on: signal the group.
    server.stop(signal.SIGINT, group=True)
    wait_for_listeners(sql, 0, "after uWSGI stopped")


# -- a stand-in uwsgi module (the real one exists only inside uWSGI) ----------


def _fake_uwsgi(
    monkeypatch: pytest.MonkeyPatch, worker_id: int, has_threads: int = 1
) -> types.SimpleNamespace:
    fake = types.SimpleNamespace(
        worker_id=lambda: worker_id,
        mule_id=lambda: 0,
        masterpid=lambda: 0,  # uwsgidecorators refuses to load
        has_threads=has_threads,
        opt={},
    )
    monkeypatch.setitem(sys.modules, "uwsgi", fake)
    return fake


def test_without_threads_autostart_says_to_enable_them(
    monkeypatch: pytest.MonkeyPatch, make_app: MakeApp
) -> None:
    """uWSGI before 2.0.27 without --enable-threads (has_threads 0): a
    worker holds the GIL while it waits for requests, so the listener
    thread would not run. DBNotify(app) with autostart says what to add;
    without autostart, start() does."""
    _fake_uwsgi(monkeypatch, worker_id=1, has_threads=0)
    with pytest.raises(RuntimeError, match="--enable-threads"):
        make_app(DBNOTIFY_AUTOSTART=True)
    app, ext = make_app()
    with pytest.raises(RuntimeError, match="--enable-threads"):
        ext.start(app)
    assert not ext.is_running(app)


def test_start_in_the_uwsgi_master_is_refused(
    monkeypatch: pytest.MonkeyPatch, make_app: MakeApp
) -> None:
    """start() before uWSGI forks its workers would leave them a lock held
    by a thread they do not have: refused, naming the ways out."""
    _fake_uwsgi(monkeypatch, worker_id=0)
    app, ext = make_app()
    with pytest.raises(RuntimeError, match="lazy-apps"):
        ext.start(app)
    assert not ext.is_running(app)
