"""Durable delivery: ``watch(..., durable=True)`` and ``notify(..., durable=True)``.

On PostgreSQL every change of a durable watch is a row of ``dbnotify_journal``
written in the writer's transaction, and the NOTIFY only names a range of
journal ids; a listener that reconnects (or restarts in the same process)
replays what it missed, each row exactly once. SQLite journals every watch.

The PostgreSQL tests run on a server of this module's own: replay waits for
every transaction of the *cluster* older than the rows to end, so other test
runs' open transactions must not hold it back (nor ours theirs).
Timings are printed (``-s``), never asserted.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import make_url

from flask_dbnotify import ChangeEvent, DBNotify, events_dropped, listener_connected
from flask_dbnotify.backends.postgresql.common import LISTENER_NAME, READER_NAME
from flask_dbnotify.backends.postgresql.connection import Reader

from ._helpers import (
    SQL,
    WAIT,
    Lifecycle,
    Lines,
    Proxy,
    Recorder,
    captured_notifications,
    poll_until,
    wait_for_backends,
    wait_for_state,
)
from ._postgres import ThrowawayServer

MakeApp = Callable[..., tuple[Flask, DBNotify]]
ROOT = Path(__file__).resolve().parent.parent
ORDERS = "CREATE TABLE {} (id int PRIMARY KEY, note text)"
#: Long enough for a replay that waits for the 5 s idle catch-up.
LONG = 3 * WAIT


# -- fixtures and helpers --------------------------------------------------------


_databases = itertools.count()


@pytest.fixture()
def pg_url(private_server: ThrowawayServer) -> Iterator[str]:
    """A fresh database on this module's server (``sql`` and ``make_app``
    from conftest.py use it)."""
    name = f"durable_{next(_databases)}"
    admin = SQL(private_server.url)
    admin(f'CREATE DATABASE "{name}"')
    admin.close()
    yield make_url(private_server.url).set(database=name).render_as_string(hide_password=False)
    admin = SQL(private_server.url)
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def durable_app(
    make_app: MakeApp, sql: SQL, *tables: str, fast: tuple[str, ...] = (), **config: Any
) -> tuple[Flask, DBNotify]:
    """An app watching ``tables`` durably and ``fast`` ones not, triggers
    installed, not started."""
    app, ext = make_app(DBNOTIFY_RECONNECT_MAX_DELAY=0.5, **config)
    for table in tables:
        sql(ORDERS.format(table))
        ext.watch(table, durable=True)
    for table in fast:
        sql(ORDERS.format(table))
        ext.watch(table)
    ext.install_triggers(app)
    return app, ext


@contextlib.contextmanager
def dispatcher_held(app: Flask) -> Iterator[threading.Event]:
    """Hold the dispatcher's journal reads (its catch-up and the rows
    notifications name) until the event yielded is set, or LONG has
    passed, as a slow connection would; this reaches into the reader that
    the feed reads with."""
    gate = threading.Event()
    run = Reader.run

    def slow_run(self: Reader, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name.startswith("dbnotify-dispatch"):
            gate.wait(LONG)
        return run(self, *args, **kwargs)

    Reader.run = slow_run  # type: ignore[method-assign]
    try:
        yield gate
    finally:
        gate.set()
        Reader.run = run  # type: ignore[method-assign]


def proxied_listen_uri(pg_url: str, proxy: Proxy) -> str:
    listen = make_url(pg_url).set(host="127.0.0.1", port=proxy.port)
    return listen.render_as_string(hide_password=False)


def rows(items: list[Any], table: str | None = None) -> list[ChangeEvent]:
    return [i for i in items if isinstance(i, ChangeEvent) and (table is None or i.table == table)]


def key(event: ChangeEvent) -> tuple[Any, ...]:
    """What a receiver reads from an event, the journal id and time aside."""
    return (event.op.value, event.pk, event.new, event.old, sorted(event.changed))


def settle(events: Recorder, ext: DBNotify, app: Flask) -> list[Any]:
    """Send a marker message and wait for it; return everything delivered
    before it (anything in flight when it was sent arrives before it)."""
    token = f"marker-{time.monotonic_ns()}"
    ext.notify("marker", token, app=app)
    deadline = time.monotonic() + LONG
    while token not in events.items:
        if time.monotonic() > deadline:
            raise AssertionError(f"the marker did not arrive within {LONG}s")
        events.wait_for(len(events.items) + 1, "the marker", timeout=LONG)
    items = list(events.items)
    return items[: items.index(token)]


def wait_for_pks(events: Recorder, table: str, expected: set[Any], timeout: float = LONG) -> None:
    """Wait (bounded) until every pk in ``expected`` has arrived for ``table``."""
    deadline = time.monotonic() + timeout
    while True:
        missing = expected - {e.pk for e in rows(list(events.items), table)}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(missing)} of {len(expected)} rows of {table!r} never arrived within "
                f"{timeout}s, e.g. {sorted(missing)[:10]}"
            )
        time.sleep(0.02)


def assert_exactly_once(events: list[ChangeEvent], expected: list[Any]) -> None:
    counts = Counter(e.pk for e in events)
    twice = {pk: n for pk, n in counts.items() if n > 1}
    missing = sorted(set(expected) - set(counts))
    unexpected = sorted(set(counts) - set(expected), key=repr)
    assert not twice, (
        f"{len(twice)} rows delivered more than once: {dict(list(twice.items())[:10])}"
    )
    assert not missing, f"{len(missing)} rows never delivered: {missing[:10]}"
    assert not unexpected, f"rows delivered that were not expected: {unexpected[:10]}"


def kill_listener(sql: SQL) -> int:
    ((pid, _, _),) = wait_for_backends(sql, 1, "before killing the listener")
    assert sql("SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
    return pid


def db_now(sql: SQL) -> datetime:
    value: datetime = sql("SELECT clock_timestamp()")[0][0]
    return value


def journal_ids(sql: SQL) -> list[int]:
    return [i for (i,) in sql("SELECT id FROM public.dbnotify_journal ORDER BY id")]


# -- what a durable event carries --------------------------------------------------

ITEMS = (
    "CREATE TABLE {} (id int PRIMARY KEY, name text, qty int, price numeric(10, 2), "
    "tags jsonb, seen timestamptz, ok boolean)"
)
STATEMENTS = [
    "INSERT INTO {} VALUES (1, 'a', 1, 1.50, '{{\"k\": [1, 2]}}', '2024-01-02 03:04:05+00', "
    "true), (2, 'b', 2, NULL, NULL, NULL, NULL), "
    "(3, 'c', 3, 3.00, '[]', '2024-05-06 07:08:09+02', false)",
    "UPDATE {} SET qty = qty + 10, name = upper(name) WHERE id <= 2",
    "UPDATE {} SET name = name",
    "UPDATE {} SET name = 'only the name' WHERE id = 3",
    "DELETE FROM {} WHERE id IN (1, 3)",
]


@pytest.mark.parametrize(
    "options",
    [{}, {"columns": ["id", "qty", "name"], "when_changed": ["qty"]}],
    ids=["every-column", "columns-and-when_changed"],
)
def test_durable_events_carry_journal_ids_and_what_fast_events_carry(
    make_app: MakeApp, sql: SQL, events: Recorder, options: dict[str, Any]
) -> None:
    """The same statements on a fast and a durable table give events with
    the same op, pk, new, old and changed, in the same order, and database
    timestamps; durable events carry event.id, the int id of their journal
    row, increasing in row order; fast events carry None."""
    app, ext = make_app()
    for table in ("fast_items", "durable_items"):
        sql(ITEMS.format(table))
    ext.watch("fast_items", **options)
    ext.watch("durable_items", durable=True, **options)
    ext.install_triggers(app)
    ext.start(app)
    before = db_now(sql)
    for statement in STATEMENTS:
        sql(statement.format("fast_items"))
        sql(statement.format("durable_items"))
    after = db_now(sql)
    expected = 8 if not options else 7  # when_changed=qty drops the name-only UPDATE
    events.wait_for(2 * expected)
    got = settle(events, ext, app)
    fast, durable = rows(got, "fast_items"), rows(got, "durable_items")
    assert len(fast) == len(durable) == expected, (fast, durable)

    assert [key(e) for e in durable] == [key(e) for e in fast]
    assert [e.op.value for e in durable][:3] == ["INSERT"] * 3
    assert [e.pk for e in durable][:3] == [1, 2, 3]
    assert all(e.id is None for e in fast), [e.id for e in fast]
    ids = [e.id for e in durable]
    assert all(type(i) is int for i in ids), ids
    assert ids == sorted({i for i in ids if i is not None}), (
        f"journal ids not increasing in row order: {ids}"
    )
    assert ids == journal_ids(sql), "event.id is not the id of the event's journal row"
    slack = timedelta(milliseconds=5)
    for event in fast + durable:
        assert event.timestamp is not None and event.timestamp.tzinfo is not None
        assert before - slack <= event.timestamp <= after + slack, (event, before, after)


def test_a_journal_that_cannot_be_read_is_reported_as_such(
    make_app: MakeApp, sql: SQL, events: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A notification naming journal rows the listener cannot read (here the
    journal was renamed away) is skipped with a warning that says the
    journal could not be read, not that the notification was malformed;
    events after it arrive."""
    from flask_dbnotify.backends.postgresql import journal

    journal.skipped.reset()  # rate-limited for the whole process
    caplog.set_level(logging.WARNING, logger="flask_dbnotify")
    app, ext = durable_app(make_app, sql, "orders", fast=("items",))
    ext.start(app)
    sql("ALTER TABLE dbnotify_journal RENAME TO dbnotify_journal_away")
    sql(
        'SELECT pg_notify(\'dbnotify\', \'{"v": 1, "J": [1, 1], "x": \' '
        "|| pg_current_xact_id() || '}')"
    )
    sql("INSERT INTO items VALUES (1, 'after')")
    (event,) = events.wait_for(1, "the fast event after the unreadable reference")
    assert (event.table, event.pk) == ("items", 1)
    said = [r.getMessage() for r in caplog.records if "skipped a notification" in r.getMessage()]
    assert len(said) == 1, said
    assert "cannot read the journal" in said[0] and "dbnotify_journal" in said[0], said
    assert "malformed" not in said[0], said


def test_durable_notification_names_a_range_so_big_writes_arrive_whole(
    make_app: MakeApp, sql: SQL, pg_url: str, events: Recorder
) -> None:
    """A durable statement sends one tiny NOTIFY, a journal id range, however
    big its rows: a 100 kB row and a 20,000-row INSERT arrive whole, in row
    order, with the ids of that range."""
    app, ext = durable_app(make_app, sql, "orders")
    ext.start(app)
    big = "x" * 100_000
    n = 20_000
    t0 = time.monotonic()
    payloads = captured_notifications(
        pg_url,
        lambda: (
            sql("INSERT INTO orders VALUES (0, %s)", (big,)),
            sql("INSERT INTO orders SELECT g, 'row ' || g FROM generate_series(1, %s) g", (n,)),
        ),
        LONG,
    )
    got = rows(events.wait_for(n + 1, timeout=LONG))
    took = time.monotonic() - t0
    print(f"\n100 kB row + {n}-row statement delivered in {took:.3f}s; payloads {payloads}")
    assert len(payloads) == 2, payloads
    ranges = []
    for text in payloads:
        assert len(text.encode()) < 100, f"a durable NOTIFY payload is not tiny: {text[:200]}"
        msg = json.loads(text)
        assert set(msg) == {"v", "J", "x"} and msg["v"] == 1, msg
        ranges.append(msg["J"])
    assert got[0].pk == 0 and got[0].new == {"id": 0, "note": big}
    assert [e.id for e in got[:1]] == [ranges[0][0]] and ranges[0][0] == ranges[0][1]
    lo, hi = ranges[1]
    assert [e.pk for e in got[1:]] == list(range(1, n + 1))
    assert [e.id for e in got[1:]] == list(range(lo, hi + 1))
    assert [e.new for e in got[1:4]] == [{"id": i, "note": f"row {i}"} for i in (1, 2, 3)]
    assert settle(events, ext, app)[n + 1 :] == []


# -- nothing lost across reconnects -------------------------------------------------


class Writer:
    """A writer thread with its own connection, committing transactions of
    ``per_tx`` rows (in two statements) back to back until stopped, or
    until ``limit`` rows; ``count`` is how many rows are committed."""

    def __init__(self, url: str, table: str, per_tx: int = 5, limit: int = 20_000) -> None:
        self.url, self.table, self.per_tx, self.limit = url, table, per_tx, limit
        self.count = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        statement = f"INSERT INTO {self.table} SELECT g, 'w' FROM generate_series(%s, %s) g"
        try:
            conn = psycopg2.connect(self.url)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.errors.append(exc)
            return
        try:
            n = 0
            while not self._stop.is_set() and n < self.limit:
                with conn.cursor() as cur:
                    cur.execute(statement, (n + 1, n + 2))
                    cur.execute(statement, (n + 3, n + self.per_tx))
                conn.commit()
                n += self.per_tx
                self.count = n
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.errors.append(exc)
        finally:
            conn.close()

    def wait_for_count(self, count: int) -> None:
        deadline = time.monotonic() + WAIT
        while self.count < count and not self.errors and self.thread.is_alive():
            if time.monotonic() > deadline:
                raise AssertionError(f"the writer committed {self.count} rows, not {count}")
            time.sleep(0.001)
        assert not self.errors, self.errors
        assert self.count >= count, f"the writer stopped at {self.count} rows, before {count}"

    def stop(self) -> list[int]:
        """Stop writing; return the pks committed."""
        self._stop.set()
        self.thread.join(LONG)
        assert not self.thread.is_alive(), "the writer did not stop"
        assert not self.errors, self.errors
        return list(range(1, self.count + 1))


def kill_while_writing(
    sql: SQL, life: Lifecycle, writer: Writer, kills: int, every: int, connected: int = 1
) -> None:
    """Kill the listener's session ``kills`` times while ``writer`` commits:
    each time after ``every`` more rows, and wait for the reconnect (the
    writer goes on meanwhile, so commits straddle each reconnect).
    ``connected``: how many listener_connected signals come before."""
    life.wait_for_name("connected", connected)
    for k in range(kills):
        writer.wait_for_count(writer.count + every)
        kill_listener(sql)
        life.wait_for_name("connected", connected + k + 1)
    writer.wait_for_count(writer.count + every)


def reader_sessions(sql: SQL) -> list[int]:
    """Backend pids of the sessions listeners read the journal with."""
    return [
        pid
        for (pid,) in sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = %s",
            (READER_NAME,),
        )
    ]


def test_journal_reads_go_on_when_their_session_is_killed(
    make_app: MakeApp, sql: SQL, events: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener reads the rows durable notifications name over one
    connection of its own. When that session is killed (as by a server
    restart), the next read runs again on a new one: the next row is
    delivered, once, and nothing is reported as unreadable."""
    app, ext = durable_app(make_app, sql, "orders")
    ext.start(app)
    sql("INSERT INTO orders VALUES (1, 'read on the first session')")
    events.wait_for(1)
    (first,) = poll_until(lambda: reader_sessions(sql), "the listener's journal reader")
    sql("SELECT pg_terminate_backend(%s)", (first,))
    poll_until(lambda: not reader_sessions(sql), "the killed reader gone")
    with caplog.at_level(logging.WARNING, logger="flask_dbnotify"):
        sql("INSERT INTO orders VALUES (2, 'read on a new session')")
        got = rows(settle(events, ext, app))
    assert [e.pk for e in got] == [1, 2]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert reader_sessions(sql) not in ([], [first])


def test_an_idle_listener_closes_its_journal_reader(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """An idle process holds one connection, its listener's: the one it
    reads the journal with is closed after DBNOTIFY_PROBE_INTERVAL
    seconds without a read, and opened again for the next."""
    app, ext = durable_app(make_app, sql, "orders", DBNOTIFY_PROBE_INTERVAL=0.5)
    ext.start(app)
    sql("INSERT INTO orders VALUES (1, 'first')")
    events.wait_for(1)

    def only_the_listeners() -> bool:
        names = sql(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        return names == [(LISTENER_NAME,)]

    poll_until(only_the_listeners, "one session, the listener's, once idle")
    sql("INSERT INTO orders VALUES (2, 'second')")
    events.wait_for(2)
    assert [e.pk for e in rows(events.items)] == [1, 2]


def test_an_app_does_not_read_the_journal_of_an_app_in_another_schema(
    make_app: MakeApp, sql: SQL, pg_url: str, events: Recorder
) -> None:
    """Two apps on one database, their objects in two schemas: both hear
    every notification on the channel, but durable messages name their
    journal's schema, so the app in ``public`` never opens a session to
    read the other's (its only session is its listener's), and the other
    app receives all of its own."""
    sql("CREATE SCHEMA elsewhere")
    url = make_url(pg_url).update_query_dict({"application_name": "bystander"})
    bystander, bystander_ext = make_app(
        DBNOTIFY_DATABASE_URI=url.render_as_string(hide_password=False)
    )
    other, other_ext = make_app(DBNOTIFY_SCHEMA="elsewhere")
    bystander_ext.install_triggers(bystander)
    other_ext.install_triggers(other)
    bystander_ext.start(bystander)
    other_ext.start(other)
    for n in range(20):
        other_ext.notify("news", n, durable=True, app=other)
    # A message that is not journaled reaches both apps, each after what
    # its listener heard before it.
    other_ext.notify("news", "marker", app=other)
    events.wait_for(22)
    assert [m for m in events.items if m != "marker"] == list(range(20))
    assert events.items.count("marker") == 2
    names = sql(
        "SELECT application_name FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'bystander'"
    )
    assert names == [("bystander",)], "the bystander read a journal not its own"


@pytest.mark.parametrize("with_fast_watch", [False, True], ids=["all-durable", "also-fast"])
def test_killed_listener_session_loses_and_repeats_nothing(
    make_app: MakeApp, sql: SQL, pg_url: str, events: Recorder, with_fast_watch: bool
) -> None:
    """A writer commits rows back to back, 5 per transaction (at least
    1,000), while the listener's session is killed four times: every row
    arrives exactly once. listener_connected(reconnect=True) says gap=False
    when every watch is durable, gap=True when the app also has a fast
    watch."""
    fast = ("notes",) if with_fast_watch else ()
    app, ext = durable_app(make_app, sql, "orders", fast=fast)
    t0 = time.monotonic()
    with Lifecycle().connected() as life:
        ext.start(app)
        writer = Writer(pg_url, "orders")
        try:
            kill_while_writing(sql, life, writer, kills=4, every=200)
        finally:
            expected = writer.stop()
        wait_for_pks(events, "orders", set(expected))
        got = rows(settle(events, ext, app), "orders")
    print(f"\n{len(expected)} rows, 4 kills: all delivered after {time.monotonic() - t0:.3f}s")
    assert len(expected) >= 1000
    assert_exactly_once(got, expected)
    connected = [kwargs for name, kwargs in life.names() if name == "connected"]
    assert connected[0] == {"reconnect": False, "gap": False}
    assert connected[1:] == [{"reconnect": True, "gap": with_fast_watch}] * 4


def test_replay_skips_rows_whose_notifications_are_still_queued(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """The dispatcher is busy (a receiver runs) while the listener reconnects
    and a row commits after the new LISTEN: its notification waits in the
    queue behind listener_connected. The replay before listener_connected
    and that notification must not both deliver the row."""
    app, ext = durable_app(make_app, sql, "orders")
    release = threading.Event()
    entered = threading.Event()

    @ext.on("orders")
    def slow(event: ChangeEvent) -> None:
        if event.pk == 1:
            entered.set()
            release.wait(LONG)

    try:
        with Lifecycle().connected() as life:
            ext.start(app)
            sql("INSERT INTO orders VALUES (1, 'holds the dispatcher')")
            assert entered.wait(WAIT), "the receiver did not start"
            kill_listener(sql)
            wait_for_state(
                ext, app, lambda s: s.reconnects == 1 and s.connected, "the listener reconnected"
            )
            sql("INSERT INTO orders VALUES (2, 'after the reconnect')")
            wait_for_state(ext, app, lambda s: s.received == 2, "row 2's notification read")
            release.set()
            life.wait_for_name("connected", 2)
            events.wait_for(2)
            got = settle(events, ext, app)
    finally:
        release.set()
    assert [e.pk for e in rows(got)] == [1, 2]


def test_row_committed_right_after_start_is_replayed_when_the_link_dies_at_once(
    make_app: MakeApp, sql: SQL, pg_url: str, proxy: Proxy, events: Recorder
) -> None:
    """start() returns once no later commit can be missed. Here the
    dispatcher is slow to read the journal (as over a slow link) and the
    listener's link goes dead right after start() returns: a row committed
    then is replayed after the reconnect."""
    app, ext = durable_app(
        make_app,
        sql,
        "orders",
        DBNOTIFY_LISTEN_URI=proxied_listen_uri(pg_url, proxy),
        DBNOTIFY_PROBE_INTERVAL=0.5,
        DBNOTIFY_CONNECT_TIMEOUT=1,
        DBNOTIFY_CHECK_TRIGGERS=False,
    )
    with dispatcher_held(app) as gate:
        with Lifecycle().connected() as life:
            ext.start(app)
            proxy.black_hole()
            sql("INSERT INTO orders VALUES (1, 'committed right after start')")
            wait_for_state(ext, app, lambda s: s.last_error is not None, "the dead link noticed")
            proxy.forward()
            wait_for_state(
                ext, app, lambda s: s.reconnects == 1 and s.connected, "the listener reconnected"
            )
            gate.set()
            _, again, _ = life.wait_for_name("connected", 2)
            got = settle(events, ext, app)
    assert again == {"reconnect": True, "gap": False}
    assert [e.pk for e in rows(got)] == [1], "the row committed after start() returned was lost"


def test_rows_committed_into_a_half_open_link_are_replayed(
    make_app: MakeApp, sql: SQL, pg_url: str, proxy: Proxy, events: Recorder
) -> None:
    """The listener's link goes silent (writes go straight to the server):
    rows committed while it is dead, before and after the listener notices,
    arrive after the reconnect, exactly once, each transaction's events
    together and in statement and row order; gap=False."""
    app, ext = durable_app(
        make_app,
        sql,
        "orders",
        DBNOTIFY_LISTEN_URI=proxied_listen_uri(pg_url, proxy),
        DBNOTIFY_PROBE_INTERVAL=0.5,
        DBNOTIFY_CONNECT_TIMEOUT=1,
    )

    def transaction(t: int) -> list[tuple[str, int]]:
        a, b, c = 3 * t + 1, 3 * t + 2, 3 * t + 3
        sql(
            "BEGIN; INSERT INTO orders VALUES (%s, 'a'), (%s, 'b'), (%s, 'c'); "
            "UPDATE orders SET note = 'u' WHERE id = %s; DELETE FROM orders WHERE id = %s; COMMIT",
            (a, b, c, a, b),
        )
        return [("INSERT", a), ("INSERT", b), ("INSERT", c), ("UPDATE", a), ("DELETE", b)]

    with Lifecycle().connected() as life:
        ext.start(app)
        sql("INSERT INTO orders VALUES (0, 'relayed')")
        events.wait_for(1)
        t_hole = time.monotonic()
        proxy.black_hole()
        expected = [transaction(t) for t in range(10)]
        life.wait_for_name("disconnected")
        t_lost = time.monotonic()
        expected += [transaction(t) for t in range(10, 20)]
        proxy.forward()
        _, again, t_again = life.wait_for_name("connected", 2)
        wait_for_pks(events, "orders", {pk for tx in expected for _, pk in tx})
        t_all = time.monotonic()
        got = rows(settle(events, ext, app), "orders")
    print(
        f"\nhalf-open link: noticed after {t_lost - t_hole:.3f}s, reconnected "
        f"{t_again - t_lost:.3f}s later, all replayed {t_all - t_again:.3f}s after that"
    )
    assert again == {"reconnect": True, "gap": False}
    assert got[0].pk == 0
    seen = [(e.op.value, e.pk) for e in got[1:]]
    assert len(seen) == len(set(seen)) == 5 * len(expected), (
        f"expected each of {5 * len(expected)} events once, got {len(seen)} events, "
        f"{len(seen) - len(set(seen))} repeated: {[k for k, n in Counter(seen).items() if n > 1]}"
    )
    for tx in expected:
        start = seen.index(tx[0])
        assert seen[start : start + 5] == tx, (
            f"transaction {tx} arrived as {seen[start : start + 5]}"
        )


def test_changes_committed_while_stopped_arrive_after_start(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """stop(), writes and a durable notify(), start() in the same process:
    they arrive after start(), in order, once; no gap is reported."""
    app, ext = durable_app(make_app, sql, "orders")
    connected = Recorder()
    with listener_connected.connected_to(connected):
        ext.start(app)
        sql("INSERT INTO orders VALUES (1, 'running')")
        events.wait_for(1)
        ext.stop(app)
        sql("INSERT INTO orders VALUES (2, 'stopped')")
        sql("UPDATE orders SET note = 'changed while stopped' WHERE id = 1")
        ext.notify("cache", "while stopped", durable=True, app=app)
        sql("DELETE FROM orders WHERE id = 2")
        ext.start(app)
        events.wait_for(5, timeout=LONG)
        got = settle(events, ext, app)
        kinds = connected.wait_for(2, "listener_connected")
    assert [(e.op.value, e.pk) if isinstance(e, ChangeEvent) else e for e in got] == [
        ("INSERT", 1),
        ("INSERT", 2),
        ("UPDATE", 1),
        "while stopped",
        ("DELETE", 2),
    ]
    assert [k["gap"] for k in kinds] == [False, False]


# -- a brand-new process starts from now -----------------------------------------------


def read_until(lines: Lines, last: dict[str, Any]) -> list[dict[str, Any]]:
    """Lines of the child up to and including the first one holding ``last``."""
    got: list[dict[str, Any]] = []
    while True:
        obj = json.loads(lines.readline(f"a line with {last}", timeout=LONG))
        got.append(obj)
        if last.items() <= obj.items():
            return got


def replay_in_child(sql: SQL, lines: Lines) -> list[dict[str, Any]]:
    """Kill the child's listener session; return its lines up to its
    listener_connected(reconnect=True), which it sends after the replay."""
    kill_listener(sql)
    return read_until(lines, {"connected": True})


def summary(got: list[dict[str, Any]]) -> list[Any]:
    """Row pks, message payloads and listener_connected(reconnect=True)
    lines (the first connection's line may come before or after "ready")."""
    return [
        g["pk"] if "pk" in g else g.get("payload", g)
        for g in got
        if g not in ({"ready": True}, {"connected": False, "gap": False})
    ]


def test_new_process_gets_nothing_from_before_its_first_start_postgresql(
    make_app: MakeApp,
    sql: SQL,
    pg_url: str,
    spawn: Callable[..., tuple[subprocess.Popen[bytes], Lines]],
) -> None:
    """Rows and a durable message committed before a new process first
    starts are not delivered there, even by the replay after its listener
    reconnects; what is committed after start() is, once."""
    app, ext = durable_app(make_app, sql, "orders")
    sql("INSERT INTO orders VALUES (1, 'before')")
    ext.notify("cache", "before", durable=True, app=app)
    proc, lines = spawn(
        "-m", "tests.apps.durable_listen_app", pg_url, "orders", name="the new process"
    )
    read_until(lines, {"ready": True})
    sql("INSERT INTO orders VALUES (2, 'after')")
    ext.notify("cache", "after", durable=True, app=app)
    got = read_until(lines, {"payload": "after"})
    got += replay_in_child(sql, lines)
    sql("INSERT INTO orders VALUES (3, 'marker')")
    got += read_until(lines, {"pk": 3})
    assert summary(got) == [2, "after", {"connected": True, "gap": False}, 3], got


def test_new_process_gets_nothing_from_before_its_first_start_sqlite(
    sqlite_app: MakeApp,
    sqlite_path: str,
    spawn: Callable[..., tuple[subprocess.Popen[bytes], Lines]],
) -> None:
    """SQLite: the same, for a new process on the same database file."""
    path = sqlite_path
    app, ext = sqlite_app()
    db = sqlite3.connect(path, timeout=WAIT, isolation_level=None)
    try:
        db.execute(ORDERS.format("orders"))
        ext.watch("orders", durable=True)
        ext.install_triggers(app)
        db.execute("INSERT INTO orders VALUES (1, 'before')")
        ext.notify("cache", "before", durable=True, app=app)
        proc, lines = spawn(
            "-m",
            "tests.apps.durable_listen_app",
            "sqlite:///" + path,
            "orders",
            name="the new process",
        )
        read_until(lines, {"ready": True})
        db.execute("INSERT INTO orders VALUES (2, 'after')")
        ext.notify("cache", "after", durable=True, app=app)
        db.execute("INSERT INTO orders VALUES (3, 'marker')")
        got = read_until(lines, {"pk": 3})
    finally:
        db.close()
        ext.close(app)
    assert summary(got) == [2, "after", 3], got


def test_new_process_skips_rows_committed_before_start_behind_an_open_transaction(
    make_app: MakeApp,
    sql: SQL,
    pg_url: str,
    spawn: Callable[..., tuple[subprocess.Popen[bytes], Lines]],
) -> None:
    """A transaction that began before a new process starts is still open
    when a younger one commits a row; then the process starts. That row was
    committed before its first start: it is not delivered, not even by the
    replay after its listener reconnects. The open transaction's own row,
    committed after start(), arrives once."""
    durable_app(make_app, sql, "orders")
    older = psycopg2.connect(pg_url)
    try:
        with older.cursor() as cur:
            cur.execute("INSERT INTO orders VALUES (100, 'older transaction')")
        sql("INSERT INTO orders VALUES (1, 'committed before start')")
        proc, lines = spawn(
            "-m", "tests.apps.durable_listen_app", pg_url, "orders", name="the new process"
        )
        read_until(lines, {"ready": True})
        sql("INSERT INTO orders VALUES (2, 'after start')")
        got = read_until(lines, {"pk": 2})
        older.commit()
        got += read_until(lines, {"pk": 100})
    finally:
        older.close()
    got += replay_in_child(sql, lines)
    sql("INSERT INTO orders VALUES (3, 'marker')")
    got += read_until(lines, {"pk": 3})
    assert summary(got) == [2, 100, {"connected": True, "gap": False}, 3], got


# -- rollbacks and messages ---------------------------------------------------------------


def test_rolled_back_durable_writes_deliver_nothing(
    make_app: MakeApp, sql: SQL, pg_url: str, events: Recorder
) -> None:
    """A rolled-back transaction (rows and a durable notify on its
    connection) and a rolled-back savepoint deliver nothing, not even from
    the replay after a reconnect, and leave no journal rows visible; the
    committed rest of the savepoint's transaction arrives."""
    app, ext = durable_app(make_app, sql, "orders")
    sql("INSERT INTO orders VALUES (50, 'kept')")
    with Lifecycle().connected() as life:
        ext.start(app)
        conn = psycopg2.connect(pg_url)
        try:
            with conn.cursor() as cur:
                cur.execute("INSERT INTO orders VALUES (1, 'x'), (2, 'y')")
                cur.execute("UPDATE orders SET note = 'z'")
                cur.execute("DELETE FROM orders WHERE id = 50")
            ext.notify("cache", "rolled back", durable=True, connection=conn, app=app)
            conn.rollback()
            with conn.cursor() as cur:
                cur.execute("INSERT INTO orders VALUES (10, 'outer')")
                cur.execute("SAVEPOINT s")
                cur.execute("INSERT INTO orders VALUES (11, 'inner')")
                cur.execute("UPDATE orders SET note = 'inner' WHERE id = 10")
                cur.execute("ROLLBACK TO SAVEPOINT s")
                cur.execute("INSERT INTO orders VALUES (12, 'after the savepoint')")
            conn.commit()
        finally:
            conn.close()
        events.wait_for(2)
        kill_listener(sql)
        life.wait_for_name("connected", 2)
        got = settle(events, ext, app)
    assert [(e.op.value, e.pk) for e in rows(got)] == [("INSERT", 10), ("INSERT", 12)]
    assert got == rows(got), f"a rolled-back message arrived: {got}"
    # Rows 50 (before start), 10 and 12.
    assert len(journal_ids(sql)) == 3, "rolled-back journal rows are visible"


def test_durable_notify_is_delivered_live(make_app: MakeApp, sql: SQL, events: Recorder) -> None:
    """notify(durable=True) arrives at once, any JSON value of any size,
    in the order sent, each once."""
    app, ext = durable_app(make_app, sql, "orders")
    ext.start(app)
    big = {"blob": "y" * 20_000, "n": [1, 2.5, None, True]}
    ext.notify("cache", {"key": "menu"}, durable=True, app=app)
    ext.notify("cache", big, durable=True, app=app)
    ext.notify("cache", {"key": "menu"}, durable=True, app=app)
    assert events.wait_for(3) == [{"key": "menu"}, big, {"key": "menu"}]
    assert settle(events, ext, app) == [{"key": "menu"}, big, {"key": "menu"}]


def test_durable_notify_sent_while_disconnected_arrives_after_reconnect(
    make_app: MakeApp, sql: SQL, pg_url: str, proxy: Proxy, events: Recorder
) -> None:
    """A durable message sent while the listener's link is dead (the app
    has a durable watch) arrives once after the reconnect."""
    app, ext = durable_app(
        make_app,
        sql,
        "orders",
        DBNOTIFY_LISTEN_URI=proxied_listen_uri(pg_url, proxy),
        DBNOTIFY_PROBE_INTERVAL=0.5,
        DBNOTIFY_CONNECT_TIMEOUT=1,
    )
    with Lifecycle().connected() as life:
        ext.start(app)
        ext.notify("cache", "live", durable=True, app=app)
        events.wait_for(1)
        proxy.black_hole()
        life.wait_for_name("disconnected")
        ext.notify("cache", "while down", durable=True, app=app)
        proxy.forward()
        _, again, _ = life.wait_for_name("connected", 2)
        events.wait_for(2, timeout=LONG)
        got = settle(events, ext, app)
    assert again == {"reconnect": True, "gap": False}
    assert got == ["live", "while down"]


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_durable_notify_on_a_connection_is_sent_at_commit_only(
    make_app: MakeApp, sql: SQL, pg_url: str, events: Recorder, outcome: str
) -> None:
    """notify(durable=True, connection=conn): nothing while the transaction
    is open (a marker sent meanwhile arrives alone); at commit it arrives
    once; after a rollback never, not even after a reconnect."""
    app, ext = durable_app(make_app, sql, "orders")
    engine = sa.create_engine(make_url(pg_url).set(drivername="postgresql+psycopg2"))
    try:
        with Lifecycle().connected() as life:
            ext.start(app)
            with engine.connect() as conn:
                conn.begin()
                ext.notify("cache", "in the transaction", durable=True, connection=conn, app=app)
                assert settle(events, ext, app) == [], "sent before its transaction ended"
                if outcome == "commit":
                    conn.commit()
                else:
                    conn.rollback()
            if outcome == "commit":
                events.wait_for(2)
            kill_listener(sql)
            life.wait_for_name("connected", 2)
            got = settle(events, ext, app)
    finally:
        engine.dispose()
    marker_count = sum(1 for item in got if isinstance(item, str) and item.startswith("marker-"))
    delivered = [item for item in got if not (isinstance(item, str) and item.startswith("marker-"))]
    assert marker_count == 1
    assert delivered == (["in the transaction"] if outcome == "commit" else [])


# -- an open transaction holding back the snapshot ------------------------------------------


def test_open_transaction_holding_back_the_snapshot_causes_no_duplicate(
    make_app: MakeApp, sql: SQL, pg_url: str, events: Recorder
) -> None:
    """A third session keeps a transaction with a durable write open (it
    holds back every snapshot's xmin) while a writer commits rows and the
    listener is killed three times; then it commits, and the listener is
    killed once more (a replay past it). Every row arrives exactly once, and
    the open transaction's row only after its commit."""
    app, ext = durable_app(make_app, sql, "orders")
    older = psycopg2.connect(pg_url)
    t0 = time.monotonic()
    try:
        with Lifecycle().connected() as life:
            ext.start(app)
            with older.cursor() as cur:
                cur.execute("INSERT INTO orders VALUES (0, 'long transaction')")
            writer = Writer(pg_url, "orders")
            try:
                kill_while_writing(sql, life, writer, kills=3, every=200)
            finally:
                expected = writer.stop()
            before_commit = rows(list(events.items), "orders")
            older.commit()
            wait_for_pks(events, "orders", {0, *expected})
            kill_listener(sql)
            life.wait_for_name("connected", 5)
            got = rows(settle(events, ext, app), "orders")
    finally:
        older.close()
    print(
        f"\nopen transaction + {len(expected)} rows + 4 kills: {time.monotonic() - t0:.3f}s; "
        f"{len(before_commit)} rows delivered before the open transaction committed"
    )
    assert 0 not in [e.pk for e in before_commit], "the open transaction's row came before commit"
    assert_exactly_once(got, [0, *expected])


# -- ordering -----------------------------------------------------------------------------


def run_transaction(url: str, statements: list[str]) -> list[tuple[str, str, int]]:
    """Run ``statements`` (each ending in ``RETURNING id``, on table
    ``a`` or ``b``) in one transaction; return the (table, op, id) of every
    row in the order each statement processed them."""
    conn = psycopg2.connect(url)
    order: list[tuple[str, str, int]] = []
    try:
        with conn.cursor() as cur:
            for statement in statements:
                words = statement.split()
                op, table = words[0], words[1 if words[0] == "UPDATE" else 2]
                cur.execute(statement)
                order += [(table, op, pk) for (pk,) in cur.fetchall()]
        conn.commit()
    finally:
        conn.close()
    return order


def transaction_statements(base: int) -> list[str]:
    return [
        f"INSERT INTO a SELECT g, 'n' FROM generate_series({base + 5}, {base + 1}, -1) g "
        "RETURNING id",
        f"INSERT INTO b VALUES ({base + 1}, 'b') RETURNING id",
        f"UPDATE a SET note = 'u' || id WHERE id % 2 = 1 AND id > {base} RETURNING id",
        f"DELETE FROM a WHERE id IN ({base + 2}, {base + 4}) RETURNING id",
        f"UPDATE b SET note = 'bb' WHERE id = {base + 1} RETURNING id",
        f"INSERT INTO a VALUES ({base + 7}, 'x'), ({base + 6}, 'y') RETURNING id",
    ]


def test_events_of_one_transaction_arrive_in_statement_and_row_order(
    make_app: MakeApp, sql: SQL, pg_url: str, events: Recorder
) -> None:
    """A transaction of six statements on two durable tables: its events
    arrive in statement order and, within a statement, in the order it
    changed the rows (what RETURNING reports), both live and when replayed
    after a stop() and start()."""
    app, ext = durable_app(make_app, sql, "a", "b")
    ext.start(app)
    live = run_transaction(pg_url, transaction_statements(0))
    events.wait_for(len(live))
    got = rows(settle(events, ext, app))
    assert [(e.table, e.op.value, e.pk) for e in got] == live

    ext.stop(app)
    seen = len(events.items)
    replayed = run_transaction(pg_url, transaction_statements(100))
    ext.start(app)
    events.wait_for(seen + len(replayed), timeout=LONG)
    got = rows(settle(events, ext, app)[seen:])
    assert [(e.table, e.op.value, e.pk) for e in got] == replayed
    ids = [e.id for e in got]
    assert ids == sorted({i for i in ids if i is not None}), ids


# -- a full queue -----------------------------------------------------------------------------


def test_durable_rows_dropped_from_a_full_queue_arrive_once(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """With DBNOTIFY_QUEUE_SIZE=5 and a receiver stuck on the first row,
    notifications of 200 durable transactions overflow the queue; once the
    receiver returns, every row still arrives, exactly once."""
    app, ext = durable_app(make_app, sql, "orders", DBNOTIFY_QUEUE_SIZE=5)
    release = threading.Event()

    @ext.on("orders")
    def slow(event: ChangeEvent) -> None:
        if event.pk == 1:
            release.wait(LONG)

    dropped = Recorder()
    try:
        with events_dropped.connected_to(dropped):
            ext.start(app)
            for pk in range(1, 201):
                sql("INSERT INTO orders VALUES (%s, 'x')", (pk,))
            state = wait_for_state(
                ext, app, lambda s: s.received == 200, "all 200 notifications read"
            )
            release.set()
            wait_for_pks(events, "orders", set(range(1, 201)))
            got = rows(settle(events, ext, app), "orders")
    finally:
        release.set()
    after = ext.listener_state(app)
    print(f"\nfull queue: listener_state {after}; events_dropped {dropped.items}")
    assert state.received == 200, state
    # Durable notifications that did not fit are not "dropped events": the
    # rows are replayed from the journal instead.
    assert after.replayed > 0, "the queue never overflowed: the test proves nothing"
    assert not dropped.items and after.dropped == 0, (dropped.items, after)
    assert_exactly_once(got, list(range(1, 201)))


# -- SQLite ----------------------------------------------------------------------------------


def test_sqlite_durable_watch_behaves_like_a_plain_watch(
    sqlite_app: MakeApp, sqlite_path: str, events: Recorder
) -> None:
    """On SQLite watch(durable=True) installs and works like a plain watch:
    the same events with journal ids, nothing for a rollback, and what is
    committed while stopped arrives after start(), without a gap."""
    path = sqlite_path
    app, ext = sqlite_app()
    db = sqlite3.connect(path, timeout=WAIT, isolation_level=None)
    connected = Recorder()
    try:
        for table in ("plain", "durable"):
            db.execute(ORDERS.format(table))
        ext.watch("plain")
        ext.watch("durable", durable=True)
        ext.install_triggers(app)
        assert ext.status(app).watches == {"plain": "installed", "durable": "installed"}
        with listener_connected.connected_to(connected):
            ext.start(app)
            statements = [
                "INSERT INTO {} VALUES (1, 'a'), (2, 'b')",
                "UPDATE {} SET note = 'c' WHERE id = 1",
                "UPDATE {} SET note = note",
                "DELETE FROM {} WHERE id = 2",
            ]
            for statement in statements:
                db.execute(statement.format("plain"))
                db.execute(statement.format("durable"))
            db.execute("BEGIN")
            db.execute("INSERT INTO durable VALUES (9, 'rolled back')")
            db.execute("ROLLBACK")
            events.wait_for(8)
            got = settle(events, ext, app)
            ext.stop(app)
            db.execute("INSERT INTO durable VALUES (3, 'while stopped')")
            db.execute("DELETE FROM durable WHERE id = 1")
            ext.start(app)
            events.wait_for(len(got) + 3)
            later = settle(events, ext, app)[len(got) + 1 :]
            kinds = connected.wait_for(2, "listener_connected")
    finally:
        db.close()
        ext.close(app)
    plain, durable = rows(got, "plain"), rows(got, "durable")
    assert [key(e) for e in durable] == [key(e) for e in plain]
    assert [(e.op.value, e.pk) for e in durable] == [
        ("INSERT", 1),
        ("INSERT", 2),
        ("UPDATE", 1),
        ("DELETE", 2),
    ]
    ids = [e.id for e in durable]
    assert all(type(i) is int for i in ids), ids
    assert ids == sorted({i for i in ids if i is not None}), ids
    assert [(e.op.value, e.pk) for e in rows(later)] == [("INSERT", 3), ("DELETE", 1)]
    assert [k["gap"] for k in kinds] == [False, False]


def test_rows_committed_after_start_keep_commit_order_across_fast_and_durable(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """The catch-up that follows a connect replays only what was missed
    before LISTEN took effect. Here it runs late (the dispatcher's reads
    are slow) while a fast row and then a durable row commit:
    both arrive as notifications, in commit order, the durable row once."""
    app, ext = durable_app(make_app, sql, "payments", fast=("orders",))
    with dispatcher_held(app) as gate:
        ext.start(app)
        sql("INSERT INTO orders VALUES (1, 'fast, first')")
        sql("INSERT INTO payments VALUES (2, 'durable, second')")
        gate.set()
        got = settle(events, ext, app)
    assert [(e.table, e.pk) for e in rows(got)] == [("orders", 1), ("payments", 2)]
