"""Hardening on real PostgreSQL: long rows and messages sent in pieces, rows
too large to carry, hostile session settings, names, notifications and
floods."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from psycopg2 import sql as pgsql

from flask_dbnotify import DBNotify, events_dropped, notification_received
from flask_dbnotify import listener as listener_module
from flask_dbnotify._payload import pieces
from flask_dbnotify.backends.postgresql import (
    MAX_MESSAGE_BYTES,
    MAX_ROW_BYTES,
    NOTIFY_LIMIT,
    PIECE_BYTES,
)

from ._helpers import SQL, WAIT, Recorder, captured_notifications, listening, marker, poll_until

MakeApp = Callable[..., tuple[Flask, DBNotify]]

DOCS = "CREATE TABLE docs (id int PRIMARY KEY, body text)"
#: 2- and 4-byte characters: most byte positions fall inside a character.
WIDE = "é𝄞"


@pytest.fixture()
def engine(pg_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(sa.make_url(pg_url).set(drivername="postgresql+psycopg2"))
    yield eng
    eng.dispose()


def split_messages(raw: list[str]) -> list[list[tuple[list[str], bytes]]]:
    """Pieces ``~SEQ K BYTES LAST``, grouped by message: (header fields, data)."""
    messages: list[list[tuple[list[str], bytes]]] = []
    for payload in raw:
        assert payload.startswith("~"), payload[:100]
        head, _, data = payload.partition("\n")
        fields = head[1:].split(" ")
        if fields[1] == "1":
            messages.append([])
        messages[-1].append((fields, data.encode()))
    return messages


def assert_whole_pieces(message: list[tuple[list[str], bytes]]) -> None:
    """Several pieces, numbered in order, adding up to the size they claim,
    each at most PIECE_BYTES, only the last marked last."""
    assert len(message) > 1
    assert [int(fields[1]) for fields, _ in message] == list(range(1, len(message) + 1))
    assert sum(len(data) for _, data in message) == int(message[0][0][2])
    assert all(len(data) <= PIECE_BYTES for _, data in message)
    assert [fields[3] for fields, _ in message] == ["0"] * (len(message) - 1) + ["1"]


# -- long rows, fast watches --------------------------------------------------------------------


def test_long_rows_arrive_whole_from_pieces(
    make_app: MakeApp, sql: SQL, events: Recorder, pg_url: str
) -> None:
    """Rows of 50 kB, 1 MB and of multi-byte text travel in several
    notifications and arrive whole and exact, not cut."""
    sql(DOCS)
    app, ext = listening(make_app, "docs")
    bodies = {
        1: "a" * 50_000,
        # 1 MB in which no two stretches are alike: a piece out of place shows.
        2: "".join(f"{i:07d}" for i in range(150_000)),
        3: WIDE * 16_000 + "!",
    }

    def write() -> None:
        for pk, body in bodies.items():
            sql("INSERT INTO docs VALUES (%s, %s)", (pk, body))

    raw = captured_notifications(pg_url, write)
    got = events.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    for event, (pk, body) in zip(got, bodies.items(), strict=True):
        assert (event.op.value, event.pk, event.cut, event.old) == ("INSERT", pk, False, None)
        assert event.new == {"id": pk, "body": body}

    messages = split_messages(raw)
    assert len(messages) == 3
    for message in messages:
        assert_whole_pieces(message)
    assert len(messages[1]) > 1_000_000 // PIECE_BYTES
    # In the multi-byte row a cut fell inside a character and moved back to its start.
    assert any(len(data) < PIECE_BYTES for _, data in messages[2][:-1])


def test_small_rows_around_long_ones_arrive_in_statement_order(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """One INSERT of 2,000 small rows with long ones among them delivers
    every row, whole, in statement order."""
    sql(DOCS)
    app, ext = listening(make_app, "docs")
    long_rows = {500: "L" * 30_000, 501: WIDE * 5_000, 1500: "M" * 20_000}
    sql(
        "INSERT INTO docs SELECT g, CASE g WHEN 500 THEN %s WHEN 501 THEN %s "
        "WHEN 1500 THEN %s ELSE 'small ' || g END FROM generate_series(1, 2000) g",
        (long_rows[500], long_rows[501], long_rows[1500]),
    )
    got = events.wait_for(2000)
    events.assert_no_more(2000, marker(ext, app))
    assert [e.pk for e in got] == list(range(1, 2001))
    for e in got:
        body = long_rows.get(e.pk, f"small {e.pk}")
        assert e.new == {"id": e.pk, "body": body} and not e.cut, e.pk


def test_updating_a_long_row_carries_it_whole(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """UPDATEs of a long row deliver new and old whole and the right
    changed columns, with every column carried and with columns=."""
    sql("CREATE TABLE docs (id int PRIMARY KEY, body text, qty int, extra text)")
    sql("CREATE TABLE notes (id int PRIMARY KEY, body text, qty int, extra text)")
    app, ext = make_app()
    ext.watch("docs")
    ext.watch("notes", columns=["body", "qty"])
    ext.install_triggers(app)
    ext.start(app)
    first, second = "a" * 40_000, WIDE * 7_000
    for table in ("docs", "notes"):
        sql(f"INSERT INTO {table} (id, body, qty, extra) VALUES (1, %s, 1, 'e')", (first,))
        sql(f"UPDATE {table} SET body = %s", (second,))
        sql(f"UPDATE {table} SET qty = 2")
    got = events.wait_for(6)
    events.assert_no_more(6, marker(ext, app))
    assert [(e.table, e.op.value) for e in got] == [
        (table, op) for table in ("docs", "notes") for op in ("INSERT", "UPDATE", "UPDATE")
    ]
    for table, (_, body_change, qty_change) in (("docs", got[:3]), ("notes", got[3:])):
        extra = {"extra": "e"} if table == "docs" else {}
        assert body_change.new == {"id": 1, "body": second, "qty": 1, **extra}
        assert body_change.old == {"id": 1, "body": first, "qty": 1, **extra}
        assert body_change.changed == {"body"}
        assert qty_change.new == {"id": 1, "body": second, "qty": 2, **extra}
        assert qty_change.old == {"id": 1, "body": second, "qty": 1, **extra}
        assert qty_change.changed == {"qty"}
        assert not body_change.cut and not qty_change.cut


# -- rows too large to carry ---------------------------------------------------------------------


@pytest.mark.parametrize("durable", [False, True], ids=["fast", "durable"])
def test_a_row_over_max_row_bytes_arrives_cut(
    make_app: MakeApp, sql: SQL, events: Recorder, durable: bool
) -> None:
    """A row whose JSON exceeds MAX_ROW_BYTES is written as usual and its
    INSERT, UPDATE and DELETE arrive cut: primary key columns only, cut
    set, nothing in changed; small rows of the same statement arrive whole."""
    sql(DOCS)
    app, ext = listening(make_app, "docs", durable=durable)
    sql(
        "INSERT INTO docs VALUES (1, 'before'), (2, repeat('x', %s)), (3, 'after')",
        (MAX_ROW_BYTES + 1000,),
    )
    sql("UPDATE docs SET id = 20, body = body || 'y' WHERE id = 2")
    sql("DELETE FROM docs WHERE id = 20")
    assert sql("SELECT id, body FROM docs ORDER BY id") == [(1, "before"), (3, "after")]
    got = events.wait_for(5)
    events.assert_no_more(5, marker(ext, app))
    nothing: frozenset[str] = frozenset()
    assert [(e.op.value, e.pk, e.new, e.old, e.changed, e.cut) for e in got] == [
        ("INSERT", 1, {"id": 1, "body": "before"}, None, nothing, False),
        ("INSERT", 2, {"id": 2}, None, nothing, True),
        ("INSERT", 3, {"id": 3, "body": "after"}, None, nothing, False),
        ("UPDATE", 20, {"id": 20}, {"id": 2}, nothing, True),
        ("DELETE", 20, None, {"id": 20}, nothing, True),
    ]
    assert all((e.id is not None) == durable for e in got)


def test_a_cut_row_with_a_composite_key_has_a_tuple_pk(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """A cut row of a table with a composite primary key carries every key
    column, and its pk is a tuple."""
    sql("CREATE TABLE pairs (region text, id int, body text, PRIMARY KEY (region, id))")
    app, ext = listening(make_app, "pairs")
    sql("INSERT INTO pairs VALUES ('eu', 1, repeat('x', %s))", (MAX_ROW_BYTES + 1000,))
    sql("DELETE FROM pairs")
    got = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    assert [(e.op.value, e.pk, e.new, e.old, e.cut) for e in got] == [
        ("INSERT", ("eu", 1), {"region": "eu", "id": 1}, None, True),
        ("DELETE", ("eu", 1), None, {"region": "eu", "id": 1}, True),
    ]


# -- long and impossible messages ----------------------------------------------------------------


def test_a_long_message_arrives_whole_from_pieces(
    make_app: MakeApp, events: Recorder, pg_url: str
) -> None:
    """notify() with a payload of about 100 kB sends it in pieces; it
    arrives whole."""
    app, ext = make_app()
    ext.start(app)
    payload = {"text": WIDE * 10_000, "numbers": list(range(10_000))}
    raw = captured_notifications(pg_url, lambda: ext.notify("big", payload, app=app))
    assert events.wait_for(1) == [payload]
    events.assert_no_more(1, marker(ext, app))
    (message,) = split_messages(raw)
    assert_whole_pieces(message)
    assert int(message[0][0][2]) > 90_000


def test_a_long_message_in_a_transaction_waits_for_commit(
    make_app: MakeApp, events: Recorder, engine: sa.Engine
) -> None:
    """notify(connection=) with a long payload inside a transaction arrives
    after the commit, and not at all after a rollback."""
    app, ext = make_app()
    ext.start(app)
    payload = WIDE * 20_000
    with engine.connect() as conn:
        with conn.begin():
            ext.notify("big", payload, connection=conn, app=app)
            ext.notify("marker", "before commit", app=app)
            events.wait_for(1)
            assert events.items == ["before commit"]
        assert events.wait_for(2)[1] == payload
        transaction = conn.begin()
        ext.notify("big", "rolled back " + payload, connection=conn, app=app)
        transaction.rollback()
    events.assert_no_more(2, marker(ext, app))


def test_a_message_over_the_limit_raises_and_sends_nothing(
    make_app: MakeApp, events: Recorder, engine: sa.Engine
) -> None:
    """A payload whose JSON exceeds MAX_MESSAGE_BYTES raises ValueError,
    with or without a connection, and nothing is sent."""
    app, ext = make_app()
    ext.start(app)
    payload = "x" * MAX_MESSAGE_BYTES
    with pytest.raises(ValueError, match="bytes"):
        ext.notify("big", payload, app=app)
    with engine.begin() as conn:
        with pytest.raises(ValueError, match="bytes"):
            ext.notify("big", payload, connection=conn, app=app)
    events.assert_no_more(0, marker(ext, app))


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "make_payload",
    [lambda: "\ud800", lambda: {"deep": nested(100_000)}, lambda: [1.0, float("nan")]],
    ids=["lone-surrogate", "nested-100000-deep", "nan"],
)
def test_payloads_json_cannot_carry_raise_type_error(
    make_app: MakeApp, events: Recorder, make_payload: Callable[[], Any]
) -> None:
    """A lone surrogate, a list nested 100,000 deep and NaN make notify()
    raise TypeError (not RecursionError), and nothing is sent."""
    app, ext = make_app()
    ext.start(app)
    with pytest.raises(TypeError):
        ext.notify("bad", make_payload(), app=app)
    events.assert_no_more(0, marker(ext, app))


# -- hostile session settings --------------------------------------------------------------------


def test_garbage_in_the_batch_counter_does_not_break_writes(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """A session whose dbnotify.batch setting (the triggers' per-transaction
    counter) holds garbage writes to a watched table as usual, and every
    event arrives, long rows and several statements a transaction included."""
    sql(DOCS)
    app, ext = listening(make_app, "docs")
    long_body = WIDE * 3_000
    values = ["x", "", "-1", "99999999999999999999", "999999999999999"]
    for n, value in enumerate(values):
        sql(f"SET dbnotify.batch = '{value}'")
        pk = 10 * n
        sql(
            "BEGIN; INSERT INTO docs VALUES (%(a)s, 'one'), (%(b)s, %(long)s); "
            "INSERT INTO docs VALUES (%(c)s, 'two'); COMMIT",
            {"a": pk + 1, "b": pk + 2, "c": pk + 3, "long": long_body},
        )
        sql("UPDATE docs SET body = 'three' WHERE id = %s", (pk + 3,))
    got = events.wait_for(4 * len(values))
    events.assert_no_more(4 * len(values), marker(ext, app))
    expected = []
    for n in range(len(values)):
        pk = 10 * n
        expected += [
            ("INSERT", pk + 1, {"id": pk + 1, "body": "one"}),
            ("INSERT", pk + 2, {"id": pk + 2, "body": long_body}),
            ("INSERT", pk + 3, {"id": pk + 3, "body": "two"}),
            ("UPDATE", pk + 3, {"id": pk + 3, "body": "three"}),
        ]
    assert [(e.op.value, e.pk, e.new) for e in got] == expected


def test_garbage_in_the_durable_hand_over_settings_is_never_delivered(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """A session that set dbnotify.s1_1.. (where durable triggers hand rows
    over) to garbage, or to forged rows, writes as usual; the real rows
    arrive, never what the session put there."""
    sql(DOCS)
    app, ext = listening(make_app, "docs", durable=True)
    sql("SET dbnotify.n1 = 'garbage'")
    sql("SET dbnotify.s1_1 = 'garbage'")
    sql("INSERT INTO docs VALUES (1, 'real')")
    sql("UPDATE docs SET body = 'changed'")
    forged = '{"id": 666, "body": "forged"}'
    sql("SET dbnotify.s1_1 = '#2'")
    sql(f"SET dbnotify.s1_2 = '{forged}'")
    sql(f"SET dbnotify.s1_3 = '{forged}'")
    sql("UPDATE docs SET body = 'no such row' WHERE id = 99")
    sql("INSERT INTO docs VALUES (2, 'also real')")
    sql("DELETE FROM docs")
    assert sql("SELECT count(*) FROM docs") == [(0,)]
    got = events.wait_for(5)
    events.assert_no_more(5, marker(ext, app))
    assert [(e.op.value, e.pk, e.new, e.old) for e in got] == [
        ("INSERT", 1, {"id": 1, "body": "real"}, None),
        ("UPDATE", 1, {"id": 1, "body": "changed"}, {"id": 1, "body": "real"}),
        ("INSERT", 2, {"id": 2, "body": "also real"}, None),
        ("DELETE", 1, None, {"id": 1, "body": "changed"}),
        ("DELETE", 2, None, {"id": 2, "body": "also real"}),
    ]
    assert all(e.id is not None for e in got)


# -- names ---------------------------------------------------------------------------------------


def test_bind_parameter_like_names_install_through_sqlalchemy_text(
    make_app: MakeApp, sql: SQL, events: Recorder, engine: sa.Engine
) -> None:
    """Tables named ':name %s' and ':other%(p)s', with a column ':col', can be
    watched: install_sql() holds no bind parameter for sqlalchemy.text()
    (Alembic's op.execute), and run that way it installs working triggers."""
    table, other, column = ":name %s", ":other%(p)s", ":col"

    def quoted(name: str) -> str:
        return str(pgsql.Identifier(name).as_string(sql.conn))

    sql(f"CREATE TABLE {quoted(table)} (id int PRIMARY KEY, {quoted(column)} text, n int)")
    sql(f"CREATE TABLE {quoted(other)} (id int PRIMARY KEY, {quoted(column)} text)")
    app, ext = make_app()
    ext.watch(table, columns=[column], when_changed=[column])
    ext.watch(other, durable=True)
    statements = ext.install_sql(app)
    assert statements
    assert [s for s in statements if sa.text(s).compile().params] == []
    assert ext.status(app).watches == {table: "missing", other: "missing"}
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))
    assert ext.status(app).watches == {table: "installed", other: "installed"}

    ext.start(app)
    # No parameters: psycopg2 leaves the '%' in the names alone.
    sql(f"INSERT INTO {quoted(table)} VALUES (1, 'a', 0)")
    sql(f"UPDATE {quoted(table)} SET n = 1")
    sql(f"UPDATE {quoted(table)} SET {quoted(column)} = 'b'")
    sql(f"INSERT INTO {quoted(other)} VALUES (7, 'c')")
    got = events.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    assert [(e.table, e.op.value, e.new, e.changed) for e in got] == [
        (table, "INSERT", {"id": 1, column: "a"}, frozenset()),
        (table, "UPDATE", {"id": 1, column: "b"}, {column}),
        (other, "INSERT", {"id": 7, column: "c"}, frozenset()),
    ]
    assert got[2].id is not None


# -- forged and broken notifications -------------------------------------------------------------


def test_forged_and_broken_pieces_are_skipped(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """Forged pieces (claiming more than a listener takes, out of order,
    with a malformed header, not adding up) are skipped; each message that
    was begun (a first piece came) is reported as dropped; valid JSON
    nested too deep to read (3,999 deep in one notification, 100,000 deep
    in pieces) is skipped. The listener stays
    connected, holds nothing for any of them, and later events arrive."""
    sql(DOCS)
    app, ext = listening(make_app, "docs")
    forged = [
        "~1 1 999999999 0\n" + "x" * 100,  # claims more than a listener takes
        "~2 2 20000 0\n" + "x" * 100,  # piece 2 with no piece 1
        "~garbage\n" + "x" * 100,  # a malformed header
        "~3 1 abc 1\nx",  # a size that is no number
        "~4 1 500 1\n" + "x" * 100,  # a last piece short of the size claimed
        "~5 1 50 0\n" + "x" * 100,  # more than the size claimed
    ]
    deep = "[" * 100_000 + "]" * 100_000
    dropped = Recorder()
    with events_dropped.connected_to(dropped, sender=app):
        for text in forged:
            sql("SELECT pg_notify('dbnotify', %s)", (text,))
        # Valid JSON nested too deep to read: in one notification, and in pieces.
        sql("SELECT pg_notify('dbnotify', %s)", ("[" * 3_999 + "]" * 3_999,))
        sql(
            "SELECT pg_notify('dbnotify', p) FROM unnest(%s::text[]) WITH ORDINALITY AS t(p, o) "
            "ORDER BY o",
            (pieces(deep, NOTIFY_LIMIT, PIECE_BYTES),),
        )
        sql("INSERT INTO docs VALUES (1, 'after')")
        (event,) = events.wait_for(1)
        assert event.new == {"id": 1, "body": "after"}
        # A long message from the forging session: what was open for it is let go.
        payload = WIDE * 5_000
        ext.notify("big", payload, connection=sql.conn, app=app)
        assert events.wait_for(2)[1] == payload
        events.assert_no_more(2, marker(ext, app))
    # The over-limit, the short and the overlong message were begun; a
    # piece 2 alone or a malformed header begins nothing.
    assert sum(item["count"] for item in dropped.items) == 3
    assert app.extensions["dbnotify"].listener._feed._pieces._open is None
    state = ext.listener_state(app)
    assert state.connected and state.reconnects == 0, state


# -- a flooded queue -----------------------------------------------------------------------------


def test_a_flooded_queue_is_logged_once_not_per_overflow(
    make_app: MakeApp,
    engine: sa.Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With DBNOTIFY_QUEUE_SIZE=5 and a receiver holding up the dispatcher,
    five rounds of 20 messages overflow the queue five times: each overflow
    is reported by events_dropped, but "dispatch queue full" is logged once
    (at most once per 10 s)."""
    caplog.set_level(logging.WARNING, logger="flask_dbnotify")
    # The limiter lives as long as the process: a warning of an earlier
    # test must not hold this test's back.
    listener_module._limited.reset()
    app, ext = make_app(DBNOTIFY_QUEUE_SIZE=5)
    ext.start(app)
    hold = threading.Event()
    delivered, dropped = Recorder(), Recorder()

    def slow(sender: Any, payload: Any, **extra: Any) -> None:
        hold.wait(WAIT)
        delivered.add(payload)

    def read(count: int) -> Callable[[], bool]:
        return lambda: ext.listener_state(app).received >= count

    rounds, per_round = 5, 20
    t0 = time.monotonic()
    try:
        with (
            notification_received.connected_to(slow, sender="load"),
            events_dropped.connected_to(dropped, sender=app),
        ):
            for n in range(1, rounds + 1):
                hold.clear()
                with engine.begin() as conn:
                    for i in range(per_round):
                        ext.notify("load", [n, i], connection=conn, app=app)
                poll_until(read(n * per_round), f"the {n * per_round} messages read")
                hold.set()
                dropped.wait_for(n, f"round {n}'s events_dropped")
    finally:
        hold.set()
    elapsed = time.monotonic() - t0
    counts = [item["count"] for item in dropped.items]
    assert len(counts) == rounds and all(counts), counts
    assert len(delivered.items) + sum(counts) == rounds * per_round
    warned = [r for r in caplog.records if "dispatch queue full" in r.getMessage()]
    assert elapsed < 10, "the rounds took longer than the limiter's interval"
    assert len(warned) == 1, [r.getMessage() for r in warned]
