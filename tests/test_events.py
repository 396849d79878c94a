"""What receivers get for committed row changes and app messages, on real
PostgreSQL; the tests taking the ``backend`` fixture run on SQLite too."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg2
import psycopg2.extras
import pytest
import sqlalchemy as sa
from flask import Flask, current_app
from psycopg2 import sql as pgsql
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from flask_dbnotify import (
    ChangeEvent,
    DBNotify,
    Operation,
    notification_received,
    row_changed,
    row_deleted,
    row_inserted,
    row_updated,
)

from ._helpers import SQL, Backend, Recorder, listening, marker, xml_supported

MakeApp = Callable[..., tuple[Flask, DBNotify]]

ORDERS = "CREATE TABLE orders (id serial PRIMARY KEY, item text NOT NULL, qty int NOT NULL)"
#: ``orders`` whose id the database assigns, on either database.
AUTO_ORDERS = {
    "postgresql": ORDERS,
    "wal": ORDERS,
    "sqlite": (
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL, qty INTEGER NOT NULL)"
    ),
    "mysql": ORDERS,
    "binlog": ORDERS,
}


@pytest.fixture()
def writer(pg_url: str) -> Iterator[Any]:
    """A psycopg2 connection with transactions (not autocommit)."""
    conn = psycopg2.connect(pg_url)
    yield conn
    conn.close()


def test_insert_update_delete_deliver_change_events(backend: Backend, events: Recorder) -> None:
    """Each operation delivers a ChangeEvent with table, op, pk, new/old,
    changed and a timestamp from the database clock; a journal id on
    SQLite, none on PostgreSQL (whose watch is not durable)."""
    backend.sql(AUTO_ORDERS[backend.name])
    app, ext = listening(backend.make_app, "orders")
    inserted, updated, deleted, other = Recorder(), Recorder(), Recorder(), Recorder()
    with (
        row_inserted.connected_to(inserted, sender="orders"),
        row_updated.connected_to(updated, sender="orders"),
        row_deleted.connected_to(deleted, sender="orders"),
        row_inserted.connected_to(other, sender="other_table"),
    ):
        before = backend.now()
        backend.sql("INSERT INTO orders (item, qty) VALUES ('apple', 1)")
        backend.sql("UPDATE orders SET qty = 5 WHERE id = 1")
        backend.sql("DELETE FROM orders WHERE id = 1")
        after = backend.now()
        ins, upd, dele = events.wait_for(3)
        assert inserted.wait_for(1, "row_inserted") == [ins]
        assert updated.wait_for(1, "row_updated") == [upd]
        assert deleted.wait_for(1, "row_deleted") == [dele]
        journal = [] if backend.pg and not backend.wal else backend.journal_ids()
        events.assert_no_more(3, marker(ext, app))
    assert other.items == []

    for event in (ins, upd, dele):
        assert isinstance(event, ChangeEvent)
        assert event.table == "orders"
        assert isinstance(event.op, Operation)
        assert event.pk == 1
        assert event.timestamp is not None and event.timestamp.tzinfo is not None
        if not backend.pg:  # SQLite's clock and MySQL's journal give UTC
            assert event.timestamp.utcoffset() == timedelta(0)
        # The binary log holds whole seconds: there, the time the relay
        # journaled the change, milliseconds after its commit.
        slack = timedelta(seconds=1 if backend.binlog else 0.005)
        assert before - slack <= event.timestamp <= after + slack
    if backend.pg and not backend.wal:  # a plain watch's triggers journal nothing: no id
        assert all(e.id is None for e in (ins, upd, dele))
    else:  # SQLite, MySQL and WAL capture journal every event: the id of its journal row
        assert [e.id for e in (ins, upd, dele)] == journal
        assert all(type(e.id) is int for e in (ins, upd, dele))
        assert ins.id < upd.id < dele.id
    assert (ins.op, upd.op, dele.op) == ("INSERT", "UPDATE", "DELETE")
    assert ins.new == {"id": 1, "item": "apple", "qty": 1} and ins.old is None
    assert ins.changed == frozenset()
    assert upd.new == {"id": 1, "item": "apple", "qty": 5}
    assert upd.old == {"id": 1, "item": "apple", "qty": 1}
    assert upd.changed == frozenset({"qty"})
    assert dele.new is None and dele.old == {"id": 1, "item": "apple", "qty": 5}
    assert dele.changed == frozenset()


def test_one_transaction_arrives_in_order_and_unfolded(
    make_app: MakeApp, sql: SQL, events: Recorder, writer: Any
) -> None:
    """Repeated identical changes in one transaction are all delivered, in order."""
    sql(ORDERS)
    app, ext = listening(make_app, "orders")
    with writer, writer.cursor() as cur:
        cur.execute("INSERT INTO orders (id, item, qty) VALUES (1, 'a', 1)")
        cur.execute("DELETE FROM orders WHERE id = 1")
        cur.execute("INSERT INTO orders (id, item, qty) VALUES (1, 'a', 1)")
        cur.execute("UPDATE orders SET qty = qty + 1 WHERE id = 1")
        cur.execute("UPDATE orders SET qty = qty - 1 WHERE id = 1")
        cur.execute("UPDATE orders SET qty = qty + 1 WHERE id = 1")
        cur.execute("INSERT INTO orders SELECT g, 'b', 0 FROM generate_series(2, 6) g")
        cur.execute("UPDATE orders SET qty = 7 WHERE id BETWEEN 2 AND 6")
    got = events.wait_for(16)
    events.assert_no_more(16, marker(ext, app))
    assert [(e.op.value, e.pk) for e in got[:6]] == [
        ("INSERT", 1),
        ("DELETE", 1),
        ("INSERT", 1),
        ("UPDATE", 1),
        ("UPDATE", 1),
        ("UPDATE", 1),
    ]
    assert [(e.old["qty"], e.new["qty"]) for e in got[3:6]] == [(1, 2), (2, 1), (1, 2)]
    assert [(e.op.value, e.pk) for e in got[6:11]] == [("INSERT", i) for i in range(2, 7)]
    # One statement setting the same values on five rows: five events.
    updates = got[11:]
    assert [e.op for e in updates] == [Operation.UPDATE] * 5
    assert sorted(e.pk for e in updates) == [2, 3, 4, 5, 6]
    assert all(e.new["qty"] == 7 and e.changed == {"qty"} for e in updates)


def test_two_transactions_arrive_in_commit_order(
    make_app: MakeApp, sql: SQL, events: Recorder, pg_url: str
) -> None:
    """Commit order, not statement order, decides delivery order."""
    sql(ORDERS)
    app, ext = listening(make_app, "orders")
    first, second = psycopg2.connect(pg_url), psycopg2.connect(pg_url)
    try:
        with first.cursor() as cur:
            cur.execute("INSERT INTO orders (id, item, qty) VALUES (10, 'first', 1)")
        with second.cursor() as cur:
            cur.execute("INSERT INTO orders (id, item, qty) VALUES (11, 'second', 1)")
        second.commit()
        first.commit()
    finally:
        first.close()
        second.close()
    got = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    assert [e.pk for e in got] == [11, 10]


def test_bulk_insert_delivers_every_row_once_in_order(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """A 5,000-row INSERT ... SELECT delivers 5,000 events, in order."""
    sql(ORDERS)
    app, ext = listening(make_app, "orders")
    sql("INSERT INTO orders SELECT g, 'bulk', g * 3 FROM generate_series(1, 5000) g")
    got = events.wait_for(5000)
    events.assert_no_more(5000, marker(ext, app))
    assert [e.pk for e in got] == list(range(1, 5001))
    assert all(e.op == "INSERT" and e.new["qty"] == e.pk * 3 for e in got)


def test_bulk_update_pairs_old_and_new_rows(make_app: MakeApp, sql: SQL, events: Recorder) -> None:
    """Each row of a 2,000-row UPDATE carries its own old and new values,
    also when the UPDATE changes the primary key."""
    sql(ORDERS)
    sql("INSERT INTO orders SELECT g, 'bulk', g * 3 FROM generate_series(1, 3000) g")
    app, ext = listening(make_app, "orders")
    sql("UPDATE orders SET qty = qty + 1 WHERE id <= 2000")
    got = events.wait_for(2000)
    events.assert_no_more(2000, marker(ext, app))
    assert sorted(e.pk for e in got) == list(range(1, 2001))
    for e in got:
        assert e.op == "UPDATE" and e.changed == {"qty"}
        assert e.old == {"id": e.pk, "item": "bulk", "qty": e.pk * 3}
        assert e.new == {"id": e.pk, "item": "bulk", "qty": e.pk * 3 + 1}

    del events.items[:]
    sql("UPDATE orders SET id = id + 100000 WHERE id <= 2000")
    got = events.wait_for(2000)
    events.assert_no_more(2000, marker(ext, app))
    assert sorted(e.old["id"] for e in got) == list(range(1, 2001))
    for e in got:
        assert e.changed == {"id"}
        assert e.new["id"] == e.old["id"] + 100000 == e.pk
        assert e.new["qty"] == e.old["qty"] == (e.old["id"] * 3 + 1)


def test_rolled_back_transaction_sends_nothing(backend: Backend, events: Recorder) -> None:
    """Changes of a rolled-back transaction never reach receivers."""
    backend.sql(AUTO_ORDERS[backend.name])
    backend.sql("INSERT INTO orders (id, item, qty) VALUES (100, 'kept', 1)")
    app, ext = listening(backend.make_app, "orders")
    writer = backend.connect()
    cur = writer.cursor()
    cur.execute("INSERT INTO orders (item, qty) VALUES ('ghost', 1)")
    cur.execute("UPDATE orders SET qty = 2")
    cur.execute("DELETE FROM orders")
    cur.close()
    writer.rollback()
    events.assert_no_more(0, marker(ext, app))


def test_update_that_changes_nothing_sends_nothing(backend: Backend, events: Recorder) -> None:
    """An UPDATE writing the values a row already has (text, integer,
    binary, float, NULL) is not an event; in a statement that changes some
    rows, only those arrive."""
    blob = "bytea" if backend.pg else "blob"  # the binary type's name
    backend.sql(
        f"CREATE TABLE things (id integer PRIMARY KEY, item text, qty integer, data {blob}, "
        "x double precision)"
    )
    for row in ((1, "a", 1, b"\x01", None), (2, "b", 2, None, 0.5), (3, "c", 3, b"", 2.0)):
        backend.sql("INSERT INTO things VALUES (?, ?, ?, ?, ?)", row)
    app, ext = listening(backend.make_app, "things")
    backend.sql("UPDATE things SET qty = qty, item = item, data = data, x = x")
    backend.sql("UPDATE things SET qty = 1 WHERE id = 1")
    events.assert_no_more(0, marker(ext, app))
    del events.items[:]
    backend.sql("UPDATE things SET qty = 2")
    got = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    assert sorted((e.pk, e.old["qty"], e.new["qty"]) for e in got) == [(1, 1, 2), (3, 3, 2)]


def test_no_op_detection_covers_types_without_equality(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """json, point, polygon and xml have no '=' operator: unchanged values
    send nothing, changed ones are named in changed. (A server built without
    libxml, as the throwaway one is, rejects xml values; polygon alone then
    stands for the types the text comparison is there for.)"""
    if xml_supported(sql):
        doc_type, docs = "xml", ("<a/>", "<b/>")
    else:
        doc_type, docs = "polygon", ("((0,0),(1,1),(1,0))", "((0,0),(2,2),(2,0))")
    columns = f"raw json, pos point, area polygon, doc {doc_type}"
    sql(f"CREATE TABLE shapes (id int PRIMARY KEY, {columns})")
    sql(
        """INSERT INTO shapes VALUES (1, '{"a": 1}', '(1,2)', '((0,0),(1,1),(1,0))', %s)""",
        [docs[0]],
    )
    app, ext = listening(make_app, "shapes")
    sql("UPDATE shapes SET raw = raw, pos = pos, area = area, doc = doc")
    events.assert_no_more(0, marker(ext, app))
    del events.items[:]
    sql("UPDATE shapes SET pos = '(3,4)'")
    sql("""UPDATE shapes SET raw = '{"a": 2}', doc = %s""", [docs[1]])
    sql("UPDATE shapes SET area = '((0,0),(0,1),(1,1))'")
    first, second, third = events.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    assert first.changed == {"pos"}
    assert second.changed == {"raw", "doc"} and second.new["raw"] == {"a": 2}
    assert third.changed == {"area"}


ALIAS_LIKE = ["x", "n", "o", "i", "j", "z", "r", "b", "c", "nn", "oo", "_c", "head", "batch"]


@pytest.mark.parametrize("columns", [None, ALIAS_LIKE], ids=["all-columns", "columns="])
def test_columns_named_like_sql_aliases(
    make_app: MakeApp, sql: SQL, events: Recorder, columns: list[str] | None
) -> None:
    """Columns with short common names (x, n, o, ...) are ordinary data:
    writes succeed and events carry them."""
    defs = ", ".join(f'"{c}" int' for c in ALIAS_LIKE)
    sql(f"CREATE TABLE points (id int PRIMARY KEY, {defs})")
    app, ext = listening(make_app, "points", columns=columns)
    values = ", ".join(["1"] + [str(k) for k in range(len(ALIAS_LIKE))])
    sql(f"INSERT INTO points VALUES ({values})")
    sql('UPDATE points SET "x" = 100, "n" = 200')
    sql("DELETE FROM points")
    ins, upd, dele = events.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    row = {"id": 1} | {c: k for k, c in enumerate(ALIAS_LIKE)}
    assert ins.new == row
    assert upd.old == row and upd.new == row | {"x": 100, "n": 200}
    assert upd.changed == {"x", "n"}
    assert dele.old == row | {"x": 100, "n": 200}


def test_when_changed_filters_updates(backend: Backend, events: Recorder) -> None:
    """With when_changed, only UPDATEs touching one of those columns arrive
    (a change to NULL included)."""
    backend.sql(
        "CREATE TABLE tasks (id integer PRIMARY KEY, status text, title text, hits integer)"
    )
    backend.sql("INSERT INTO tasks VALUES (1, 'new', 't', 0)")
    app, ext = listening(backend.make_app, "tasks", when_changed=["status", "title"])
    backend.sql("UPDATE tasks SET hits = hits + 1")
    backend.sql("UPDATE tasks SET hits = hits + 1")
    events.assert_no_more(0, marker(ext, app))
    del events.items[:]
    backend.sql("UPDATE tasks SET status = 'done', hits = hits + 1")
    backend.sql("UPDATE tasks SET title = NULL")
    first, second = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    assert first.changed == {"status", "hits"}
    assert first.new == {"id": 1, "status": "done", "title": "t", "hits": 3}
    assert second.changed == {"title"} and second.new["title"] is None


def test_columns_limit_new_and_old(backend: Backend, events: Recorder) -> None:
    """columns= limits new/old to those columns plus the primary key;
    changed still names every changed column, also when only columns not
    carried changed."""
    backend.sql(
        "CREATE TABLE users (id integer PRIMARY KEY, email text, password text, visits integer)"
    )
    app, ext = listening(backend.make_app, "users", columns=["email"])
    backend.sql("INSERT INTO users VALUES (1, 'a@x', 'secret', 0)")
    backend.sql("UPDATE users SET email = 'b@x', password = 'other'")
    backend.sql("UPDATE users SET visits = 1")
    backend.sql("DELETE FROM users")
    ins, upd, upd2, dele = events.wait_for(4)
    events.assert_no_more(4, marker(ext, app))
    assert ins.new == {"id": 1, "email": "a@x"}
    assert upd.new == {"id": 1, "email": "b@x"} and upd.old == {"id": 1, "email": "a@x"}
    assert upd.changed == {"email", "password"}
    assert upd2.changed == {"visits"} and upd2.new == upd2.old == {"id": 1, "email": "b@x"}
    assert dele.old == {"id": 1, "email": "b@x"}


def test_composite_primary_key_is_a_tuple_in_key_order(backend: Backend, events: Recorder) -> None:
    """pk follows the PRIMARY KEY's column order, not the table's."""
    backend.sql(
        "CREATE TABLE stock (region varchar(10), num integer, qty integer, "
        "PRIMARY KEY (num, region))"
    )
    app, ext = listening(backend.make_app, "stock")
    backend.sql("INSERT INTO stock VALUES ('eu', 7, 1)")
    backend.sql("UPDATE stock SET qty = 2")
    backend.sql("DELETE FROM stock")
    got = events.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    assert [e.pk for e in got] == [(7, "eu")] * 3


def test_huge_rows_never_fail_the_write_and_arrive_whole(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """Rows far over the 8000-byte NOTIFY limit are written and delivered intact."""
    sql("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    app, ext = listening(make_app, "docs")
    ascii_body = "x" * 100_000
    unicode_body = "żółw 🐢 €" * 12_000  # multibyte: ~170 kB of UTF-8
    sql("INSERT INTO docs VALUES (1, %s)", (ascii_body,))
    sql("INSERT INTO docs VALUES (2, %s)", (unicode_body,))
    sql("UPDATE docs SET body = body || '!'")
    sql("DELETE FROM docs")
    got = events.wait_for(6)
    events.assert_no_more(6, marker(ext, app))
    assert [e.op.value for e in got] == ["INSERT"] * 2 + ["UPDATE"] * 2 + ["DELETE"] * 2
    assert [e.pk for e in got[:2]] == [1, 2]
    assert sorted(e.pk for e in got[2:4]) == sorted(e.pk for e in got[4:]) == [1, 2]
    bodies = {1: ascii_body, 2: unicode_body}
    for e in got:
        if e.op == "INSERT":
            assert e.new["body"] == bodies[e.pk]
        elif e.op == "UPDATE":
            assert e.old["body"] == bodies[e.pk]
            assert e.new["body"] == bodies[e.pk] + "!"
        else:
            assert e.old["body"] == bodies[e.pk] + "!"
    assert sql("SELECT count(*) FROM docs") == [(0,)]


def test_statement_mixing_small_and_huge_rows_delivers_all_in_order(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """Rows around and far over the size limits, in one statement, arrive in order."""
    sql("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    app, ext = listening(make_app, "docs")
    sizes = [10, 3000, 3900, 4000, 10, 7000, 7999, 8000, 8001, 10, 100_000, 5, 50_000, 1]
    rows = [(i, chr(ord("a") + i % 26) * size) for i, size in enumerate(sizes)]
    sql(
        "INSERT INTO docs SELECT * FROM unnest(%s::int[], %s::text[])",
        ([i for i, _ in rows], [b for _, b in rows]),
    )
    got = events.wait_for(len(rows))
    events.assert_no_more(len(rows), marker(ext, app))
    assert [(e.pk, e.new["body"]) for e in got] == rows


def test_column_types_arrive_as_json_and_build_typed_instances(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """JSON, arrays, numeric, timestamptz, bytea, uuid, boolean and NULL
    arrive as JSON values; event.instance(Model) gives Python types."""

    class Base(DeclarativeBase):
        pass

    class Thing(Base):
        __tablename__ = "things"
        id: Mapped[int] = mapped_column(primary_key=True)
        doc: Mapped[dict[str, Any]] = mapped_column(pg.JSONB)
        raw: Mapped[Any] = mapped_column(sa.JSON)
        tags: Mapped[list[str]] = mapped_column(pg.ARRAY(sa.Text))
        scores: Mapped[list[int]] = mapped_column(pg.ARRAY(sa.Integer))
        price: Mapped[Decimal] = mapped_column(sa.Numeric(12, 4))
        at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True))
        data: Mapped[bytes] = mapped_column(sa.LargeBinary)
        ref: Mapped[uuid.UUID] = mapped_column(sa.Uuid)
        flag: Mapped[bool] = mapped_column(sa.Boolean)
        note: Mapped[str | None] = mapped_column(sa.Text, nullable=True)

    sql(
        "CREATE TABLE things (id int PRIMARY KEY, doc jsonb, raw json, tags text[], "
        "scores int[], price numeric(12, 4), at timestamptz, data bytea, ref uuid, "
        "flag boolean, note text)"
    )
    sa.orm.configure_mappers()  # as in any app that has used its models
    app, ext = listening(make_app, Thing)
    ref = uuid.UUID("12345678-1234-5678-1234-567812345678")
    at = datetime(2024, 5, 1, 12, 34, 56, 123456, tzinfo=UTC)
    doc = {"a": [1, 2, {"b": None}], "s": 'it\'s "q" \\ ü'}
    sql(
        "INSERT INTO things VALUES (1, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL)",
        (
            psycopg2.extras.Json(doc),
            psycopg2.extras.Json([1, "two"]),
            ["x", "y z", 'q"'],
            [3, 1, 2],
            Decimal("1234.5678"),
            at,
            psycopg2.Binary(b"\x00\x01\xffdata"),
            str(ref),
            True,
        ),
    )
    (event,) = events.wait_for(1)
    assert event.table == "things"
    new = event.new
    assert new["doc"] == doc
    assert new["raw"] == [1, "two"]
    assert new["tags"] == ["x", "y z", 'q"']
    assert new["scores"] == [3, 1, 2]
    assert Decimal(str(new["price"])) == Decimal("1234.5678")
    assert datetime.fromisoformat(new["at"]) == at
    assert new["data"] == "\\x0001ff64617461"
    assert new["ref"] == str(ref)
    assert new["flag"] is True
    assert new["note"] is None

    thing = event.instance(Thing)
    assert isinstance(thing, Thing)
    assert sa.inspect(thing).transient
    assert thing.id == 1
    assert thing.doc == doc and thing.raw == [1, "two"]
    assert thing.tags == ["x", "y z", 'q"'] and thing.scores == [3, 1, 2]
    assert isinstance(thing.price, Decimal) and thing.price == Decimal("1234.5678")
    assert isinstance(thing.at, datetime) and thing.at == at
    assert thing.data == b"\x00\x01\xffdata"
    assert thing.ref == ref
    assert thing.flag is True
    assert thing.note is None


def test_numeric_keeps_its_exact_value(make_app: MakeApp, sql: SQL, events: Recorder) -> None:
    """A numeric with more digits than a float holds arrives exactly, and
    event.instance() gives the exact Decimal."""

    class Base(DeclarativeBase):
        pass

    class Ledger(Base):
        __tablename__ = "ledger"
        id: Mapped[int] = mapped_column(primary_key=True)
        amount: Mapped[Decimal] = mapped_column(sa.Numeric(30, 10))

    sql("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric(30, 10))")
    sa.orm.configure_mappers()
    app, ext = listening(make_app, Ledger)
    exact = Decimal("12345678901234567890.0123456789")
    sql("INSERT INTO ledger VALUES (1, %s)", (exact,))
    (event,) = events.wait_for(1)
    assert event.instance(Ledger).amount == exact


@pytest.mark.parametrize(
    ("before", "after"),
    [("1.0", "1.00"), ("12345678901234567.1", "12345678901234567.2")],
    ids=["scale", "beyond-float-digits"],
)
def test_numeric_changes_a_float_cannot_see_are_in_changed(
    make_app: MakeApp, sql: SQL, events: Recorder, before: str, after: str
) -> None:
    """An UPDATE of a numeric that floats would call equal still names the
    column in ``changed``, and new/old keep the exact digits."""
    sql("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric)")
    sql("INSERT INTO ledger VALUES (1, %s)", (Decimal(before),))
    listening(make_app, "ledger")
    sql("UPDATE ledger SET amount = %s", (Decimal(after),))
    (event,) = events.wait_for(1)
    assert event.changed == {"amount"}
    digits = [getattr(v, "text", repr(v)) for v in (event.old["amount"], event.new["amount"])]
    assert digits == [before, after]


def test_instance_works_before_the_models_are_first_used(
    backend: Backend, events: Recorder
) -> None:
    """event.instance(Model) works in a process whose mappers are not
    configured yet (the listener may get an event before any query ran)."""

    class Base(DeclarativeBase):
        pass

    class Fresh(Base):
        __tablename__ = "fresh"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.Text)

    backend.sql("CREATE TABLE fresh (id integer PRIMARY KEY, name text)")
    app, ext = listening(backend.make_app, Fresh)
    backend.sql("INSERT INTO fresh VALUES (1, 'new')")
    (event,) = events.wait_for(1)
    fresh = event.instance(Fresh)
    assert (fresh.id, fresh.name) == (1, "new")


@pytest.fixture()
def quoted_schema(sql: SQL) -> Iterator[str]:
    """Schema ``My "Schema"``, dropped afterwards (the per-test cleanup in
    conftest does not quote schema names)."""
    schema = 'My "Schema"'
    ident = pgsql.Identifier(schema).as_string(sql.conn)
    sql(f"CREATE SCHEMA {ident}")
    yield schema
    sql(f"DROP SCHEMA IF EXISTS {ident} CASCADE")


@pytest.mark.parametrize("form", ["table", "string"])
def test_quoted_schema_table_and_column_names(
    make_app: MakeApp, sql: SQL, events: Recorder, quoted_schema: str, form: str
) -> None:
    """A mixed-case, spaced table in a schema with a quote in its name works
    as a SQLAlchemy Table and as a quoted 'schema.table' string."""
    schema, table, column = quoted_schema, "Order Items", "Qty Ordered"
    sql(
        pgsql.SQL("CREATE TABLE {} (id int PRIMARY KEY, {} int, other text)")
        .format(pgsql.Identifier(schema, table), pgsql.Identifier(column))
        .as_string(sql.conn)
    )
    target: Any
    if form == "table":
        target = sa.Table(
            table,
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column(column, sa.Integer),
            sa.Column("other", sa.Text),
            schema=schema,
        )
        sender = 'My "Schema".Order Items'
    else:
        target = sender = '"My ""Schema"""."Order Items"'
    app, ext = listening(make_app, target, columns=[column], when_changed=[column])
    assert ext.status(app).watches == {sender: "installed"}
    own = Recorder()
    quoted = pgsql.Identifier(schema, table).as_string(sql.conn)
    with row_changed.connected_to(own, sender=sender):
        sql(f"INSERT INTO {quoted} VALUES (1, 5, 'a')")
        sql(f"UPDATE {quoted} SET other = 'b'")
        sql(f'UPDATE {quoted} SET "Qty Ordered" = 6')
        sql(f"DELETE FROM {quoted}")
        got = own.wait_for(3)
        events.assert_no_more(3, marker(ext, app))
    assert [e.op.value for e in got] == ["INSERT", "UPDATE", "DELETE"]
    assert all(e.table == sender and e.pk == 1 for e in got)
    assert got[0].new == {"id": 1, column: 5}
    assert got[1].old == {"id": 1, column: 5} and got[1].new == {"id": 1, column: 6}
    assert got[1].changed == {column}
    assert got[2].old == {"id": 1, column: 6}


NOTIFY_PAYLOADS: list[Any] = [
    'it\'s "quoted"',
    "back\\slash \\x00 \\n",
    "'; DROP TABLE orders; --",
    "ünïcödé 🐍 中文",
    {"nested": [1, {"deep": [None, True, 1.5]}], "": "empty key"},
    None,
    0,
    "",
    [],
    {"big": "ü" * 25_000},  # 50 kB of UTF-8: over the NOTIFY limit
    # Around the 8000-byte limit, counted in bytes, not characters.
    *("x" * n for n in range(7900, 8001, 4)),
    *("é" * n for n in range(3950, 4001, 2)),
]


def test_notify_payloads_arrive_intact(backend: Backend, events: Recorder) -> None:
    """notify() payloads of every JSON shape and size arrive unchanged, in order,
    with the channel as sender."""
    app, ext = listening(backend.make_app)
    on_channel = Recorder()
    with notification_received.connected_to(on_channel, sender="cache"):
        for payload in NOTIFY_PAYLOADS:
            ext.notify("cache", payload, app=app)
        got = on_channel.wait_for(len(NOTIFY_PAYLOADS), "messages on 'cache'")
    assert got == NOTIFY_PAYLOADS
    assert events.wait_for(len(NOTIFY_PAYLOADS)) == NOTIFY_PAYLOADS
    events.assert_no_more(len(NOTIFY_PAYLOADS), marker(ext, app))


def not_sent_yet(backend: Backend, ext: DBNotify, app: Flask, events: Recorder) -> int:
    """Check that nothing was sent while a transaction holding a notify() is
    open; return how many items the check itself added. PostgreSQL: a
    marker sent meanwhile arrives alone. SQLite has one writer at a time,
    so no marker can be written now: another connection shows the message
    is not in the journal."""
    if backend.pg:
        events.assert_no_more(0, marker(ext, app))
        return 1
    assert backend.sql("SELECT count(*) FROM dbnotify_journal") == [(0,)]
    assert events.items == []
    return 0


def test_notify_on_connection_waits_for_commit(backend: Backend, events: Recorder) -> None:
    """notify(connection=conn) is sent when conn's transaction commits, and
    not at all when it rolls back."""
    app, ext = listening(backend.make_app)
    with backend.engine().connect() as conn:
        with conn.begin():
            ext.notify("jobs", {"n": 1}, connection=conn, app=app)
            n = not_sent_yet(backend, ext, app, events)
        assert events.wait_for(n + 1)[n] == {"n": 1}
        tx = conn.begin()
        ext.notify("jobs", {"n": 2}, connection=conn, app=app)
        tx.rollback()
    events.assert_no_more(n + 1, marker(ext, app))


def test_notify_on_session_waits_for_commit(backend: Backend, events: Recorder) -> None:
    """notify(connection=session) follows the Session's commit or rollback."""
    app, ext = listening(backend.make_app)
    with Session(backend.engine()) as session:
        ext.notify("jobs", "kept", connection=session, app=app)
        n = not_sent_yet(backend, ext, app, events)
        session.commit()
        assert events.wait_for(n + 1)[n] == "kept"
        ext.notify("jobs", "dropped", connection=session, app=app)
        session.rollback()
    events.assert_no_more(n + 1, marker(ext, app))


def test_notify_on_dbapi_connection_waits_for_commit(backend: Backend, events: Recorder) -> None:
    """notify(connection=<psycopg2 or sqlite3 connection>) follows its transaction too."""
    app, ext = listening(backend.make_app)
    writer = backend.connect()
    ext.notify("jobs", "kept", connection=writer, app=app)
    n = not_sent_yet(backend, ext, app, events)
    writer.commit()
    assert events.wait_for(n + 1)[n] == "kept"
    ext.notify("jobs", "dropped", connection=writer, app=app)
    writer.rollback()
    events.assert_no_more(n + 1, marker(ext, app))


def test_identical_notifies_in_one_transaction_are_not_folded(
    backend: Backend, events: Recorder
) -> None:
    """Two equal notify() calls in one transaction deliver two messages."""
    app, ext = listening(backend.make_app)
    with backend.engine().begin() as conn:
        ext.notify("jobs", {"same": True}, connection=conn, app=app)
        ext.notify("jobs", {"same": True}, connection=conn, app=app)
    assert events.wait_for(2) == [{"same": True}, {"same": True}]
    events.assert_no_more(2, marker(ext, app))


def test_receivers_run_in_listener_thread_with_app_context(backend: Backend) -> None:
    """Inside a receiver, current_app is the app, on the listener's thread."""
    backend.sql(AUTO_ORDERS[backend.name])
    app, ext = listening(backend.make_app, "orders")
    seen = Recorder()

    def receiver(sender: Any, **kwargs: Any) -> None:
        real_app = current_app._get_current_object()  # type: ignore[attr-defined]
        seen.add((real_app is app, threading.current_thread()))

    with row_changed.connected_to(receiver), notification_received.connected_to(receiver):
        backend.sql("INSERT INTO orders (item, qty) VALUES ('a', 1)")
        ext.notify("ping", None, app=app)
        got = seen.wait_for(2)
    assert [is_app for is_app, _ in got] == [True, True]
    threads = {thread for _, thread in got}
    assert len(threads) == 1 and threading.current_thread() not in threads


def test_wide_table_can_be_watched(backend: Backend, events: Recorder) -> None:
    """A table with 250 columns (SQLite allows 2000, PostgreSQL 1600) installs
    and delivers every column."""
    names = [f"c{i}" for i in range(250)]
    backend.sql(
        f"CREATE TABLE wide (id integer PRIMARY KEY, {', '.join(n + ' integer' for n in names)})"
    )
    app, ext = listening(backend.make_app, "wide")
    backend.sql(f"INSERT INTO wide VALUES (1, {', '.join(str(i) for i in range(250))})")
    backend.sql("UPDATE wide SET c249 = -1")
    ins, upd = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    assert ins.new == {"id": 1} | {n: i for i, n in enumerate(names)}
    assert upd.changed == {"c249"} and upd.new["c249"] == -1


def test_row_changes_and_notify_share_one_transaction(backend: Backend, events: Recorder) -> None:
    """Row events and a notify() in one transaction arrive together, in
    statement order, after the commit."""
    backend.sql("CREATE TABLE orders (id integer PRIMARY KEY, item text, qty integer)")
    app, ext = listening(backend.make_app, "orders")
    with backend.engine().begin() as conn:
        conn.execute(sa.text("INSERT INTO orders VALUES (1, 'a', 1)"))
        ext.notify("orders-changed", {"ids": [1]}, connection=conn, app=app)
        conn.execute(sa.text("UPDATE orders SET qty = 2"))
    ins, message, upd = events.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    assert (ins.op, message, upd.op) == ("INSERT", {"ids": [1]}, "UPDATE")


def test_decoders_make_the_same_events_as_the_constructor() -> None:
    """new_event(), which decoders use, builds what ChangeEvent()
    does: equal, same repr and hash, frozen, every field set."""
    import dataclasses

    from flask_dbnotify.events import new_event

    args = (
        "orders",
        Operation.UPDATE,
        (1, "a"),
        {"id": 1, "qty": 2},
        {"id": 1, "qty": 1},
        frozenset({"qty"}),
        7,
        datetime(2026, 1, 1, tzinfo=UTC),
        False,
        {"user": 1},
    )
    made, built = new_event(*args), ChangeEvent(*args)
    assert type(made) is ChangeEvent and made == built and repr(made) == repr(built)
    assert dataclasses.astuple(made) == dataclasses.astuple(built) and made.row == built.row
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.pk = 2  # type: ignore[misc]


def test_decoded_events_are_the_events_the_constructor_makes() -> None:
    """The decoder builds events its own (faster) way: each is the same
    frozen ChangeEvent as one made with ``ChangeEvent(...)``, for every
    shape of row a batch carries; ``changed`` compares exact numbers by
    their text."""
    from dataclasses import FrozenInstanceError

    from flask_dbnotify import _payload

    ts = datetime.fromtimestamp(1700000000.5, UTC)
    head = '"v":1,"ts":1700000000.5,"s":1'
    cases: list[tuple[str, list[ChangeEvent]]] = [
        (
            '{HEAD,"t":"t","o":"I","k":["id"],"r":[{"id":1,"a":"x"},["cut",{"id":2}]]}',
            [
                ChangeEvent("t", Operation.INSERT, 1, {"id": 1, "a": "x"}, None, timestamp=ts),
                ChangeEvent("t", Operation.INSERT, 2, {"id": 2}, None, timestamp=ts, cut=True),
            ],
        ),
        (
            '{HEAD,"t":"t","o":"D","k":["a","b"],"r":[{"a":1,"b":2}],"cx":"{\\"u\\":7}"}',
            [
                ChangeEvent(
                    "t",
                    Operation.DELETE,
                    (1, 2),
                    None,
                    {"a": 1, "b": 2},
                    timestamp=ts,
                    context={"u": 7},
                )
            ],
        ),
        (
            '{HEAD,"t":"t","o":"U","k":["id"],"r":[[{"id":1,"p":1.50,"q":2},{"id":1,"p":1.5,"q":2}],'
            '[{"id":2},{"id":2},["q"]],["cut",{"id":3},{"id":3}]]}',
            [
                ChangeEvent(
                    "t",
                    Operation.UPDATE,
                    1,
                    {"id": 1, "p": 1.5, "q": 2},
                    {"id": 1, "p": 1.5, "q": 2},
                    frozenset({"p"}),
                    timestamp=ts,
                ),
                ChangeEvent(
                    "t", Operation.UPDATE, 2, {"id": 2}, {"id": 2}, frozenset({"q"}), timestamp=ts
                ),
                ChangeEvent("t", Operation.UPDATE, 3, {"id": 3}, {"id": 3}, timestamp=ts, cut=True),
            ],
        ),
    ]
    for text, expected in cases:
        decoded = _payload.decode(text.replace("HEAD", head), 9)
        expected = [dataclasses.replace(e, id=9) for e in expected]
        assert decoded == expected
        assert [repr(e) for e in decoded] == [repr(e) for e in expected]
        assert all(type(e) is ChangeEvent for e in decoded)
        with pytest.raises(FrozenInstanceError):
            decoded[0].pk = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    [
        '{"a":1,"a":2,"b":[1E5,1e-7,1.0,1.50,-0.0,-0,0.1,1e400,123456789.123456789]}',
        '[18446744073709551616,-9223372036854775809,"\\ud83d\\ude00","\\u00e9"]',
        '["\\ud800",NaN,Infinity]',
    ],
)
def test_the_fast_json_decoder_reads_as_json_does(text: str) -> None:
    """With msgspec installed (the fast extra) payloads are read with it:
    the same values, exact numbers by their text, big integers whole;
    what it refuses, json reads."""
    from flask_dbnotify import _payload

    if _payload._fast is None:
        pytest.skip("msgspec is not installed")

    def typed(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: typed(v) for k, v in value.items()}
        if isinstance(value, list):
            return [typed(v) for v in value]
        return type(value), repr(value), getattr(value, "text", None)

    assert typed(_payload.loads(text)) == typed(_payload._decode(text))
