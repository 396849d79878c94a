"""``set_context()``: who made a change rides with it, as ``event.context``,
on every backend (PostgreSQL triggers, WAL capture, SQLite), for row
changes and for messages sent in the same transaction; never beyond its
transaction, and never at the cost of the write."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from flask import g
from flask_sqlalchemy import SQLAlchemy

from flask_dbnotify import notification_received, table_truncated

from ._helpers import SQL, Backend, Recorder, listening, marker, roles_on

ORDERS = {
    "postgresql": "CREATE TABLE orders (id serial PRIMARY KEY, item text NOT NULL)",
    "sqlite": "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL)",
    "mysql": "CREATE TABLE orders (id serial PRIMARY KEY, item text NOT NULL)",
}


def orders(backend: Backend) -> None:
    backend.sql(ORDERS["postgresql" if backend.pg else "mysql" if backend.mysql else "sqlite"])


class Messages:
    """``notification_received`` as (channel, payload, context)."""

    def __init__(self) -> None:
        self.recorder = Recorder()

    def __call__(self, sender: Any, payload: Any, context: Any, **extra: Any) -> None:
        self.recorder.add((sender, payload, context))


def contexts(events: list[Any]) -> list[Any]:
    return [(e.op.value, e.context) for e in events]


def test_every_change_and_message_of_the_transaction_carries_it(
    backend: Backend, events: Recorder
) -> None:
    """Rows of one statement, of later statements and a message sent on
    the same connection carry the context; the next transaction on the
    same connection, without one, carries none."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders")
    messages = Messages()
    engine = backend.engine()
    with notification_received.connected_to(messages, sender="audit"), engine.connect() as conn:
        conn.execute(sa.text("INSERT INTO orders (item) VALUES ('before')"))
        ext.set_context(conn, user_id=42, request="r-1", roles=["a", "b"])
        conn.execute(sa.text("INSERT INTO orders (item) VALUES ('x'), ('y')"))
        conn.execute(sa.text("UPDATE orders SET item = 'z' WHERE item = 'x'"))
        ext.notify("audit", {"n": 1}, connection=conn, app=app)
        conn.execute(sa.text("DELETE FROM orders WHERE item = 'y'"))
        conn.commit()
        conn.execute(sa.text("INSERT INTO orders (item) VALUES ('after')"))
        ext.notify("audit", {"n": 2}, connection=conn, app=app)
        conn.commit()
        got = events.wait_for(8, "six row events and two messages")
        assert messages.recorder.wait_for(2, "two messages") == [
            ("audit", {"n": 1}, {"user_id": 42, "request": "r-1", "roles": ["a", "b"]}),
            ("audit", {"n": 2}, None),
        ]
    ctx = {"user_id": 42, "request": "r-1", "roles": ["a", "b"]}
    rows = [e for e in got if not isinstance(e, dict)]
    # Changes made before set_context() in the transaction carry none.
    assert contexts(rows) == [
        ("INSERT", None),
        ("INSERT", ctx),
        ("INSERT", ctx),
        ("UPDATE", ctx),
        ("DELETE", ctx),
        ("INSERT", None),
    ]
    events.assert_no_more(8, marker(ext, app))


def test_a_rolled_back_context_and_a_cleared_one_carry_nothing(
    backend: Backend, events: Recorder
) -> None:
    """A context dies with its transaction's rollback; set_context() with
    no values clears it; another connection's transaction never sees it."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders")
    engine = backend.engine()
    with engine.connect() as conn:
        ext.set_context(conn, user_id=1)
        conn.execute(sa.text("INSERT INTO orders (item) VALUES ('ghost')"))
        conn.rollback()
        ext.set_context(conn, user_id=2)
        conn.execute(sa.text("INSERT INTO orders (item) VALUES ('two')"))
        ext.set_context(conn)
        conn.execute(sa.text("INSERT INTO orders (item) VALUES ('cleared')"))
        conn.commit()
    backend.sql("INSERT INTO orders (item) VALUES ('elsewhere')")
    got = events.wait_for(3)
    assert [(e.row["item"], e.context) for e in got] == [
        ("two", {"user_id": 2}),
        ("cleared", None),
        ("elsewhere", None),
    ]
    events.assert_no_more(3, marker(ext, app))


def test_per_request_recipe_with_flask_sqlalchemy(backend: Backend, events: Recorder) -> None:
    """The documented recipe: a ``before_flush`` hook on Flask-SQLAlchemy's
    session sets the request's context; a request that writes through the
    ORM delivers it, one that only reads writes nothing."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders")
    engine_url = backend.engine().url.render_as_string(hide_password=False)
    app.config["SQLALCHEMY_DATABASE_URI"] = engine_url
    db = SQLAlchemy(app)

    class Order(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "orders"
        id = db.Column(db.Integer, primary_key=True)
        item = db.Column(db.Text, nullable=False)

    @sa.event.listens_for(db.session, "before_flush")
    def who(session: Any, *args: Any) -> None:
        if "user_id" in g:
            ext.set_context(session, user_id=g.user_id, path=g.path)

    @app.post("/orders/<item>")
    def add(item: str) -> str:
        g.user_id, g.path = 7, f"/orders/{item}"
        db.session.add(Order(item=item))
        db.session.commit()
        return "ok"

    @app.get("/orders")
    def count() -> str:
        g.user_id, g.path = 7, "/orders"
        return str(db.session.query(Order).count())

    client = app.test_client()
    assert client.get("/orders").text == "0"
    assert client.post("/orders/pen").text == "ok"
    [event] = events.wait_for(1)
    assert event.context == {"user_id": 7, "path": "/orders/pen"}
    with app.app_context():
        db.engine.dispose()
    events.assert_no_more(1, marker(ext, app))


@pytest.mark.backends("postgresql", "wal")  # driver choice exists only on PostgreSQL
@pytest.mark.parametrize("durable", [False, True])
def test_psycopg3_sessions_work_as_psycopg2_ones(
    backend: Backend, events: Recorder, durable: bool
) -> None:
    """With SQLAlchemy on psycopg 3 (what a bare postgresql:// URL means in
    SQLAlchemy 2.1), set_context(), notify(connection=...) and durable
    notify work on a Session exactly as with psycopg2."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders", durable=durable)
    messages = Messages()
    engine = backend.engine("psycopg")
    assert engine.dialect.driver == "psycopg"
    with notification_received.connected_to(messages, sender="audit"):
        with sa.orm.Session(engine) as session:
            ext.set_context(session, user_id=3)
            session.execute(sa.text("INSERT INTO orders (item) VALUES ('p3')"))
            ext.notify("audit", {"big": "x" * 9000}, connection=session, durable=durable, app=app)
            ext.notify("audit", "small", connection=session, app=app)
            session.commit()
        [event] = events.wait_for(3)[:1]
        got = messages.recorder.wait_for(2, "two messages")
    assert event.context == {"user_id": 3}
    assert (event.id is not None) == (durable or backend.wal)
    assert got == [
        ("audit", {"big": "x" * 9000}, {"user_id": 3}),
        ("audit", "small", {"user_id": 3}),
    ]
    events.assert_no_more(3, marker(ext, app))


@pytest.mark.backends("postgresql", "wal")  # SQLite has no TRUNCATE
def test_durable_watch_and_truncate_carry_it(backend: Backend, events: Recorder) -> None:
    """A durable watch journals the context with each row; a TRUNCATE
    carries it too."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders", durable=True)
    truncated = Recorder()
    engine = backend.engine()
    with table_truncated.connected_to(truncated, sender="orders"):
        with engine.begin() as conn:
            ext.set_context(conn, job="nightly")
            conn.execute(sa.text("INSERT INTO orders (item) SELECT 'n' FROM generate_series(1, 3)"))
            conn.execute(sa.text("TRUNCATE orders"))
        [truncate] = truncated.wait_for(1, "the TRUNCATE")
    got = events.wait_for(3)
    assert [e.context for e in got] == [{"job": "nightly"}] * 3
    assert all(e.id is not None for e in got)
    assert truncate.context == {"job": "nightly"}


def test_bad_values_are_refused_and_the_transaction_goes_on(
    backend: Backend, events: Recorder
) -> None:
    """Values JSON cannot hold, or over 1 KiB, are refused at the call;
    a DB-API connection is refused; the transaction is untouched."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders")
    engine = backend.engine()
    with engine.connect() as conn:
        with pytest.raises(TypeError, match="JSON values"):
            ext.set_context(conn, when=threading.Event())
        with pytest.raises(ValueError, match="1024"):
            ext.set_context(conn, blob="x" * 1100)
        with pytest.raises(TypeError, match="Connection or Session"):
            ext.set_context(backend.connect(), user_id=1)
        conn.execute(sa.text("INSERT INTO orders (item) VALUES ('fine')"))
        conn.commit()
    [event] = events.wait_for(1)
    assert event.context is None
    events.assert_no_more(1, marker(ext, app))


@pytest.mark.backends("postgresql", "wal")  # a writer's own setting or message
def test_a_context_set_by_hand_never_breaks_the_write(backend: Backend, events: Recorder) -> None:
    """A writer that sets the context itself, to text that is not a JSON
    object, to text meant to break out of the event's JSON, or to a huge
    text, still writes; its events arrive whole, with no context."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders")
    breakout = '{"a": 1}", "t": "payroll'
    if backend.wal:
        statement = "SELECT pg_logical_emit_message(true, 'dbnotify.context', ?::text)"
    else:
        statement = "SELECT set_config('dbnotify.context', ?, true)"
    for n, text in enumerate(["not json", breakout, "[1, 2]", '{"k": "' + "v" * 5000 + '"}']):
        backend.sql("BEGIN")
        backend.sql(statement, (text,))
        backend.sql("INSERT INTO orders (item) VALUES (?)", (f"w{n}",))
        backend.sql("COMMIT")
    got = events.wait_for(4)
    assert [(e.table, e.row["item"], e.context) for e in got] == [
        ("orders", f"w{n}", None) for n in range(4)
    ]
    events.assert_no_more(4, marker(ext, app))


@pytest.mark.backends("sqlite")  # an install SQL made elsewhere
def test_install_sql_made_on_another_database_works_on_an_old_journal(
    backend: Backend, events: Recorder, tmp_path: Any
) -> None:
    """``install-triggers --sql`` (or a migration) generated on a fresh
    database, applied to one whose journal an earlier version made: writes
    go on, and carry their context."""
    orders(backend)
    backend.sql(
        "CREATE TABLE dbnotify_journal (/* flask-dbnotify */ id INTEGER PRIMARY KEY "
        "AUTOINCREMENT, created_at REAL NOT NULL, shape TEXT, body TEXT NOT NULL)"
    )
    fresh = tmp_path / "fresh.db"
    sqlite3.connect(fresh).execute(ORDERS["sqlite"])
    other, other_ext = backend.make_app(DBNOTIFY_DATABASE_URI=f"sqlite:///{fresh}")
    other_ext.watch("orders")
    statements = other_ext.install_sql(other)
    backend.script(";\n".join(statements) + ";")
    app, ext = backend.make_app()
    ext.watch("orders")
    ext.start(app)
    with backend.engine().connect() as conn:
        ext.set_context(conn, user_id=5)
        conn.execute(sa.text("INSERT INTO orders (item) VALUES ('new')"))
        conn.commit()
    [event] = events.wait_for(1)
    assert event.context == {"user_id": 5}


def test_make_event_and_streams_carry_context() -> None:
    """Tests build events with a context; stream data carries it."""
    from flask_dbnotify._stream import event_data
    from flask_dbnotify.testing import make_event

    event = make_event("orders", "insert", {"id": 1}, context={"user_id": 9})
    assert event.context == {"user_id": 9}
    assert event_data(event)["context"] == {"user_id": 9}
    assert event_data(make_event("orders", "insert", {"id": 1}))["context"] is None


@pytest.mark.backends("postgresql", "wal")  # roles exist on PostgreSQL only
@pytest.mark.parametrize("durable", [False, True])
def test_a_role_that_may_write_one_table_claims_only_its_own_changes(
    backend: Backend, events: Recorder, durable: bool
) -> None:
    """A role with INSERT on one watched table and nothing else: its
    context, valid or crafted, rides only with its own rows, through the
    owner-rights half of a durable watch too; it cannot reach another
    session's changes, nor make a field of the event its own. A role with
    no grants sets a context and emits the message to no effect."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders", durable=durable)
    assert isinstance(backend.writer, SQL)
    with roles_on(backend.writer, backend.url) as make:
        clerk, stranger = make("clerk"), make("stranger")
        backend.sql(f"GRANT USAGE ON SCHEMA public TO {clerk.name}")
        backend.sql(f"GRANT INSERT ON orders TO {clerk.name}")
        backend.sql(f"GRANT USAGE ON SEQUENCE orders_id_seq TO {clerk.name}")
        setter = (
            "SELECT pg_logical_emit_message(true, 'dbnotify.context', %s::text)"
            if backend.wal
            else "SELECT set_config('dbnotify.context', %s, true)"
        )
        breakout = '{"x": 1}", "t": "payroll", "o": "D'
        conn = clerk.connect()
        conn.autocommit = False
        with conn.cursor() as cur:
            for text in ('{"user_id": 1}', breakout):
                cur.execute(setter, (text,))
                cur.execute("INSERT INTO orders (item) VALUES ('by clerk')")
                conn.commit()
        stranger.run("BEGIN")
        stranger.run(setter, ('{"user_id": 666}',))
        backend.sql("INSERT INTO orders (item) VALUES ('by owner')")
        stranger.run("COMMIT")
        got = events.wait_for(3)
    assert [(e.table, e.op.value, e.row["item"], e.context) for e in got] == [
        ("orders", "INSERT", "by clerk", {"user_id": 1}),
        ("orders", "INSERT", "by clerk", None),
        ("orders", "INSERT", "by owner", None),
    ]
    events.assert_no_more(3, marker(ext, app))


@pytest.mark.backends("postgresql")  # the URL question is PostgreSQL's
def test_a_bare_postgresql_url_in_flask_sqlalchemy_needs_nothing(
    backend: Backend, events: Recorder
) -> None:
    """SQLALCHEMY_DATABASE_URI = "postgresql://..." (psycopg 3 to SQLAlchemy
    2.1) serves both Flask-SQLAlchemy and Flask-DBNotify, unchanged: the
    listener, notify() on db.session, set_context() on it."""
    orders(backend)
    url = sa.make_url(backend.url).set(drivername="postgresql")
    app, ext = backend.make_app(
        DBNOTIFY_DATABASE_URI=None, SQLALCHEMY_DATABASE_URI=url.render_as_string(False)
    )
    db = SQLAlchemy(app)
    ext.watch("orders")
    ext.install_triggers(app)
    ext.start(app)
    messages = Messages()
    with app.app_context(), notification_received.connected_to(messages, sender="done"):
        assert db.engine.dialect.driver == "psycopg"
        ext.set_context(db.session, user_id=11)
        db.session.execute(sa.text("INSERT INTO orders (item) VALUES ('bare')"))
        ext.notify("done", [1], connection=db.session)
        db.session.commit()
        [event] = events.wait_for(2)[:1]
        assert messages.recorder.wait_for(1, "the message") == [("done", [1], {"user_id": 11})]
        db.engine.dispose()
    assert (event.row["item"], event.context) == ("bare", {"user_id": 11})


@dataclasses.dataclass
class Shipped:
    order_id: int


def test_typed_message_receivers_that_ask_for_it_get_the_context(
    backend: Backend, events: Recorder
) -> None:
    """An on_message() receiver with a ``context`` parameter gets the
    sending transaction's context; one without gets the message alone."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders")
    with_context, without = Recorder(), Recorder()

    @ext.on_message(Shipped)
    def audit(message: Shipped, context: Any) -> None:
        with_context.add((message, context))

    @ext.on_message(Shipped)
    def count(message: Shipped) -> None:
        without.add(message)

    with backend.engine().connect() as conn:
        ext.set_context(conn, user_id=8)
        ext.notify(Shipped(order_id=1), connection=conn, app=app)
        conn.commit()
    ext.notify(Shipped(order_id=2), app=app)
    # With WAL capture a message sent at once may overtake the relayed one.
    got = sorted(with_context.wait_for(2, "two typed messages"), key=lambda m: m[0].order_id)
    assert got == [(Shipped(1), {"user_id": 8}), (Shipped(2), None)]
    got = sorted(without.wait_for(2, "two typed messages"), key=lambda m: m.order_id)
    assert got == [Shipped(1), Shipped(2)]


def test_a_context_never_outlives_its_transaction(backend: Backend, events: Recorder) -> None:
    """Two transactions on one Connection each with a context, a message
    sent right after a commit (no transaction begun yet), a pooled
    connection checked out again, and another writer: none of them gets a
    context it did not set."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders")
    messages = Messages()
    engine = backend.engine()
    with notification_received.connected_to(messages, sender="m"):
        with engine.connect() as conn:
            for n in (1, 2):
                ext.set_context(conn, n=n)
                conn.execute(sa.text(f"INSERT INTO orders (item) VALUES ('ctx{n}')"))
                conn.commit()
            ext.notify("m", "right after a commit", connection=conn, app=app)
            conn.commit()
        with engine.connect() as again:  # the pool's same DB-API connection
            ext.notify("m", "next checkout", connection=again, app=app)
            again.execute(sa.text("INSERT INTO orders (item) VALUES ('next checkout')"))
            again.commit()
        backend.sql("INSERT INTO orders (item) VALUES ('elsewhere')")
        got = [e for e in events.wait_for(6) if not isinstance(e, str)]
        assert messages.recorder.wait_for(2, "two messages") == [
            ("m", "right after a commit", None),
            ("m", "next checkout", None),
        ]
    assert [(e.row["item"], e.context) for e in got] == [
        ("ctx1", {"n": 1}),
        ("ctx2", {"n": 2}),
        ("next checkout", None),
        ("elsewhere", None),
    ]


def test_an_autocommit_connection_is_refused(backend: Backend, events: Recorder) -> None:
    """A connection in autocommit has no transaction to carry a context:
    set_context() raises ValueError, and nothing of it reaches any write."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders")
    engine = backend.engine().execution_options(isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        with pytest.raises(ValueError, match="autocommit"):
            ext.set_context(conn, user_id=42)
        conn.execute(sa.text("INSERT INTO orders (item) VALUES ('auto')"))
    backend.sql("INSERT INTO orders (item) VALUES ('elsewhere')")
    got = events.wait_for(2)
    assert [(e.row["item"], e.context) for e in got] == [("auto", None), ("elsewhere", None)]
    events.assert_no_more(2, marker(ext, app))


def test_a_large_context_on_a_bulk_statement_loses_nothing(
    backend: Backend, events: Recorder
) -> None:
    """A context near the 1 KiB bound, full of characters JSON escapes,
    on a 3,000-row statement of wide rows (many notifications, some in
    pieces): every row arrives once, with the context."""
    orders(backend)
    app, ext = listening(backend.make_app, "orders")
    big = {"note": '"\\\n' * 165}
    assert 1000 < len(json.dumps(big, ensure_ascii=False, separators=(",", ":"))) <= 1024
    if backend.pg:
        series = "SELECT repeat('x', 300) || g FROM generate_series(1, 3000) AS g"
    elif backend.mysql:
        series = (
            "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < 3000) "
            "SELECT concat(repeat('x', 300), g) FROM s"
        )
    else:
        series = (
            "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < 3000) "
            "SELECT printf('%.300c', 'x') || g FROM s"
        )
    with backend.engine().begin() as conn:
        if backend.mysql:  # MariaDB's default is 1000
            conn.exec_driver_sql("SET SESSION max_recursive_iterations = 10000")
        ext.set_context(conn, **big)
        conn.execute(sa.text(f"INSERT INTO orders (item) {series}"))
    got = events.wait_for(3000, timeout=60)
    assert sorted(int(e.row["item"][300:]) for e in got) == list(range(1, 3001))
    assert all(e.context == big for e in got)
    events.assert_no_more(3000, marker(ext, app))
