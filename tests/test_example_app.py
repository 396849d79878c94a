"""The example app, run as the README runs it: its page streams every order
change, including changes made by other processes, on SQLite (its default)
and on PostgreSQL (given a URL)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from .conftest import WAIT
from .test_cli_listen import Lines

ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'example.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture()
def example(database: str) -> Iterator[dict[str, Any]]:
    env = {**os.environ, "EXAMPLE_DATABASE_URL": database, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [FLASK, "--app", "example_app", "dbnotify", "install-triggers"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    port = free_port()
    server = subprocess.Popen(
        [FLASK, "--app", "example_app", "run", "--no-reload", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        Lines(server.stderr, "server stderr").wait_for("Running on")
        yield {"port": port, "env": env, "database": database}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(WAIT)
        assert server.stdout is not None and server.stderr is not None
        server.stdout.close()
        server.stderr.close()


def open_stream(port: int) -> tuple[socket.socket, Lines]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
    lines = Lines(sock, "event stream")
    lines.wait_for(": connected")
    return sock, lines


def next_event(lines: Lines) -> dict[str, Any]:
    return json.loads(lines.wait_for("data: ").partition("data: ")[2])  # type: ignore[no-any-return]


def test_outside_changes_reach_the_page(example: dict[str, Any]) -> None:
    """A script and a raw database connection change orders; the page's
    event stream shows both, and the page lists the order."""
    sock, lines = open_stream(example["port"])
    with sock:
        added = subprocess.run(
            [sys.executable, "-m", "example_app.add_order", "green", "tea"],
            cwd=ROOT,
            env=example["env"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
        event = next_event(lines)
        assert (event["op"], event["item"], event["status"]) == ("INSERT", "green tea", "new")

        update = "UPDATE orders SET status = 'packed' WHERE id = %s"
        database = example["database"]
        if database.startswith("sqlite"):
            conn = sqlite3.connect(database.removeprefix("sqlite:///"), isolation_level=None)
            conn.execute(update.replace("%s", "?"), (event["id"],))
        else:
            conn = psycopg2.connect(database)
            conn.autocommit = True
            conn.cursor().execute(update, (event["id"],))
        conn.close()
        event = next_event(lines)
        assert (event["op"], event["status"], event["changed"]) == ("UPDATE", "packed", ["status"])

    with socket.create_connection(("127.0.0.1", example["port"]), timeout=WAIT) as page:
        page.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        body = b""
        deadline = time.monotonic() + WAIT
        while chunk := page.recv(65536):
            body += chunk
            assert time.monotonic() < deadline, "the page did not finish loading"
    assert b"green tea" in body and b"packed" in body
