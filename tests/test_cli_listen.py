"""``flask`` subprocesses: ``dbnotify listen`` prints events; other commands
start no listener; ``flask run`` listens once, with or without the reloader.

The app is tests/apps/orders_app.py: it watches ``orders`` with
DBNOTIFY_AUTOSTART on, and prints a line on stderr whenever a listener of
its process connects.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from flask_dbnotify import DBNotify

from ._helpers import SQL, WAIT, Lines, free_port, kill_group, listener_count, wait_for_listeners

MakeApp = Callable[..., tuple[Flask, DBNotify]]
ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")
APP = "tests.apps.orders_app"
CONNECTED = "orders_app: listener connected"


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
    assert message == {
        "channel": "greeting",
        "payload": {"text": "hi", "n": [1, 2]},
        "context": None,
    }
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
