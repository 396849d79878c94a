"""``flask`` subprocesses: ``dbnotify listen`` prints events; other commands
start no listener; ``flask run`` listens once, with or without the reloader.

The app is tests/apps/orders_app.py: it watches ``orders`` with
DBNOTIFY_AUTOSTART on, and prints a line on stderr whenever a listener of
its process connects.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_dbnotify import DBNotify

from .conftest import SQL, WAIT

MakeApp = Callable[..., tuple[Flask, DBNotify]]
ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")
APP = "tests.apps.orders_app"
LISTENER_NAME = "flask-dbnotify listener"
CONNECTED = "orders_app: listener connected"


class Lines:
    """Reads lines from a pipe with bounded waits."""

    def __init__(self, stream: Any, name: str) -> None:
        self.fd = stream.fileno()
        self.name = name
        self.buf = b""
        self.seen: list[str] = []

    def _fill(self, deadline: float) -> bool:
        """Read what is available before ``deadline``; False at end of file."""
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.fd], [], [], left)[0]:
            return True
        chunk = os.read(self.fd, 65536)
        self.buf += chunk
        return bool(chunk)

    def drain(self) -> None:
        """Take in whatever is ready now, without waiting."""
        self._fill(time.monotonic() + 0.005)

    def readline(self, what: str, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no {what} on {self.name} within {timeout}s; so far: {self.seen!r} "
                    f"+ {self.buf!r}"
                )
            if not self._fill(deadline):
                raise AssertionError(f"{self.name} closed before {what}; got {self.seen!r}")
        raw, _, self.buf = self.buf.partition(b"\n")
        line = raw.decode()
        self.seen.append(line)
        return line

    def wait_for(self, text: str, timeout: float = WAIT) -> str:
        """The first line containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(repr(text), max(0.0, deadline - time.monotonic()))
            if text in line:
                return line

    def rest(self, timeout: float = WAIT) -> list[str]:
        """Every remaining line, up to end of file."""
        deadline = time.monotonic() + timeout
        while self._fill(deadline):
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name} still open after {timeout}s")
        lines = self.buf.decode().splitlines()
        self.buf = b""
        self.seen += lines
        return lines


def listener_count(sql: SQL) -> int:
    rows = sql(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = %s",
        (LISTENER_NAME,),
    )
    return int(rows[0][0])


def wait_for_listeners(sql: SQL, count: int, what: str) -> None:
    """Poll pg_stat_activity (bounded) until ``count`` listener sessions exist."""
    deadline = time.monotonic() + WAIT
    while (found := listener_count(sql)) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} listener sessions {what}, found {found}")
        time.sleep(0.02)


@pytest.fixture()
def env(pg_url: str, sql: SQL) -> dict[str, str]:
    """Environment for ``flask`` subprocesses; the orders table exists."""
    sql("CREATE TABLE orders (id int PRIMARY KEY, note text)")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    environ.update(
        DBNOTIFY_TEST_APP_DATABASE_URL=pg_url,
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    return environ


@pytest.fixture()
def spawn(env: dict[str, str], sql: SQL) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``flask --app tests.apps.orders_app ARGS`` in its own process
    group; afterwards the group is killed and its listeners are gone."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [FLASK, "--app", APP, *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        kill_group(proc, 5)  # the reloader's child is in the same group
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    wait_for_listeners(sql, 0, "after the flask processes ended")


def install_triggers(env: dict[str, str]) -> None:
    result = subprocess.run(
        [FLASK, "--app", APP, "dbnotify", "install-triggers"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_listen_prints_json_lines_and_exits_after_count(
    spawn: Callable[..., subprocess.Popen[bytes]],
    env: dict[str, str],
    make_app: MakeApp,
    sql: SQL,
) -> None:
    """`flask dbnotify listen --count 2` prints one JSON object per event (a
    row change, then a message) and exits 0 after the second."""
    install_triggers(env)
    _, sender = make_app()
    proc = spawn("dbnotify", "listen", "--count", "2")
    out, err = Lines(proc.stdout, "stdout"), Lines(proc.stderr, "stderr")
    err.wait_for("listening")

    sql("INSERT INTO orders VALUES (7, 'hello')")
    sender.notify("greeting", {"text": "hi", "n": [1, 2]})
    row = json.loads(out.readline("the row event"))
    message = json.loads(out.readline("the message"))
    assert proc.wait(timeout=WAIT) == 0, err.rest()
    assert out.rest() == []

    assert row["table"] == "orders"
    assert row["op"] == "INSERT"
    assert row["pk"] == 7
    assert row["new"] == {"id": 7, "note": "hello"}
    assert row["old"] is None
    assert message == {"channel": "greeting", "payload": {"text": "hi", "n": [1, 2]}}
    # `listen` starts its listener itself: autostart must not add another.
    err.rest()
    assert [line for line in err.seen if CONNECTED in line] == [f"{CONNECTED} pid={proc.pid}"], (
        err.seen
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("dbnotify", "install-triggers"), "installed triggers for 1 watch"),
        (("dbnotify", "status"), "orders"),
        (("dbnotify", "install-triggers", "--sql"), "CREATE TRIGGER"),
    ],
    ids=["install-triggers", "status", "install-sql"],
)
def test_other_commands_start_no_listener(
    spawn: Callable[..., subprocess.Popen[bytes]],
    sql: SQL,
    args: tuple[str, ...],
    expected: str,
) -> None:
    """CLI commands other than `listen` exit promptly and never open a
    listener, although the app has DBNOTIFY_AUTOSTART on."""
    proc = spawn(*args)
    out, err = Lines(proc.stdout, "stdout"), Lines(proc.stderr, "stderr")
    deadline = time.monotonic() + 30
    sessions = 0
    # Watch pg_stat_activity for as long as the command runs (draining its
    # pipes so it never blocks on a full one).
    while proc.poll() is None:
        sessions = max(sessions, listener_count(sql))
        out.drain()
        err.drain()
        if time.monotonic() > deadline:
            raise AssertionError(f"`flask {' '.join(args)}` still running after 30s")
    stdout, stderr = out.rest(), err.rest()
    assert proc.returncode in (0, 1), stderr  # status exits 1 while triggers are missing
    assert expected in "\n".join(stdout), stdout
    assert sessions == 0, "a listener session was open while the command ran"
    assert not [line for line in stderr if CONNECTED in line], stderr


def kill_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """End ``proc`` and everything left in its process group: TERM, then
    KILL if it has not ended within ``timeout``; then KILL the group for
    children that outlived it, and reap ``proc``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"flask run exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"flask run did not open port {port} in {WAIT}s") from None
            time.sleep(0.05)


@pytest.mark.parametrize("reload", [False, True], ids=["no-reload", "reload"])
def test_flask_run_listens_once_without_a_request(
    spawn: Callable[..., subprocess.Popen[bytes]], sql: SQL, reload: bool
) -> None:
    """`flask run` with autostart has one listener as soon as it serves,
    before any request; with the reloader it is the child's, not two."""
    port = free_port()
    proc = spawn("run", "--port", str(port), "--reload" if reload else "--no-reload")
    err = Lines(proc.stderr, "stderr")
    line = err.wait_for(CONNECTED)
    wait_for_listeners(sql, 1, "in the serving process")
    wait_for_port(port, proc)
    assert listener_count(sql) == 1
    listener_pid = int(line.rsplit("pid=", 1)[1])
    if reload:
        assert listener_pid != proc.pid, "the reloader's watcher process started a listener"
    else:
        assert listener_pid == proc.pid
    # Nothing else connects while the server runs: flush stderr up to a
    # request's log line, then count.
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        assert conn.recv(1024).startswith(b"HTTP/1.")
    err.wait_for('"GET / HTTP/1.0" 200')
    assert [x for x in err.seen if CONNECTED in x] == [line]
    assert listener_count(sql) == 1
