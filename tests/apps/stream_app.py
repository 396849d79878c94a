"""A server-sent events app for gunicorn, and the writer that feeds it.

tests/test_stream_fanout.py and benchmarks/streams.py run it as
``gunicorn 'tests.apps.stream_app:create_app()'`` (a factory: importing
this module starts nothing), configured by the environment:

- ``DBNOTIFY_STREAM_APP_URL``: the database URL (``sqlite:///PATH`` or
  ``postgresql://...``), where :func:`prepare` made the ``ticks`` table
  and installed its triggers;
- ``DBNOTIFY_STREAM_APP_BUFFER``, ``DBNOTIFY_STREAM_APP_KEEPALIVE``: if
  set, ``DBNOTIFY_STREAM_BUFFER`` and ``DBNOTIFY_STREAM_KEEPALIVE``.

Routes: ``/ticks`` streams every change of ``ticks`` (``?sndbuf=BYTES``
fixes the connection's send buffer, for a client meant to stall);
``/ready`` says
(JSON) whether the listener is connected, the process's pid and how many
streams it holds.

``python -m tests.apps.stream_app URL FIRST RATE SECONDS OUT`` inserts
rows ``FIRST``, ``FIRST + 1``, ... into ``ticks``, one per transaction,
``RATE`` a second for ``SECONDS`` seconds (paced by the clock: a load,
not a handshake), then writes to the file ``OUT`` one JSON list:
``time.monotonic()`` when each row's commit returned, in order (the clock
is the machine's, so another process can compare its readings with it).

:class:`Clients` reads many streams of one server from one thread
(sockets and a selector), as the test and the benchmark do.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import selectors
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from subprocess import DEVNULL, Popen
from typing import Any

from flask import Flask, request

from flask_dbnotify import DBNotify

TABLE = "ticks"
SCHEMA = f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, note TEXT)"


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["DBNOTIFY_DATABASE_URI"] = os.environ["DBNOTIFY_STREAM_APP_URL"]
    app.config["DBNOTIFY_AUTOSTART"] = True
    app.config["DBNOTIFY_CHECK_TRIGGERS"] = False
    if "DBNOTIFY_STREAM_APP_BUFFER" in os.environ:
        app.config["DBNOTIFY_STREAM_BUFFER"] = int(os.environ["DBNOTIFY_STREAM_APP_BUFFER"])
    if "DBNOTIFY_STREAM_APP_KEEPALIVE" in os.environ:
        app.config["DBNOTIFY_STREAM_KEEPALIVE"] = float(os.environ["DBNOTIFY_STREAM_APP_KEEPALIVE"])
    dbnotify = DBNotify()
    # Durable on PostgreSQL too, so that every event has an id (as on SQLite).
    dbnotify.watch(TABLE, durable=True)
    dbnotify.init_app(app)

    @app.get("/ticks")
    def ticks() -> Any:
        sndbuf = request.args.get("sndbuf", type=int)
        if sndbuf is not None:
            # A fixed send buffer for this connection (the kernel would
            # grow it to megabytes), so that a client that does not read
            # holds up its stream after a few kilobytes.
            conn = request.environ["gunicorn.socket"]
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        return dbnotify.stream(TABLE)

    @app.get("/ready")
    def ready() -> Any:
        return {
            "connected": dbnotify.listener_state().connected,
            "pid": os.getpid(),
            "streams": app.extensions["dbnotify"].served.hub.streams,
        }

    return app


def prepare(url: str) -> None:
    """Make the ``ticks`` table and install its triggers (from this process)."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.split(":///", 1)[1]) as conn:
            conn.execute(SCHEMA)
    else:
        import psycopg2

        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(SCHEMA.replace("INTEGER", "bigint"))
        conn.close()
    app = Flask("stream_app_installer")
    app.config.update(DBNOTIFY_DATABASE_URI=url, DBNOTIFY_AUTOSTART=False)
    dbnotify = DBNotify()
    dbnotify.watch(TABLE, durable=True)
    dbnotify.init_app(app)
    dbnotify.install_triggers(app)
    dbnotify.close(app)


def write(url: str, first: int, rate: float, seconds: float) -> list[float]:
    """Insert ``rate * seconds`` rows from id ``first`` on, ``rate`` a
    second, one per commit: when each commit returned (``time.monotonic()``)."""
    insert = f"INSERT INTO {TABLE} (id, note) VALUES (%s, %s)"
    conn: Any
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split(":///", 1)[1], timeout=30, isolation_level=None)
        # WAL mode (install-triggers set it): no fsync per commit, as on a
        # server with synchronous_commit off; the load is the point here.
        conn.execute("PRAGMA synchronous = NORMAL")
        insert = insert.replace("%s", "?")
    else:
        import psycopg2

        conn = psycopg2.connect(url)
        conn.autocommit = True
    cur = conn.cursor()
    count = round(rate * seconds)
    committed = []
    start = time.monotonic()
    for pk in range(first, first + count):
        due = start + (pk - first) / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        cur.execute(insert, (pk, f"row {pk}"))
        committed.append(time.monotonic())
    conn.close()
    return committed


def start_writer(url: str, first: int, rate: float, seconds: float, out: str) -> Popen[bytes]:
    """:func:`write` in a process of its own (off this one's GIL); its
    times land in the file ``out`` when it is done."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = [sys.executable, "-m", __name__, url, str(first), str(rate), str(seconds), out]
    return Popen(argv, cwd=root, env={**os.environ, "PYTHONPATH": root}, stdin=DEVNULL)


def http_get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """Status and body of a GET (HTTP/1.0: the server closes when done)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def ready(port: int, timeout: float) -> dict[str, Any]:
    """``/ready``'s answer."""
    status, body = http_get(port, "/ready", timeout)
    assert status == 200, (status, body)
    answer: dict[str, Any] = json.loads(body)
    return answer


#: An event of the stream (as stream() writes it: the primary key comes
#: first in the data line after the table and operation).
_EVENT = re.compile(rb"^event: (\w+)\ndata: [^\n]*?\"pk\":(\d+)", re.M)
_COMMENTS = (b": connected\n\n", b": keep-alive\n\n")
_GAP = b"event: gap\n"


class Stream:
    """One client's stream: what it received, and when."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        """A stream of ``/ticks``; with ``rcvbuf``, this socket's receive
        buffer and the server's send buffer are that small."""
        self.sock = socket.socket()
        if rcvbuf is not None:
            # Before connect, so that the window offered is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        path = "/ticks" if rcvbuf is None else f"/ticks?sndbuf={rcvbuf}"
        self.sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        self.sock.setblocking(False)
        self.buf = b""
        self.head: bytes | None = None
        self.connected = False
        #: Primary keys of the insert events received, in order.
        self.pks: list[int] = []
        #: (time.monotonic() of a read, how many events it completed).
        self.reads: list[tuple[float, int]] = []
        #: The gap event's text, and how many events came before it.
        self.gap: bytes | None = None
        self.before_gap = 0
        self.ended = False
        #: Frames this client did not expect (other events, events after a gap).
        self.unexpected: list[bytes] = []

    def take(self, chunk: bytes, now: float) -> None:
        """Parse what a read returned (whole frames; the rest waits)."""
        self.buf += chunk
        if self.head is None:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            self.head, self.buf = head, rest
            if head.split(b" ", 2)[1:2] != [b"200"] or b"text/event-stream" not in head:
                self.unexpected.append(head)
        end = self.buf.rfind(b"\n\n")
        if end < 0:
            return
        block, self.buf = self.buf[: end + 2], self.buf[end + 2 :]
        found = _EVENT.findall(block)
        gap = block.find(_GAP)
        comments = sum(block.count(c) for c in _COMMENTS)
        if comments and not self.connected:
            self.connected = b": connected\n\n" in block
        if block.count(b"\n\n") != len(found) + comments + (gap >= 0):
            self.unexpected.append(block)
        if gap >= 0:
            if self.gap is not None or block.rfind(b"event: insert") > gap:
                self.unexpected.append(block)
            self.gap = block[gap : block.find(b"\n\n", gap)]
            self.before_gap = len(self.pks) + len(found)
        elif self.gap is not None and found:
            self.unexpected.append(block)
        for kind, _ in found:
            if kind != b"insert":
                self.unexpected.append(block)
        if found:
            self.pks.extend(int(pk) for _, pk in found)
            self.reads.append((now, len(found)))

    def latencies(self, committed: dict[int, float]) -> list[float]:
        """For each event received: seconds from its row's commit to its read."""
        out = []
        pks = iter(self.pks)
        for at, count in self.reads:
            for _ in range(count):
                out.append(at - committed[next(pks)])
        return out

    def close(self) -> None:
        self.sock.close()


class Clients:
    """Streams read from one thread, with a selector: bounded waits only."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.streams: list[Stream] = []

    def open(self, port: int, rcvbuf: int | None = None, read: bool = True) -> Stream:
        stream = Stream(port, rcvbuf)
        self.streams.append(stream)
        if read:
            self.read(stream)
        return stream

    def read(self, stream: Stream) -> None:
        """Start reading ``stream`` (one opened with ``read=False``)."""
        self.selector.register(stream.sock, selectors.EVENT_READ, stream)

    def pump(self, until: Callable[[], bool], what: str, timeout: float) -> None:
        """Read whatever arrives until ``until()`` holds; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{what}: not within {timeout}s")
            for key, _ in self.selector.select(min(left, 0.05)):
                stream: Stream = key.data
                try:
                    chunk = stream.sock.recv(1 << 18)
                except BlockingIOError:
                    continue
                if chunk:
                    stream.take(chunk, time.monotonic())
                else:
                    stream.ended = True
                    self.selector.unregister(stream.sock)

    def close(self) -> None:
        for stream in self.streams:
            if not stream.ended:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(stream.sock)
            stream.close()
        self.selector.close()


def percentile(values: list[float], share: float) -> float:
    """The value below which ``share`` of sorted ``values`` lie (nearest rank)."""
    return values[min(len(values) - 1, max(0, math.ceil(share * len(values)) - 1))]


if __name__ == "__main__":
    url, first, rate, seconds, out = sys.argv[1:6]
    times = write(url, int(first), float(rate), float(seconds))
    with open(out, "w") as file:
        json.dump(times, file)
