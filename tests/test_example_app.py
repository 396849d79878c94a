"""The example app, run as the README runs it: its page streams every order
change, including changes made by other processes, on SQLite (its default)
and on PostgreSQL (given a URL)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from ._helpers import WAIT, Backend, Lines, free_port

# Triggers mode and SQLite only: the example app chooses its capture itself.
pytestmark = pytest.mark.backends("postgresql", "sqlite")

ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")


@contextmanager
def running_example(database: str) -> Iterator[dict[str, Any]]:
    """The example app on ``database``, as its docstring runs it: triggers
    installed, then ``flask run`` on a free port."""
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
        # The app starts its listener before it serves: nothing after this is missed.
        Lines(server.stderr, "server stderr").wait_for("Running on")
        yield {"port": port, "env": env, "database": database}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(WAIT)
        assert server.stdout is not None and server.stderr is not None
        server.stdout.close()
        server.stderr.close()


@pytest.fixture()
def example(backend: Backend) -> Iterator[dict[str, Any]]:
    """The example running on each kind of database in turn."""
    with running_example(backend.url) as running:
        yield running


class Writer:
    """Another connection to the example's database (sqlite3 or psycopg2,
    autocommit); statements take ``%s`` placeholders."""

    def __init__(self, database: str) -> None:
        self.sqlite = database.startswith("sqlite")
        if self.sqlite:
            path = database.removeprefix("sqlite:///")
            self.conn: Any = sqlite3.connect(path, isolation_level=None)
        else:
            self.conn = psycopg2.connect(database)
            self.conn.autocommit = True

    def __call__(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = self.conn.cursor()
        try:
            cur.execute(statement.replace("%s", "?") if self.sqlite else statement, params)
            return cur.fetchall() if cur.description else []
        finally:
            cur.close()

    def close(self) -> None:
        self.conn.close()


def request(
    port: int, method: str, path: str, form: str | None = None, accept: str = "text/html"
) -> tuple[int, str | None, bytes]:
    """``(status, Location, body)`` of one request, redirects not followed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    headers = {"Accept": accept, "Content-Type": "application/x-www-form-urlencoded"}
    try:
        conn.request(method, path, form, headers)
        response = conn.getresponse()
        return response.status, response.getheader("Location"), response.read()
    finally:
        conn.close()


def open_stream(port: int) -> tuple[socket.socket, Lines]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
    lines = Lines(sock, "event stream")
    lines.wait_for(": connected")
    return sock, lines


def next_event(lines: Lines) -> dict[str, Any]:
    """The next change on the stream, as the page reads it: the operation,
    the row (new, or old for a DELETE) and the changed columns."""
    data = json.loads(lines.wait_for("data: ").partition("data: ")[2])
    return {"op": data["op"], **(data["new"] or data["old"]), "changed": data["changed"]}


def test_outside_changes_reach_the_page(example: dict[str, Any]) -> None:
    """A script and a raw database connection change orders; the page's
    event stream shows both, and the page's list has the order. The script
    says which database it wrote to, without its password."""
    database = example["database"]
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
        said, _, where = added.stdout.strip().rpartition(" (")
        assert said == f"added order #{event['id']}: green tea"
        url, printed = make_url(database), make_url(where.removesuffix(")"))
        assert (printed.host, printed.port, printed.database) == (url.host, url.port, url.database)
        if url.password:
            assert url.password not in added.stdout

        writer = Writer(database)
        writer("UPDATE orders SET status = 'packed' WHERE id = %s", event["id"])
        writer.close()
        event = next_event(lines)
        assert (event["op"], event["status"], event["changed"]) == ("UPDATE", "packed", ["status"])

    status, _, body = request(example["port"], "GET", "/orders.json")
    assert status == 200
    assert json.loads(body) == [{"id": event["id"], "item": "green tea", "status": "packed"}]


@pytest.mark.backends("sqlite")
def test_the_board_answers_forms_and_fetch(example: dict[str, Any]) -> None:
    """The page's forms work without JavaScript (a redirect back to the
    board) and with fetch() (the order as JSON); the list is newest first."""
    port = example["port"]
    status, _, page = request(port, "GET", "/")
    assert status == 200 and b"Order board" in page
    assert request(port, "POST", "/orders", "item=tea")[:2] == (303, "/")
    status, _, body = request(port, "POST", "/orders", "item=cake", "application/json")
    assert (status, json.loads(body)) == (201, {"id": 2, "item": "cake", "status": "new"})
    status, _, body = request(port, "POST", "/orders/1/ship", "", "application/json")
    assert (status, json.loads(body)) == (200, {"id": 1, "item": "tea", "status": "shipped"})
    assert request(port, "POST", "/orders/2/ship", "")[:2] == (303, "/")
    assert request(port, "POST", "/orders/9/ship", "", "application/json")[0] == 404
    _, _, body = request(port, "GET", "/orders.json")
    assert json.loads(body) == [
        {"id": 2, "item": "cake", "status": "shipped"},
        {"id": 1, "item": "tea", "status": "shipped"},
    ]
