"""WAL capture (``DBNOTIFY_CAPTURE = "wal"``), on a server of the tests' own
with ``wal_level = logical``: no trigger in any writer's transaction, the
same events as triggers mode. Faults (a leader killed, the server
restarted, every process stopped) are in tests/test_wal_faults.py."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest
from flask import Flask
from sqlalchemy.engine import make_url

from flask_dbnotify import ChangeEvent, DBNotify, DBNotifyError, table_truncated
from flask_dbnotify.backends.postgresql import MAX_ROW_BYTES
from flask_dbnotify.backends.postgresql.connection import Reader
from flask_dbnotify.backends.postgresql.wal import Relayed, leader

from ._helpers import (
    SQL,
    Recorder,
    Role,
    app_factory,
    captured_notifications,
    listening,
    marker,
    poll_until,
    roles_on,
)

MakeApp = Callable[..., tuple[Flask, DBNotify]]
ORDERS = "CREATE TABLE orders (id int PRIMARY KEY, item text, qty int)"


@pytest.fixture()
def wal_roles(logical_url: str, wal_sql: SQL) -> Iterator[Callable[[str], Role]]:
    """Login roles on the logical server, dropped after the test."""
    with roles_on(wal_sql, logical_url) as make:
        yield make


@contextmanager
def side_by_side(
    logical_url: str, wal_app: MakeApp, triggers_table: str, wal_table: str, **options: Any
) -> Iterator[tuple[Recorder, Recorder]]:
    """Two apps, started: one watching ``triggers_table`` by durable
    triggers, one ``wal_table`` by WAL capture, both with ``options``; what
    each one's on() receiver gets (both apps' listeners read the same
    channel, and the signals are the process's)."""
    factory, made = app_factory(logical_url, "trigger_app")
    try:
        t_app, t_ext = factory()
        t_ext.watch(triggers_table, durable=True, **options)
        t_ext.install_triggers(t_app)
        w_app, w_ext = wal_app()
        w_ext.watch(wal_table, **options)
        w_ext.install_triggers(w_app)
        by_triggers, by_wal = Recorder(), Recorder()
        t_ext.on(triggers_table)(by_triggers.add)
        w_ext.on(wal_table)(by_wal.add)
        t_ext.start(t_app)
        w_ext.start(w_app)
        yield by_triggers, by_wal
    finally:
        for app, ext in made:
            ext.close(app)


def rows(events: Recorder) -> list[ChangeEvent]:
    return [e for e in events.items if isinstance(e, ChangeEvent)]


def test_wal_capture_delivers_changes_with_no_trigger(
    wal_app: MakeApp, wal_sql: SQL, events: Recorder
) -> None:
    """install-triggers makes a publication and a slot and no trigger; a
    listener then gets every committed change, in commit order, as
    triggers mode gives it: op, pk, new, old, changed, and a journal id."""
    wal_sql(ORDERS)
    app, ext = wal_app()
    ext.watch("orders")
    ext.install_triggers(app)
    assert wal_sql("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass") == [(0,)]
    assert ext.status(app).watches == {"orders": "installed"}
    ext.start(app)
    wal_sql("INSERT INTO orders VALUES (1, 'tea', 1), (2, 'milk', 2)")
    wal_sql("UPDATE orders SET qty = 5 WHERE id = 1")
    wal_sql("UPDATE orders SET qty = 5 WHERE id = 1")  # changes nothing
    (before_delete,) = wal_sql("SELECT pg_current_wal_lsn()::text")[0]
    wal_sql("DELETE FROM orders WHERE id = 2")
    got = events.wait_for(4)
    assert [(e.op.value, e.pk) for e in got] == [
        ("INSERT", 1),
        ("INSERT", 2),
        ("UPDATE", 1),
        ("DELETE", 2),
    ]
    assert got[0].new == {"id": 1, "item": "tea", "qty": 1}
    assert got[2].new == {"id": 1, "item": "tea", "qty": 5}
    assert got[2].old == {"id": 1, "item": "tea", "qty": 1}
    assert got[2].changed == {"qty"}
    assert got[3].old == {"id": 2, "item": "milk", "qty": 2}
    ids = [e.id for e in got]
    assert all(isinstance(i, int) for i in ids) and ids == sorted(set(ids)), ids
    events.assert_no_more(4, marker(ext, app))
    # The leader confirms what it relayed at once (psycopg2 alone would
    # wait for its 10-second status interval): the slot holds no more WAL
    # than it must, and a successor starts from there.
    poll_until(
        lambda: (
            wal_sql(
                "SELECT confirmed_flush_lsn > %s::pg_lsn FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (before_delete, app.config["DBNOTIFY_SLOT"]),
            )
            == [(True,)]
        ),
        "the slot to confirm the DELETE, relayed",
        timeout=3,
    )


def test_events_committed_while_no_process_runs_arrive_at_start(
    wal_app: MakeApp, wal_sql: SQL, events: Recorder
) -> None:
    """The slot keeps what is committed while no process of the app runs."""
    wal_sql(ORDERS)
    app, ext = wal_app()
    ext.watch("orders")
    ext.install_triggers(app)
    wal_sql("INSERT INTO orders VALUES (1, 'tea', 1)")
    ext.start(app)
    (event,) = events.wait_for(1, "the row committed before any process ran")
    assert (event.op.value, event.pk) == ("INSERT", 1)


def test_wal_level_replica_is_refused_with_what_to_set(make_app: MakeApp, sql: SQL) -> None:
    """On a server without wal_level = logical (the shared one), install
    says which setting to change and that it needs a restart."""
    sql(ORDERS)
    app, ext = make_app(DBNOTIFY_CAPTURE="wal")
    ext.watch("orders")
    with pytest.raises(DBNotifyError, match="wal_level = logical.*restart"):
        ext.install_triggers(app)


def test_capture_setting_is_checked(make_app: MakeApp) -> None:
    with pytest.raises(ValueError, match="DBNOTIFY_CAPTURE must be one of 'triggers', 'wal'"):
        make_app(DBNOTIFY_CAPTURE="logical")
    with pytest.raises(ValueError, match="DBNOTIFY_SLOT must be a name"):
        make_app(DBNOTIFY_CAPTURE="wal", DBNOTIFY_SLOT="Bad-Name")


def test_uninstall_drops_the_publication_and_the_slot(wal_app: MakeApp, wal_sql: SQL) -> None:
    wal_sql(ORDERS)
    app, ext = wal_app()
    ext.watch("orders")
    ext.install_triggers(app)
    slot = app.config["DBNOTIFY_SLOT"]
    assert wal_sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == [
        (1,)
    ]
    ext.uninstall_triggers(app)
    assert wal_sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == [
        (0,)
    ]
    assert wal_sql("SELECT count(*) FROM pg_publication WHERE pubname = %s", (slot,)) == [(0,)]


TYPES = (
    'CREATE TABLE {} (id int, "Part" text, name text, qty int, price numeric(10, 2), '
    "tags jsonb, doc json, seen timestamptz, day date, ok boolean, ratio float8, "
    'raw bytea, list int[], big bigint, note varchar(20), PRIMARY KEY (id, "Part"))'
)
WRITES = [
    "INSERT INTO {} VALUES (1, 'x', 'a', 1, 1.50, '{{\"k\": [1, 2]}}', '{{\"b\": 1,  \"a\": 2}}', "
    "'2024-01-02 03:04:05.123456+00', '2024-01-02', true, 0.1, '\\x00ff', '{{1,2,NULL}}', "
    "9007199254740993, 'n:1'), (2, 'y', 'b', 2, NULL, NULL, NULL, NULL, NULL, NULL, 'NaN', "
    "NULL, '{{}}', NULL, NULL), (3, 'z', 'c', 3, 3.00, '[]', '[]', "
    "'2024-05-06 07:08:09+02', 'infinity', false, -1e300, '', NULL, -1, 'é')",
    "UPDATE {} SET qty = qty + 10, name = upper(name) WHERE id <= 2",
    "UPDATE {} SET name = name",
    "UPDATE {} SET name = 'only the name' WHERE id = 3",
    "UPDATE {} SET \"Part\" = 'w' WHERE id = 3",
    "DELETE FROM {} WHERE id IN (1, 3)",
]


@pytest.mark.parametrize("handed_over", [True, False], ids=["handed-over", "read-back"])
@pytest.mark.parametrize(
    "options",
    [{}, {"columns": ["qty", "tags"]}, {"when_changed": ["qty"]}],
    ids=["all", "columns", "when_changed"],
)
def test_wal_events_equal_trigger_events(
    logical_url: str,
    wal_app: MakeApp,
    wal_sql: SQL,
    options: dict[str, Any],
    handed_over: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same writes to two tables of the same shape, one watched by
    triggers (durable) and one from the WAL, give equal events: op, pk,
    new, old, changed, and values of every common type. The leading
    process's listener gets what its relay wrote handed over; others read
    it back from the journal (here, with the hand-over turned off)."""
    if not handed_over:
        put = Relayed.put
        monkeypatch.setattr(Relayed, "put", lambda self, rows: put(self, None))
    wal_sql(TYPES.format("by_triggers"))
    wal_sql(TYPES.format('"By WAL"'))
    with side_by_side(logical_url, wal_app, "by_triggers", '"By WAL"', **options) as (
        by_triggers,
        by_wal,
    ):
        for statement in WRITES:
            wal_sql(statement.format("by_triggers"))
            wal_sql(statement.format('"By WAL"'))
        # 3 inserts, 2 + 1 + 1 updates (one changes nothing), 2 deletes;
        # with when_changed=qty, only the first update counts.
        expected = by_triggers.wait_for(7 if "when_changed" in options else 9)
        got = by_wal.wait_for(len(expected))
        wal_sql('INSERT INTO "By WAL" (id, "Part") VALUES (99, \'last\')')
        by_wal.wait_for(len(expected) + 1, "the last row")
        assert by_wal.items[-1].pk == (99, "last"), by_wal.items[len(expected) :]

    def shape(e: ChangeEvent) -> tuple[Any, ...]:
        return (e.op, e.pk, e.new, e.old, e.changed, e.cut)

    assert [shape(e) for e in got] == [shape(e) for e in expected]


def test_the_leading_process_delivers_what_it_relayed_without_reading_it_back(
    wal_app: MakeApp, wal_sql: SQL, events: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay hands the rows it wrote to its own process's listener,
    which delivers them in the order of their notifications without a
    query: one row, a few, and more than a relay sends in one query
    (COPY). Rows whose bodies the server built (a type the relay does not
    convert) are read back."""
    wal_sql(ORDERS)
    wal_sql("CREATE TABLE places (id int PRIMARY KEY, spot point)")
    app, ext = wal_app()
    ext.watch("orders")
    ext.watch("places")
    ext.install_triggers(app)
    reads: list[str] = []
    run = Reader.run

    def counted(self: Reader, statement: str, *args: Any, **kwargs: Any) -> Any:
        if "BETWEEN" in statement:  # the rows a notification names
            reads.append(statement)
        return run(self, statement, *args, **kwargs)

    monkeypatch.setattr(Reader, "run", counted)
    ext.start(app)
    wal_sql("INSERT INTO orders VALUES (1, 'tea', 1)")
    wal_sql("INSERT INTO orders SELECT g, 'item', g FROM generate_series(2, 4) g")
    wal_sql("INSERT INTO orders SELECT g, 'item', g FROM generate_series(5, 2004) g")
    got = events.wait_for(2004)
    assert reads == []
    wal_sql("INSERT INTO places VALUES (1, '(1, 2)')")
    (place,) = events.wait_for(2005)[2004:]
    assert [e.pk for e in got] == list(range(1, 2005))
    assert [e.id for e in got] == sorted({e.id for e in got})
    assert place.new == {"id": 1, "spot": "(1,2)"}
    assert len(reads) == 1


def test_notify_on_a_connection_rides_in_the_transaction(
    logical_url: str, wal_app: MakeApp, wal_sql: SQL, events: Recorder
) -> None:
    """notify(connection=...) writes a message to the WAL, not a NOTIFY: it
    arrives after the commit, among the transaction's rows, and not at all
    if the transaction rolls back."""
    wal_sql(ORDERS)
    app, ext = listening(wal_app, "orders")
    conn = psycopg2.connect(logical_url)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO orders VALUES (1, 'tea', 1)")
        ext.notify("shop", {"rolled": "back"}, connection=conn, app=app)
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("INSERT INTO orders VALUES (2, 'milk', 1)")
        ext.notify("shop", {"order": 2}, connection=conn, app=app)
        with conn.cursor() as cur:
            cur.execute("INSERT INTO orders VALUES (3, 'jam', 1)")
        conn.commit()
    finally:
        conn.close()
    got = events.wait_for(3)
    assert [getattr(e, "pk", e) for e in got] == [2, {"order": 2}, 3]
    events.assert_no_more(3, marker(ext, app))


def test_truncate_arrives_as_table_truncated(wal_app: MakeApp, wal_sql: SQL) -> None:
    wal_sql(ORDERS)
    app, ext = wal_app()
    ext.watch("orders")
    ext.install_triggers(app)
    truncated = Recorder()
    with table_truncated.connected_to(truncated, sender="orders"):
        ext.start(app)
        wal_sql("INSERT INTO orders VALUES (1, 'tea', 1)")
        wal_sql("TRUNCATE orders")
        (event,) = truncated.wait_for(1, "the TRUNCATE")
    assert event.op.value == "TRUNCATE" and isinstance(event.id, int)


def test_once_receivers_and_status_in_wal_mode(wal_app: MakeApp, wal_sql: SQL) -> None:
    """A once receiver runs for each event; status reports the slot, its
    leader and its lag."""
    wal_sql(ORDERS)
    app, ext = wal_app()
    handled = Recorder()

    @ext.on("orders", once=True)
    def record(event: ChangeEvent) -> None:
        handled.add(event.pk)

    ext.install_triggers(app)
    ext.start(app)
    wal_sql("INSERT INTO orders SELECT n, 'x', 1 FROM generate_series(1, 5) AS n")
    assert sorted(handled.wait_for(5, "each event once")) == [1, 2, 3, 4, 5]
    status = poll_until(
        lambda: (
            (s := ext.status(app)).health["slot"].endswith("WAL reserved")
            and "leader pid" in s.health["slot"]
            and s
        ),
        "status to show the leader",
    )
    assert status.watches == {"orders": "installed"}
    assert re.fullmatch(r"\d+ bytes(, \d+\.\d{3} s)?", status.health["slot lag"]), status.health
    slot = app.config["DBNOTIFY_SLOT"]
    assert status.health["publication"] == (
        f"{slot}: public.dbnotify_wal_messages, public.dbnotify_wal_watches, public.orders"
    )
    assert not status.warnings, status.warnings


def test_a_terminated_leader_session_resumes_without_loss(
    wal_app: MakeApp, wal_sql: SQL, events: Recorder
) -> None:
    """The server ends the leader's replication session (pg_terminate_backend)
    between commits: the leader starts streaming again where the slot
    stands; every row arrives once."""
    wal_sql(ORDERS)
    app, ext = listening(wal_app, "orders")
    wal_sql("INSERT INTO orders VALUES (1, 'a', 1)")
    events.wait_for(1)
    slot = app.config["DBNOTIFY_SLOT"]
    for n in range(2, 6):
        wal_sql(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = %s AND active_pid IS NOT NULL",
            (slot,),
        )
        wal_sql("INSERT INTO orders VALUES (%s, 'a', 1)", (n,))
    got = events.wait_for(5)
    assert [e.pk for e in got] == [1, 2, 3, 4, 5]
    events.assert_no_more(5, marker(ext, app))


def test_a_schema_change_mid_stream_is_followed(
    wal_app: MakeApp, wal_sql: SQL, events: Recorder
) -> None:
    """Columns added, renamed and dropped between writes: each event carries
    the columns its row had when it was written."""
    wal_sql(ORDERS)
    app, ext = listening(wal_app, "orders")
    wal_sql("INSERT INTO orders VALUES (1, 'tea', 1)")
    wal_sql("ALTER TABLE orders ADD COLUMN note text DEFAULT 'n'")
    wal_sql("INSERT INTO orders VALUES (2, 'milk', 2, 'fresh')")
    wal_sql("ALTER TABLE orders RENAME COLUMN item TO product")
    wal_sql("UPDATE orders SET qty = 3 WHERE id = 2")
    wal_sql("ALTER TABLE orders DROP COLUMN note")
    wal_sql("ALTER TABLE orders ALTER COLUMN qty TYPE numeric(6, 2)")
    wal_sql("INSERT INTO orders VALUES (3, 'jam', 1.50)")
    got = events.wait_for(4)
    assert [e.new for e in got] == [
        {"id": 1, "item": "tea", "qty": 1},
        {"id": 2, "item": "milk", "qty": 2, "note": "fresh"},
        {"id": 2, "product": "milk", "qty": 3, "note": "fresh"},
        {"id": 3, "product": "jam", "qty": 1.5},
    ]
    assert got[2].old == {"id": 2, "product": "milk", "qty": 2, "note": "fresh"}
    assert got[2].changed == {"qty"}
    assert getattr(got[3].new["qty"], "text", None) == "1.50"  # numeric keeps its scale
    events.assert_no_more(4, marker(ext, app))


def test_a_role_with_no_grants_cannot_send_a_journaled_message(
    logical_url: str,
    wal_roles: Callable[[str], Role],
    wal_app: MakeApp,
    wal_sql: SQL,
    events: Recorder,
) -> None:
    """In WAL mode a message sent in a transaction is journaled, so it is
    trusted like a durable one (DBNOTIFY_FAST_MESSAGES=False accepts it).
    A role with no grants can neither write the messages table nor pass a
    message off through pg_logical_emit_message(), which any role may
    call: what it emits is not relayed."""
    wal_sql(ORDERS)
    app, ext = wal_app(DBNOTIFY_FAST_MESSAGES=False)
    ext.watch("orders")
    ext.install_triggers(app)
    ext.start(app)
    intruder = wal_roles("nogrant")
    forged = '{"v": 1, "m": "shop", "p": "forged"}'
    intruder.run("SELECT pg_logical_emit_message(true, 'dbnotify', %s)", (forged,))
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        intruder.run("INSERT INTO dbnotify_wal_messages (body) VALUES (%s)", (forged,))
    conn = psycopg2.connect(logical_url)
    try:
        ext.notify("shop", "real", connection=conn, app=app)
        conn.commit()
    finally:
        conn.close()
    # A row after all that (fast messages, the usual marker, are refused here).
    wal_sql("INSERT INTO orders VALUES (1, 'after', 1)")
    got = events.wait_for(2, "the app's own message, then the row")
    assert got[0] == "real" and got[1].pk == 1, got
    assert len(events.items) == 2, events.items


def test_writes_while_every_process_is_stopped_arrive_at_restart(
    wal_app: MakeApp, wal_sql: SQL, events: Recorder
) -> None:
    """The app's only process stops its listener (and so its leader); rows
    committed meanwhile arrive once after start(), in order, and nothing
    delivered before comes again."""
    wal_sql(ORDERS)
    app, ext = listening(wal_app, "orders")
    wal_sql("INSERT INTO orders VALUES (1, 'before', 1)")
    events.wait_for(1)
    ext.stop(app)
    for n in range(2, 202):
        wal_sql("INSERT INTO orders VALUES (%s, 'while stopped', 1)", (n,))
    ext.start(app)
    got = events.wait_for(201, "the rows committed while stopped")
    assert [e.pk for e in got] == list(range(1, 202))
    events.assert_no_more(201, marker(ext, app))


def test_a_role_with_no_grants_hears_no_row_and_cannot_forge_one(
    wal_roles: Callable[[str], Role], wal_app: MakeApp, wal_sql: SQL, events: Recorder
) -> None:
    """WAL capture is private by construction: the relay's notifications
    name journal ids, never a row, and the journal is the app's. A role
    with no grants that LISTENs learns only that something was relayed;
    a notification it sends in the relay's form, naming rows it cannot
    write, delivers nothing."""
    wal_sql(ORDERS)
    app, ext = listening(wal_app, "orders")
    intruder = wal_roles("listener")

    def write() -> None:
        wal_sql("INSERT INTO orders VALUES (1, 'secret recipe', 7)")
        events.wait_for(1, "the row, in the app")

    heard = captured_notifications(intruder.url, write)
    assert heard and all("secret" not in p and '"r"' not in p for p in heard), heard
    assert all(set(json.loads(p)) == {"v", "J", "x", "j"} for p in heard), heard
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        intruder.run("SELECT body FROM dbnotify_journal")
    # Where the relay stands: writing it could hide changes (part_count) or
    # make every process hear a gap.
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        intruder.run("UPDATE dbnotify_wal SET part_count = 1000000, gap = 'forged'")
    (xid,) = intruder.run("SELECT pg_current_xact_id()::text")[0]
    for payload in (
        json.loads(heard[0]) | {"x": int(xid)},  # the real rows, another xid
        {
            "v": 1,
            "t": "orders",
            "o": "I",
            "k": ["id"],
            "ts": 1.0,
            "s": 1,
            "r": [{"id": 2, "item": "forged", "qty": 1}],
        },
        {"v": 1, "gap": "forged"},
    ):
        intruder.run("SELECT pg_notify('dbnotify', %s)", (json.dumps(payload),))
    wal_sql("INSERT INTO orders VALUES (3, 'after', 1)")
    got = events.wait_for(2, "the row after the forgeries")
    assert [e.pk for e in got] == [1, 3], got
    events.assert_no_more(2, marker(ext, app))


@pytest.mark.parametrize(
    "extra",
    ["", ", tags int[]"],
    ids=["built-here", "built-by-the-server"],
)
def test_rows_over_max_row_bytes_arrive_cut_as_in_triggers_mode(
    wal_app: MakeApp, wal_sql: SQL, events: Recorder, extra: str
) -> None:
    """As in triggers mode (tests/test_hardening.py): a row whose JSON is
    over MAX_ROW_BYTES arrives cut, primary key only, whether its text is
    over too or only its JSON (newlines escaped take two bytes); small rows
    of the same statement arrive whole. Both ways the relay builds bodies:
    here (text columns) and on the server (a column of a type it leaves to
    the server)."""
    wal_sql(f"CREATE TABLE docs (id int PRIMARY KEY, body text{extra})")
    app, ext = listening(wal_app, "docs")
    wal_sql(
        "INSERT INTO docs (id, body) VALUES (1, 'before'), (2, repeat('x', %s)), "
        "(3, repeat(E'\\n', %s)), (4, 'after')",
        (MAX_ROW_BYTES + 1000, MAX_ROW_BYTES - 1000),
    )
    wal_sql("UPDATE docs SET id = 20, body = body || 'y' WHERE id = 2")
    wal_sql("DELETE FROM docs WHERE id IN (3, 20)")
    got = events.wait_for(7)
    events.assert_no_more(7, marker(ext, app))
    tags = {"tags": None} if extra else {}
    nothing: frozenset[str] = frozenset()
    assert [(e.op.value, e.pk, e.new, e.old, e.changed, e.cut) for e in got] == [
        ("INSERT", 1, {"id": 1, "body": "before", **tags}, None, nothing, False),
        ("INSERT", 2, {"id": 2}, None, nothing, True),
        ("INSERT", 3, {"id": 3}, None, nothing, True),
        ("INSERT", 4, {"id": 4, "body": "after", **tags}, None, nothing, False),
        ("UPDATE", 20, {"id": 20}, {"id": 2}, nothing, True),
        ("DELETE", 3, None, {"id": 3}, nothing, True),
        ("DELETE", 20, None, {"id": 20}, nothing, True),
    ]


def test_roles_without_replication_are_told_what_to_grant(
    logical_url: str,
    wal_roles: Callable[[str], Role],
    wal_app: MakeApp,
    wal_sql: SQL,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An installer without the REPLICATION attribute is stopped before
    anything is made, told what to run; an app whose role lacks it cannot
    lead, and its log says why. A role that has it installs and leads."""
    role = wal_roles("norepl")
    wal_sql(f'GRANT CREATE ON DATABASE "{make_url(logical_url).database}" TO {role.name}')
    wal_sql(f"GRANT CREATE ON SCHEMA public TO {role.name}")
    wal_sql(ORDERS)
    wal_sql(f"ALTER TABLE orders OWNER TO {role.name}")
    app, ext = wal_app(DBNOTIFY_DATABASE_URI=role.url)
    ext.watch("orders")
    with pytest.raises(DBNotifyError, match=f'ALTER ROLE "{role.name}" REPLICATION'):
        ext.install_triggers(app)
    assert wal_sql("SELECT count(*) FROM pg_publication") == [(0,)]
    assert wal_sql("SELECT to_regclass('dbnotify_journal')") == [(None,)]

    # Installed by a role that may: the app's own role still cannot lead.
    admin, admin_ext = wal_app()
    admin_ext.watch("orders")
    admin_ext.install_triggers(admin)
    wal_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role.name}")
    leader._limited.reset()
    with caplog.at_level(logging.WARNING, "flask_dbnotify"):
        ext.start(app)
        poll_until(
            lambda: "needs the REPLICATION attribute" in caplog.text,
            "the leader's log to say what the app's role lacks",
        )
    ext.close(app)  # before its role is dropped


def test_no_free_slot_is_refused_before_anything_is_made(
    logical_url: str, wal_app: MakeApp, wal_sql: SQL
) -> None:
    """Every slot the server allows is taken: install says so, and what to
    do, before it makes anything."""
    wal_sql(ORDERS)
    database = make_url(logical_url).database
    ((most, used),) = wal_sql(
        "SELECT current_setting('max_replication_slots')::int, count(*) FROM pg_replication_slots"
    )
    for n in range(most - used):
        # Slots of this database: dropped with it after the test.
        wal_sql(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"fill_{database}_{n}",)
        )
    app, ext = wal_app()
    ext.watch("orders")
    with pytest.raises(DBNotifyError, match=r"all \d+ the server allows \(max_replication_slots\)"):
        ext.install_triggers(app)
    assert wal_sql("SELECT count(*) FROM pg_publication") == [(0,)]
