"""``DBNotify.stream()``: server-sent events, served by a real threaded
WSGI server and read over HTTP, on every backend. Live events in order,
filtered as asked; a client that comes back with ``Last-Event-ID`` gets
what it missed from the journal, then live events, each once; one that
cannot be resumed, or that falls a whole buffer behind, gets
``event: gap``; a client that goes leaves nothing behind."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from flask_dbnotify import DBNotify
from flask_dbnotify._stream import Selection, default_serializer, run
from flask_dbnotify.testing import collect_events, make_event

from ._helpers import SQL, WAIT, Backend, listener_backends, poll_until

ORDERS = "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT, status TEXT)"


@contextmanager
def serving(app: Flask) -> Iterator[int]:
    """``app`` on a threaded WSGI server on a free port, stopped after."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join(WAIT)


class Client:
    """One EventSource-like reader of a stream: frames as dicts."""

    def __init__(self, port: int, path: str, last_event_id: str | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        self.buffer = b""

    def frame(self) -> dict[str, str]:
        """The next event or comment; a read that stalls for WAIT fails."""
        while b"\n\n" not in self.buffer:
            chunk = self.response.read1(65536)
            assert chunk, f"the stream ended; unread: {self.buffer!r}"
            self.buffer += chunk
        text, self.buffer = self.buffer.split(b"\n\n", 1)
        fields: dict[str, str] = {}
        for line in text.decode().split("\n"):
            name, _, value = line.partition(":")
            fields[name or "comment"] = value[1:] if value.startswith(" ") else value
        return fields

    def events(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` events (comments skipped), data decoded."""
        got = []
        while len(got) < count:
            fields = self.frame()
            if "event" in fields:
                fields["data"] = json.loads(fields["data"])
                got.append(fields)
        return got

    def close(self) -> None:
        self.response.close()
        self.conn.close()


def stream_app(backend: Backend, durable: bool = True, **config: Any) -> tuple[Flask, DBNotify]:
    """An app watching ``orders`` (durably on PostgreSQL, unless not
    ``durable``), started, with two streams: ``/paid`` and ``/all``."""
    backend.sql(ORDERS)
    app, ext = backend.make_app(DBNOTIFY_STREAM_KEEPALIVE=0.2, **config)
    ext.watch("orders", durable=durable and backend.pg)

    @app.get("/paid")
    def paid() -> Any:
        return ext.stream("orders", ["insert", "update"], where={"status": "paid"}, messages="news")

    @app.get("/all")
    def everything() -> Any:
        return ext.stream(["orders"])

    ext.install_triggers(app)
    ext.start(app)
    return app, ext


def insert(backend: Backend, pk: int, status: str = "paid") -> None:
    backend.sql("INSERT INTO orders VALUES (?, ?, ?)", (pk, f"item {pk}", status))


def test_a_stream_sends_what_it_asks_for_as_it_commits(backend: Backend) -> None:
    """Rows committed by another writer arrive in commit order as events
    named after the operation, with the row as JSON and the journal id
    as the event id; rows the filter leaves out, operations not asked
    for and other channels' messages do not; an idle stream sends
    keep-alive comments."""
    app, ext = stream_app(backend)
    with serving(app) as port:
        client = Client(port, "/paid")
        assert client.response.getheader("Content-Type").startswith("text/event-stream")
        assert client.response.getheader("X-Accel-Buffering") == "no"
        assert client.response.getheader("Cache-Control") == "no-cache"
        poll_until(lambda: app.extensions["dbnotify"].served.hub.streams == 1, "the stream open")
        ext.notify("other", "not this channel", app=app)
        ext.notify("news", {"n": 1}, app=app)
        (message,) = client.events(1)
        assert message["event"] == "message" and "pk" not in message["data"]
        assert message["data"]["channel"] == "news" and message["data"]["payload"] == {"n": 1}
        insert(backend, 1)
        insert(backend, 2, "new")
        backend.sql("UPDATE orders SET status = 'paid' WHERE id = 2")
        backend.sql("DELETE FROM orders WHERE id = 1")
        got = client.events(2)
        assert [(e["event"], e["data"].get("pk")) for e in got] == [("insert", 1), ("update", 2)]
        first, second = got
        assert first["data"]["new"] == {"id": 1, "item": "item 1", "status": "paid"}
        assert first["data"]["op"] == "INSERT" and first["data"]["table"] == "orders"
        assert second["data"]["changed"] == ["status"]
        assert second["data"]["old"]["status"] == "new"
        assert first["id"] == str(first["data"]["id"]) and int(second["id"]) > int(first["id"])
        assert client.frame() == {"comment": "keep-alive"}
        client.close()


def test_a_client_that_comes_back_gets_what_it_missed_once(backend: Backend) -> None:
    """A client reads two events and goes; rows change meanwhile; it
    comes back with the last id it got: the missed rows come from the
    journal, then live ones, in order, none twice."""
    app, ext = stream_app(backend)
    with serving(app) as port:
        hub = app.extensions["dbnotify"].served.hub
        client = Client(port, "/all")
        poll_until(lambda: hub.streams == 1, "the stream open")
        insert(backend, 1)
        insert(backend, 2)
        seen = client.events(2)
        client.close()
        poll_until(lambda: hub.streams == 0, "the first stream closed")
        insert(backend, 3)
        backend.sql("UPDATE orders SET item = 'changed' WHERE id = 1")
        back = Client(port, "/all", last_event_id=seen[-1]["id"])
        missed = back.events(2)
        insert(backend, 4)
        live = back.events(1)
        back.close()
    got = seen + missed + live
    assert [(e["event"], e["data"]["pk"]) for e in got] == [
        ("insert", 1),
        ("insert", 2),
        ("insert", 3),
        ("update", 1),
        ("insert", 4),
    ]
    ids = [int(e["id"]) for e in got]
    assert ids == sorted(set(ids)), ids


@pytest.mark.backends("sqlite")  # the journal's reading, whatever the database
def test_a_client_too_far_behind_resumes_no_further_than_the_buffer(backend: Backend) -> None:
    """A client that comes back from further than DBNOTIFY_STREAM_BUFFER
    events gets the first of them, then ``event: gap``, then live events:
    no client can have the whole journal read for it."""
    app, ext = stream_app(backend, DBNOTIFY_STREAM_BUFFER=3)
    with collect_events("orders", count=5, timeout=WAIT):  # delivered before the client comes
        for pk in range(1, 6):
            insert(backend, pk)
    with serving(app) as port:
        client = Client(port, "/all", last_event_id="1")
        got = client.events(4)
        insert(backend, 6)
        got += client.events(1)
        client.close()
    assert [(e["event"], e["data"].get("pk")) for e in got] == [
        ("insert", 2),
        ("insert", 3),
        ("insert", 4),
        ("gap", None),
        ("insert", 6),
    ]


@pytest.mark.backends("postgresql")  # fast watches exist on PostgreSQL only
def test_a_stream_that_cannot_resume_says_so(backend: Backend) -> None:
    """Fast watches are not journaled: a client that comes back with a
    Last-Event-ID gets ``event: gap`` first, then live events."""
    app, _ = stream_app(backend, durable=False)
    with serving(app) as port:
        client = Client(port, "/all", last_event_id="7")
        gap = client.events(1)[0]
        assert gap["event"] == "gap" and "not journaled" in gap["data"]["reason"]
        insert(backend, 1)
        (event,) = client.events(1)
        assert event["event"] == "insert" and "id" not in event
        client.close()


@pytest.mark.backends("postgresql")  # a listener that loses events: fast watches only
def test_a_stream_says_when_the_listener_may_have_missed_changes(backend: Backend) -> None:
    """The listener's session is killed: changes of fast watches made
    before it listens again are lost, and every open stream says so with
    ``event: gap`` before the next change."""
    app, _ = stream_app(backend, durable=False, DBNOTIFY_RECONNECT_MAX_DELAY=0.2)
    with serving(app) as port:
        client = Client(port, "/all")
        poll_until(lambda: app.extensions["dbnotify"].served.hub.streams == 1, "the stream open")
        assert isinstance(backend.writer, SQL)
        ((pid, _, _),) = listener_backends(backend.writer)
        backend.sql("SELECT pg_terminate_backend(?)", (pid,))
        poll_until(
            lambda: [p for p, _, _ in listener_backends(backend.writer)] not in ([], [pid]),  # type: ignore[arg-type]
            "the listener back",
        )
        insert(backend, 1)
        gap, event = client.events(2)
        assert gap["event"] == "gap" and gap["data"]["reason"] == "changes may have been missed"
        assert event["event"] == "insert" and event["data"]["pk"] == 1
        client.close()


def test_a_client_a_whole_buffer_behind_gets_a_gap_and_holds_nobody_up(
    backend: Backend,
) -> None:
    """The dispatcher never waits for a stream: a stream that has not
    read while more than DBNOTIFY_STREAM_BUFFER events went by gets
    ``event: gap`` and ends (its browser reconnects and resumes), while
    another stream gets everything."""
    app, ext = stream_app(backend, DBNOTIFY_STREAM_BUFFER=5)
    served = app.extensions["dbnotify"].served
    stalled = run(served, served.hub, Selection(["orders"], None, {}, []), None, True, str)
    assert next(stalled).startswith("retry:")  # joined: now it stands still
    with serving(app) as port:
        client = Client(port, "/all")
        poll_until(lambda: served.hub.streams == 2, "both streams open")
        for pk in range(1, 9):
            # One at a time: each its own batch (a batch is kept whole).
            insert(backend, pk)
            assert client.events(1)[0]["data"]["pk"] == pk
        client.close()
    frame = next(stalled)
    assert frame.startswith("event: gap\n") and "fell 3 events behind" in frame
    with pytest.raises(StopIteration):
        next(stalled)
    poll_until(lambda: served.hub.streams == 0, "every stream closed")


@pytest.mark.backends("sqlite")  # the server's threads, not the database
def test_clients_that_go_leave_no_thread_or_stream_behind(backend: Backend) -> None:
    """Twenty clients open a stream and go: within a keep-alive interval
    the hub counts no open stream, and the server's threads are gone."""
    app, _ = stream_app(backend)
    served = app.extensions["dbnotify"].served
    before = threading.active_count()
    with serving(app) as port:
        clients = [Client(port, "/all") for _ in range(20)]
        poll_until(lambda: served.hub.streams == 20, "20 streams open")
        for client in clients:
            client.close()
        poll_until(lambda: served.hub.streams == 0, "no stream left once the clients went")
        poll_until(
            lambda: threading.active_count() <= before + 1,
            "the server's request threads gone (the server's own may remain)",
        )


@pytest.mark.backends("sqlite")  # no database is involved
def test_deliver_reaches_open_streams(backend: Backend) -> None:
    """Events a test delivers by hand reach the process's open streams
    too, as the listener's would: a view that returns a stream can be
    tested with made-up events."""
    app, ext = stream_app(backend)
    with serving(app) as port:
        client = Client(port, "/paid")
        poll_until(lambda: app.extensions["dbnotify"].served.hub.streams == 1, "the stream open")
        ext.deliver(
            make_event("orders", "insert", new={"id": 5, "item": "tea", "status": "new"}),
            make_event("orders", "insert", new={"id": 6, "item": "cake", "status": "paid"}),
            app=app,
        )
        (event,) = client.events(1)
        client.close()
    assert event["event"] == "insert" and event["data"]["new"]["item"] == "cake"


@pytest.mark.backends("sqlite")  # no database is involved
def test_a_stream_whose_filter_drops_busy_traffic_still_keeps_alive(backend: Backend) -> None:
    """Events keep coming that the stream's filter leaves out: it still
    sends a keep-alive comment once it has written nothing for
    DBNOTIFY_STREAM_KEEPALIVE, so that proxies keep the link and a client
    that went is noticed."""
    app, ext = stream_app(backend)
    hub = app.extensions["dbnotify"].served.hub
    unwanted = make_event("orders", "insert", new={"id": 1, "item": "tea", "status": "new"})
    with serving(app) as port:
        client = Client(port, "/paid")
        poll_until(lambda: hub.streams == 1, "the stream open")
        busy = threading.Event()

        def traffic() -> None:
            while not busy.wait(0.02):  # a load generator, not a wait
                ext.deliver(unwanted, app=app)

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            assert client.frame() == {"retry": "1000", "comment": "connected"}
            assert client.frame() == {"comment": "keep-alive"}
        finally:
            busy.set()
            thread.join(WAIT)
            client.close()


def test_a_stream_of_messages_sent_at_once_cannot_resume_and_says_so(backend: Backend) -> None:
    """Messages sent at once (not durable) are in no journal but on
    SQLite and MySQL: a client that comes back to a stream of them gets
    ``event: gap`` first, except there, where it gets what it missed."""
    app, ext = stream_app(backend)
    ext.notify("news", {"n": 1}, app=app)
    with serving(app) as port:
        client = Client(port, "/paid", last_event_id="0")
        (first,) = client.events(1)
        client.close()
    if backend.journaled:
        assert first["event"] == "message" and first["data"]["payload"] == {"n": 1}
    else:
        assert first["event"] == "gap", first


@pytest.mark.backends("sqlite")  # the header, not the database
def test_a_last_event_id_that_is_not_ours_is_ignored(backend: Backend) -> None:
    """A Last-Event-ID that is not a journal id (text, or digits other than
    ASCII ones) starts the stream afresh, without an error."""
    app, _ = stream_app(backend)
    with serving(app) as port:
        for value in ("abc", "\u00b2", "-3", "9" * 30):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
            conn.putrequest("GET", "/all")
            conn.putheader("Last-Event-ID", value.encode("latin-1"))
            conn.endheaders()
            response = conn.getresponse()
            assert response.status == 200, value
            assert response.read1(64).startswith(b"retry: 1000"), value
            response.close()
            conn.close()


def test_stream_refuses_what_it_cannot_send(backend: Backend) -> None:
    backend.sql(ORDERS)
    app, ext = backend.make_app()
    ext.watch("orders")
    with app.test_request_context():
        with pytest.raises(ValueError, match="'payments': watch it first"):
            ext.stream("payments")
        with pytest.raises(ValueError, match="needs targets, messages, or both"):
            ext.stream()


def test_values_json_does_not_carry_are_written_one_way() -> None:
    """The default serializer writes Decimal as its exact digits, times in
    ISO 8601, UUIDs as strings and bytes in base64; other objects are
    refused."""
    import uuid
    from datetime import UTC, date, datetime

    data = {
        "price": Decimal("10.50"),
        "at": datetime(2026, 11, 28, 5, 0, tzinfo=UTC),
        "day": date(2026, 11, 28),
        "ref": uuid.UUID(int=1),
        "blob": b"\x00\xff",
    }
    assert json.loads(default_serializer(data)) == {
        "price": "10.50",
        "at": "2026-11-28T05:00:00+00:00",
        "day": "2026-11-28",
        "ref": "00000000-0000-0000-0000-000000000001",
        "blob": "AP8=",
    }
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        default_serializer({"x": object()})
