"""Under a real gunicorn (-w 2, with and without --preload; worker classes
sync, gthread and gevent): one listener per worker and none in the master,
started without any request; each committed row reaches each worker exactly
once; SIGTERM stops it all promptly, without a traceback; a killed worker's
replacement gets its own listener. In WAL capture mode, exactly one worker
leads the slot (the master never), each row still reaches each worker
exactly once, and when the leading worker is killed another process of
gunicorn's leads. And `flask shell` / `flask routes` never start one.

The app is tests/apps/workers_app.py (autostart on): each process writes a
line on stdout when it imports the module, when its listener connects and
for each row event, with its pid. tests/test_uwsgi.py runs it under uWSGI
with the helpers here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
from flask import Flask
from sqlalchemy.engine import make_url

from flask_dbnotify import DBNotify

from ._helpers import (
    SQL,
    WAIT,
    Lines,
    app_factory,
    free_port,
    kill_group,
    listener_count,
    local_ports,
    not_here,
    orders_app,
    poll_until,
    wait_for_listeners,
)

MakeApp = Callable[..., tuple[Flask, DBNotify]]
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
APP = "tests.apps.workers_app"
LISTENER_NAME = "flask-dbnotify listener"
LINE = re.compile(r"workers_app: (?P<what>.+) pid=(?P<pid>\d+)")


def session_owners(sql: SQL, pids: list[int]) -> dict[int, list[int]]:
    """For each listener session on the test database (by its client
    port): which of ``pids`` holds its socket."""
    ports = [
        port
        for (port,) in sql(
            "SELECT client_port FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s",
            (LISTENER_NAME,),
        )
    ]
    held = {pid: local_ports(pid) for pid in pids}
    return {port: [pid for pid in pids if port in held[pid]] for port in ports}


class Server:
    """A server (gunicorn, uWSGI) started in its own process group, its
    stdout read line by line and its stderr kept in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, stderr: Path) -> None:
        self.name = Path(argv[0]).name
        with open(stderr, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self.master = self.proc.pid
        self.port = port
        self.stderr_path = stderr
        self.out = Lines(self.proc.stdout, f"{self.name}'s stdout")
        #: (what, pid) of every workers_app line read so far.
        self.lines: list[tuple[str, int]] = []

    def stderr(self, tail: int = 3000) -> str:
        return self.stderr_path.read_text(errors="replace")[-tail:]

    def wait(
        self,
        check: Callable[[list[tuple[str, int]]], bool],
        what: str,
        deadline: float | None = None,
    ) -> None:
        """Read stdout until ``check(self.lines)`` holds (bounded: by
        ``deadline``, a time.monotonic(), or else for WAIT seconds)."""
        deadline = time.monotonic() + WAIT if deadline is None else deadline
        while not check(self.lines):
            left = deadline - time.monotonic()
            try:
                line = self.out.readline(what, max(left, 0.0))
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{self.name}'s stderr:\n{self.stderr()}") from None
            match = LINE.fullmatch(line)
            assert match, f"unexpected line on stdout: {line!r}"
            self.lines.append((match["what"], int(match["pid"])))

    def pids(self, what: str) -> list[int]:
        return [pid for w, pid in self.lines if w == what]

    def received(self) -> dict[int, list[int]]:
        """pid -> primary keys of the rows it received, in order."""
        got: dict[int, list[int]] = {}
        for what, pid in self.lines:
            if what.startswith("received orders "):
                got.setdefault(pid, []).append(int(what.rsplit(" ", 1)[1]))
        return got

    def wait_received(self, pids: set[int], pk: int) -> None:
        """Until each of ``pids`` has printed row ``pk``."""
        self.wait(
            lambda _: all(pk in self.received().get(pid, []) for pid in pids),
            f"row {pk} in workers {sorted(pids)}",
        )

    def wait_listeners(self, count: int) -> set[int]:
        """Until ``count`` processes have connected a listener (and said
        where receivers run): their pids, none twice, not the master's."""
        self.wait(
            lambda _: (
                len(self.pids("listener connected")) >= count
                and len([w for w, _ in self.lines if w.startswith("receivers run in")]) >= count
            ),
            f"{count} listeners connected",
        )
        workers = set(self.pids("listener connected"))
        assert len(workers) == count, f"a worker connected twice: {self.lines}"
        return workers

    def threads(self) -> set[str]:
        """Where receivers run, as each listener said."""
        return {w.removeprefix("receivers run in ") for w, _ in self.lines if "run in" in w}

    def get(self, path: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def stop(self, sig: signal.Signals, group: bool = False) -> float:
        """Send ``sig`` to the master (or the whole group); wait (bounded)
        for it to exit; return how long that took. Its stdout is read to
        the end, and its stderr must hold no traceback and no warning of
        ours (say, a listener thread that did not stop)."""
        t0 = time.monotonic()
        (os.killpg if group else os.kill)(self.master, sig)
        try:
            self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running {WAIT}s after {sig.name}; stderr:\n{self.stderr()}"
            ) from None
        took = time.monotonic() - t0
        for line in self.out.rest():
            match = LINE.fullmatch(line)
            assert match, f"unexpected line on stdout: {line!r}"
            self.lines.append((match["what"], int(match["pid"])))
        stderr = self.stderr(tail=100_000)
        for bad in ("Traceback", "Exception ignored", "still busy", "the listener"):
            assert bad not in stderr, f"{bad!r} on {self.name}'s stderr:\n{stderr[-3000:]}"
        return took

    def kill(self) -> None:
        """Whatever is left of the process group: TERM, then KILL."""
        proc = self.proc
        kill_group(proc, WAIT)  # and workers left behind by a master that died first
        assert proc.stdout is not None
        proc.stdout.close()


def assert_sessions_held_by(sql: SQL, workers: set[int], others: list[int]) -> None:
    """One listener session per worker, each held by that worker alone, and
    none by ``others`` (a master); waits for sessions of killed processes
    to go (bounded)."""
    deadline = time.monotonic() + WAIT
    while True:
        owners = session_owners(sql, [*others, *workers])
        held = sorted(pid for pids in owners.values() for pid in pids)
        if held == sorted(workers) and len(owners) == len(workers):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"listener sessions (client port -> holder) {owners}; expected one for each "
                f"of {sorted(workers)}, none for {others}"
            )
        time.sleep(0.05)


def app_env(pg_url: str) -> dict[str, str]:
    """The environment a server of workers_app runs in."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "PYTHON"))}
    environ.update(
        DBNOTIFY_TEST_APP_DATABASE_URL=pg_url,
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    return environ


def require(program: str) -> Path:
    """``program`` in the venv's bin; the test fails in CI without it, else skips."""
    path = BIN / program
    if not path.exists():
        not_here(f"{program} tests NOT RUN: {program} is not installed")
    return path


def no_control_socket() -> list[str]:
    """gunicorn >= 24 opens a control socket in ~/.gunicorn by default,
    shared by every gunicorn of the user: turn it off where it exists."""
    config = importlib.import_module("gunicorn.config")
    names = {setting.name for setting in config.KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


@pytest.fixture()
def env(pg_url: str) -> dict[str, str]:
    return app_env(pg_url)


WORKER_CLASSES = ["sync", "gthread", "gevent"]


@contextmanager
def gunicorn_servers(
    env: dict[str, str], sql: SQL, tmp_path: Path
) -> Iterator[Callable[..., Server]]:
    """What starts ``gunicorn -w 2 [--preload] [-k CLASS]`` serving
    workers_app in ``env``; afterwards each one's whole process group is
    killed and its listener sessions are gone."""
    program = require("gunicorn")
    started: list[Server] = []

    def start(preload: bool, worker_class: str = "sync") -> Server:
        if worker_class == "gevent" and importlib.util.find_spec("gevent") is None:
            not_here("gevent worker NOT RUN: gevent is not installed")
        port = free_port()
        argv = [str(program), "-w", "2", "-k", worker_class, "-b", f"127.0.0.1:{port}"]
        argv += ["--preload"] if preload else []
        argv += no_control_socket() + ["--graceful-timeout", "5", f"{APP}:app"]
        server = Server(argv, env, port, tmp_path / f"gunicorn-{len(started)}.err")
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()
    wait_for_listeners(sql, 0, "after gunicorn ended")


@pytest.fixture()
def gunicorn(
    env: dict[str, str], sql: SQL, tmp_path: Path, make_app: MakeApp
) -> Iterator[Callable[..., Server]]:
    """Start ``gunicorn -w 2 [--preload] [-k CLASS]`` serving workers_app (the
    orders table and its triggers exist); afterwards its whole process group
    is killed and its listener sessions are gone."""
    orders_app(make_app, sql)
    with gunicorn_servers(env, sql, tmp_path) as start:
        yield start


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_each_worker_listens_receives_each_row_once_and_stops(
    gunicorn: Callable[..., Server], sql: SQL, preload: bool, worker_class: str
) -> None:
    """Each of the two workers has its own listener session, the master
    none, before any request; each row reaches each worker exactly once
    and the master never. With --preload the master imported the app (and
    did not listen); without it each worker imported it. Under gevent the
    listener's threads are the worker's greenlets (receivers run on its
    main thread), even when the master imported the app before gevent
    patched anything. SIGTERM to the master ends it all within the
    graceful timeout, with no traceback, and the sessions close."""
    t0 = time.monotonic()
    server = gunicorn(preload, worker_class)
    workers = server.wait_listeners(2)
    assert server.master not in workers, "the gunicorn master started a listener"
    wait_for_listeners(sql, 2, "with two workers")
    t_listening = time.monotonic() - t0
    assert_sessions_held_by(sql, workers, [server.master])
    imported = server.pids("imported")
    if preload:
        assert imported == [server.master], server.lines
    else:
        assert sorted(imported) == sorted(workers), server.lines
    where = "the main thread" if worker_class == "gevent" else "a thread of their own"
    assert server.threads() == {where}, server.lines

    for pk in (1, 2, 3):
        sql("INSERT INTO orders VALUES (%s, 'x')", (pk,))
    # Row 4 is a marker: once each worker has printed it, it has printed
    # everything before it.
    sql("INSERT INTO orders VALUES (4, 'marker')")
    server.wait_received(workers, 4)
    got = server.received()
    assert got == {pid: [1, 2, 3, 4] for pid in workers}, got

    # Only now the first request: the listeners did not need one.
    response = server.get("/")
    assert response.startswith(b"HTTP/1.1 200") or response.startswith(b"HTTP/1.0 200")
    assert int(response.rsplit(b"ok ", 1)[1]) in workers
    assert listener_count(sql) == 2

    took = server.stop(signal.SIGTERM)
    wait_for_listeners(sql, 0, "after gunicorn stopped")
    assert server.received() == got, "a row arrived twice, or in the master"
    print(
        f"\ngunicorn -k {worker_class} {'--preload' if preload else '(no --preload)'}: "
        f"workers listening {t_listening:.3f}s after start; stopped {took:.3f}s after SIGTERM"
    )


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_a_killed_worker_is_replaced_with_its_own_listener(
    gunicorn: Callable[..., Server], sql: SQL, preload: bool
) -> None:
    """SIGKILL one worker: gunicorn forks a replacement, which starts its
    own listener; the dead worker's session goes away; each row then
    reaches the survivor and the replacement once each."""
    server = gunicorn(preload)
    workers = server.wait_listeners(2)
    wait_for_listeners(sql, 2, "with two workers")
    victim = min(workers)
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    server.wait(
        lambda _: any(pid not in workers for pid in server.pids("listener connected")),
        "the replacement worker's listener",
    )
    t_replaced = time.monotonic() - t_kill
    (replacement,) = [p for p in server.pids("listener connected") if p not in workers]
    assert replacement != server.master
    survivors = (workers - {victim}) | {replacement}
    assert_sessions_held_by(sql, survivors, [server.master])
    print(f"\nworker {victim} killed: replacement {replacement} listening after {t_replaced:.3f}s")

    sql("INSERT INTO orders VALUES (1, 'x')")
    sql("INSERT INTO orders VALUES (2, 'marker')")
    server.wait_received(survivors, 2)
    got = server.received()
    assert got == {pid: [1, 2] for pid in survivors}, got
    assert server.pids("listener connected").count(replacement) == 1


# -- WAL capture ---------------------------------------------------------------

LEADS = "leads the WAL slot"
TAKEOVER_WITHIN = 5.0  # seconds after the leader is killed


class WalGunicorn(NamedTuple):
    start: Callable[..., Server]
    sql: SQL
    slot: str


@pytest.fixture()
def wal_gunicorn(logical_url: str, tmp_path: Path) -> Iterator[WalGunicorn]:
    """As ``gunicorn``, with workers_app in WAL capture mode
    (``DBNOTIFY_CAPTURE = "wal"``) on a database of the logical server:
    orders watched, its publication and slot made."""
    slot = f"slot_{make_url(logical_url).database}"
    sql = SQL(logical_url)
    try:
        sql("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        factory, _ = app_factory(
            logical_url, "installer", DBNOTIFY_CAPTURE="wal", DBNOTIFY_SLOT=slot
        )
        app, ext = factory()
        ext.watch("orders")
        ext.install_triggers(app)
        ext.close(app)
        env = app_env(logical_url)
        env.update(DBNOTIFY_TEST_APP_CAPTURE="wal", DBNOTIFY_TEST_APP_SLOT=slot)
        with gunicorn_servers(env, sql, tmp_path) as start:
            yield WalGunicorn(start, sql, slot)
    finally:
        sql.close()


def slot_holders(sql: SQL, slot: str, pids: list[int]) -> list[int]:
    """Which of ``pids`` hold the connection that streams ``slot`` (its
    walsender's client port); none if nobody streams it."""
    ports = [
        port
        for (port,) in sql(
            "SELECT a.client_port FROM pg_replication_slots s "
            "JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = %s",
            (slot,),
        )
    ]
    return [pid for pid in pids if set(ports) & local_ports(pid)]


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_wal_capture_one_worker_leads_and_each_receives_each_row_once(
    wal_gunicorn: WalGunicorn, preload: bool
) -> None:
    """In WAL capture mode, with and without --preload: each worker has its
    own listener, the master none; exactly one worker leads (it says so,
    and the slot's replication connection is its own), the master never;
    each row reaches each worker exactly once; SIGTERM ends it all without
    a traceback and frees the slot."""
    start, sql, slot = wal_gunicorn
    server = start(preload)
    workers = server.wait_listeners(2)
    assert server.master not in workers, "the gunicorn master started a listener"
    wait_for_listeners(sql, 2, "with two workers")
    assert_sessions_held_by(sql, workers, [server.master])
    server.wait(lambda _: bool(server.pids(LEADS)), "a worker to lead")
    (leader,) = server.pids(LEADS)
    assert leader in workers, f"{leader} leads, not a worker of {sorted(workers)}"
    holders = poll_until(
        lambda: slot_holders(sql, slot, [server.master, *workers]),
        "the slot to be streamed by a process of gunicorn's",
    )
    assert holders == [leader], f"the slot is streamed by {holders}, {leader} said it leads"

    for pk in range(1, 101):
        sql("INSERT INTO orders VALUES (%s, 'x')", (pk,))
    sql("INSERT INTO orders VALUES (101, 'marker')")  # once in, nothing is in flight
    server.wait_received(workers, 101)
    got = server.received()
    assert got == {pid: list(range(1, 102)) for pid in workers}, got
    assert server.pids(LEADS) == [leader], server.lines
    assert slot_holders(sql, slot, [server.master, *workers]) == [leader]

    server.stop(signal.SIGTERM)
    assert server.received() == got, "a row arrived twice, or in the master"
    assert server.pids(LEADS) == [leader], server.lines
    poll_until(
        lambda: sql("SELECT NOT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)),
        "the slot to be free after gunicorn stopped",
    )


def test_wal_capture_a_killed_leading_worker_is_succeeded(wal_gunicorn: WalGunicorn) -> None:
    """SIGKILL the worker that leads: another process of gunicorn's (the
    other worker, or the replacement) leads within 5 s, and each row then
    reaches the survivor and the replacement once each."""
    start, sql, slot = wal_gunicorn
    server = start(False)
    workers = server.wait_listeners(2)
    server.wait(lambda _: bool(server.pids(LEADS)), "a worker to lead")
    (victim,) = server.pids(LEADS)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    server.wait(
        lambda _: len(server.pids(LEADS)) == 2,
        f"another process to lead within {TAKEOVER_WITHIN}s of the kill",
        killed_at + TAKEOVER_WITHIN,
    )
    took = time.monotonic() - killed_at
    server.wait(
        lambda _: any(pid not in workers for pid in server.pids("listener connected")),
        "the replacement worker's listener",
    )
    (replacement,) = [p for p in server.pids("listener connected") if p not in workers]
    survivors = (workers - {victim}) | {replacement}
    successor = server.pids(LEADS)[1]
    print(f"\nleading worker killed: {successor} leads {took:.2f}s later")
    assert successor in survivors, (successor, survivors)
    assert slot_holders(sql, slot, [server.master, *survivors]) == [successor]

    sql("INSERT INTO orders VALUES (1, 'x')")
    sql("INSERT INTO orders VALUES (2, 'marker')")
    server.wait_received(survivors, 2)
    got = {pid: pks for pid, pks in server.received().items() if pid in survivors}
    assert got == {pid: [1, 2] for pid in survivors}, server.received()


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [(("shell",), b"exit()\n", "App: tests.apps.workers_app"), (("routes",), b"", "index")],
    ids=["shell", "routes"],
)
def test_flask_shell_and_routes_start_no_listener(
    env: dict[str, str], sql: SQL, args: tuple[str, ...], stdin: bytes, expected: str
) -> None:
    """`flask shell` (leaving at once) and `flask routes` load the autostart
    app, start no listener, and exit promptly."""
    sql("CREATE TABLE orders (id int PRIMARY KEY, note text)")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "flask"), "--app", APP, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    out, err = Lines(proc.stdout, "stdout"), Lines(proc.stderr, "stderr")
    sessions = 0
    try:
        # Watch pg_stat_activity for as long as it runs (draining its pipes).
        while proc.poll() is None:
            sessions = max(sessions, listener_count(sql))
            out.drain()
            err.drain()
            if time.monotonic() - t0 > WAIT:
                raise AssertionError(f"`flask {args[0]}` still running after {WAIT}s")
        took = time.monotonic() - t0
        stdout, stderr = out.rest(), err.rest()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=WAIT)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    print(f"\nflask {args[0]}: exited after {took:.3f}s")
    assert proc.returncode == 0, stderr
    assert f"workers_app: imported pid={proc.pid}" in stdout, "the app was not loaded"
    assert expected in "\n".join(stdout + stderr)
    assert not [line for line in stdout if "listener connected" in line], stdout
    assert sessions == 0, "a listener session was open while the command ran"
