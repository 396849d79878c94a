"""The MySQL/MariaDB backend on the real server: what is MySQL's own.

Values as the triggers journal them (JSON_ARRAY, bytes in hex, BIT as a
number, exact DECIMAL) and as ``event.instance()`` gives them back; names
that need quoting, and tables of another database; UPDATEs compared byte
for byte under case-insensitive collations; journal ids that InnoDB gives
out before commit (a transaction that commits after a later one, one
rolled back, one open when the listener starts); a large transaction;
rows too large to journal whole; writers in other processes; the URLs and
mistakes refused; TRUNCATE, which fires no trigger.

The contract MySQL shares with the other databases is tested by the tests
that take the ``backend`` fixture elsewhere (test_triggers.py, test_once.py,
...); every test here runs on MySQL only."""

from __future__ import annotations

import datetime as dt
import enum
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from flask_dbnotify import (
    DBNotify,
    ExactFloat,
    Operation,
    notification_received,
    row_changed,
    table_truncated,
)
from flask_dbnotify.backends.mysql.ddl import MAX_ROW_BYTES
from flask_dbnotify.backends.mysql.sequence import HOLE_TIMEOUT, LOOK_FOR

from ._helpers import (
    WAIT,
    Backend,
    Recorder,
    listening,
    marker,
    quote,
    wait_for_state,
)

# Everything here is MySQL's own: the other databases have tests of theirs.
pytestmark = pytest.mark.backends("mysql")

ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")
ORDERS = "CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(50) NOT NULL, qty INT NOT NULL)"


# -- helpers -------------------------------------------------------------------------


def connected(ext: DBNotify, app: Flask) -> None:
    """Wait (bounded) until the listener's stream is open: it has found
    where in the journal it begins."""
    wait_for_state(ext, app, lambda state: state.connected, "the listener connected")


@pytest.fixture()
def other_database(backend: Backend) -> Iterator[Callable[[str], str]]:
    """Makes databases beside the test's own, with names the test chooses
    (made unique by the process id); each is dropped at the end, with the
    triggers of ours in it (which write to the test's journal)."""
    made: list[str] = []

    def make(name: str) -> str:
        full = f"{name}{os.getpid()}"
        backend.sql(f"DROP DATABASE IF EXISTS {quote(full)}")
        backend.sql(f"CREATE DATABASE {quote(full)} CHARACTER SET utf8mb4")
        made.append(full)
        return full

    yield make
    for name in made:
        backend.sql(f"DROP DATABASE IF EXISTS {quote(name)}")


# -- values ----------------------------------------------------------------------------


class Color(enum.Enum):
    red = "red"
    green = "green"


class Base(DeclarativeBase):
    pass


class Thing(Base):
    """Every column type the value test writes, as an app maps it."""

    __tablename__ = "things"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    price: Mapped[Decimal | None] = mapped_column(mysql.DECIMAL(20, 6))
    at: Mapped[dt.datetime | None] = mapped_column(mysql.DATETIME(fsp=6))
    stamp: Mapped[dt.datetime | None] = mapped_column(mysql.TIMESTAMP(fsp=3), nullable=True)
    day: Mapped[dt.date | None] = mapped_column(sa.Date)
    clock: Mapped[dt.time | None] = mapped_column(mysql.TIME(fsp=6))
    doc: Mapped[Any] = mapped_column(sa.JSON)
    data: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    raw: Mapped[bytes | None] = mapped_column(sa.VARBINARY(16))
    bits: Mapped[int | None] = mapped_column(mysql.BIT(10))
    color: Mapped[Color | None] = mapped_column(sa.Enum(Color))
    tags: Mapped[Any] = mapped_column(mysql.SET("a", "b", "c"))
    ratio: Mapped[float | None] = mapped_column(mysql.FLOAT)
    # asdecimal=False: SQLAlchemy's mysql.DOUBLE reads a Decimal rounded to
    # 10 places by default (see the test of Decimal doubles below).
    big: Mapped[float | None] = mapped_column(mysql.DOUBLE(asdecimal=False))
    huge: Mapped[int | None] = mapped_column(mysql.BIGINT(unsigned=True))
    flag: Mapped[int | None] = mapped_column(mysql.TINYINT(1))
    on: Mapped[bool | None] = mapped_column(sa.Boolean)
    name: Mapped[str | None] = mapped_column(sa.String(100))
    note: Mapped[str | None] = mapped_column(sa.Text)
    year: Mapped[int | None] = mapped_column(mysql.YEAR)


THINGS = """CREATE TABLE things (
    id INT PRIMARY KEY, price DECIMAL(20,6), at DATETIME(6), stamp TIMESTAMP(3) NULL,
    day DATE, clock TIME(6), doc JSON, data BLOB, raw VARBINARY(16), bits BIT(10),
    color ENUM('red', 'green'), tags SET('a', 'b', 'c'), ratio FLOAT, big DOUBLE,
    huge BIGINT UNSIGNED, flag TINYINT(1), "on" BOOLEAN, name VARCHAR(100), note TEXT,
    year YEAR
) CHARACTER SET utf8mb4"""
NAME = "Emoji \U0001f389 \"double\" 'single' back\\slash\nnewline \u00e9\u4e2d"
FULL: dict[str, Any] = {
    "id": 1,
    "price": Decimal("12345678901234.123456"),
    "at": dt.datetime(2024, 5, 1, 12, 34, 56, 123456),
    "stamp": dt.datetime(2024, 5, 1, 12, 34, 56, 789000),
    "day": dt.date(2024, 2, 29),
    "clock": dt.time(23, 59, 58, 7),
    "doc": {"a": [1, 2.5, None], "s": 'quote " and \\', "n": {"deep": True}},
    "data": b"\x00\x01\xffdata",
    "raw": b"\x0a\x0b",
    "bits": 0b1010101010,
    "color": Color.green,
    "tags": {"a", "c"},
    "ratio": 3.14159,
    "big": 0.30000000000000004,
    "huge": 18446744073709551615,
    "flag": 1,
    "on": False,
    "name": NAME,
    "note": None,
    "year": 2024,
}
#: What event.new holds for FULL: the JSON the trigger wrote.
FULL_JSON: dict[str, Any] = {
    "id": 1,
    "price": 12345678901234.123456,  # an ExactFloat: its text is checked below
    "at": "2024-05-01 12:34:56.123456",
    "stamp": "2024-05-01 12:34:56.789",
    "day": "2024-02-29",
    "clock": "23:59:58.000007",
    "doc": {"a": [1, 2.5, None], "s": 'quote " and \\', "n": {"deep": True}},
    "data": "0001FF64617461",
    "raw": "0A0B",
    "bits": 682,
    "color": "green",
    "tags": "a,c",
    "ratio": 3.14159,
    "big": 0.30000000000000004,
    "huge": 18446744073709551615,
    "flag": 1,
    "on": 0,
    "name": NAME,
    "note": None,
    "year": 2024,
}


def test_values_arrive_as_json_and_instance_matches_a_select(
    backend: Backend, events: Recorder, decoder: str
) -> None:
    """Every common column type arrives in event.new as documented (DECIMAL
    exact, times as text, JSON embedded, bytes in hex, BIT as a number, SET
    as text, unsigned BIGINT exact, utf8mb4 text intact, NULL as None), and
    event.instance(Model) gives what a SELECT through SQLAlchemy gives,
    column by column; the DELETE carries the same values."""
    backend.sql(THINGS)
    app, ext = listening(backend.make_app, "things")
    engine = backend.engine()
    with Session(engine) as session:
        session.add(Thing(**FULL))
        session.add(Thing(id=2))  # every other column NULL
        session.commit()
    full, empty = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))

    assert full.op == Operation.INSERT and full.pk == 1 and not full.cut
    assert full.new == FULL_JSON
    assert isinstance(full.new["price"], ExactFloat)
    assert full.new["price"].text == "12345678901234.123456"
    assert type(full.new["huge"]) is int
    assert empty.new == {column: (2 if column == "id" else None) for column in FULL_JSON}

    with Session(engine) as session:
        selected = {row.id: row for row in session.scalars(sa.select(Thing))}
        for event in (full, empty):
            built = event.instance(Thing)
            assert sa.inspect(built).transient
            stored = selected[event.pk]
            differ = []
            for column in FULL:
                mine, theirs = getattr(built, column), getattr(stored, column)
                if column == "tags" and theirs is not None:
                    # SQLAlchemy's mysql.SET reads a Python set; instance()
                    # leaves types it does not list as they are (docs/api.rst,
                    # "Row values"): the SET's text.
                    assert mine == ",".join(sorted(theirs)), column
                    continue
                # TIME(6) too: SQLAlchemy's MySQL TIME reads a time (PyMySQL
                # alone gives a timedelta), and instance() makes one.
                if (mine, type(mine)) != (theirs, type(theirs)):
                    differ.append((column, mine, theirs))
            assert differ == [], f"instance() against SELECT, row {event.pk}"
    assert selected[1].price == FULL["price"] and selected[1].clock == FULL["clock"]

    with Session(engine) as session:
        session.execute(sa.delete(Thing).where(Thing.id == 1))
        session.commit()
    (deleted,) = events.wait_for(4)[3:]
    assert deleted.op == Operation.DELETE and deleted.old == FULL_JSON and deleted.new is None


def test_a_timestamp_arrives_in_the_writing_sessions_time_zone(
    backend: Backend, events: Recorder
) -> None:
    """A TIMESTAMP arrives as the writing session reads it back, in that
    session's time zone (docs/mysql.rst, "Row values"): the same instant
    written from +00:00 and from +05:00 arrives as two different texts,
    while the app's SELECT reads one. event.timestamp is UTC either way."""
    backend.sql("CREATE TABLE stamps (id INT PRIMARY KEY, at TIMESTAMP(3) NULL)")
    app, ext = listening(backend.make_app, "stamps")
    backend.sql("SET SESSION time_zone = '+00:00'")
    backend.sql("INSERT INTO stamps VALUES (1, '2024-05-01 07:00:00.5')")
    backend.sql("SET SESSION time_zone = '+05:00'")
    backend.sql("INSERT INTO stamps VALUES (2, '2024-05-01 12:00:00.5')")
    backend.sql("SET SESSION time_zone = '+00:00'")
    now = backend.now()
    utc, east = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    # The same instant, for the server and for a SELECT through SQLAlchemy.
    assert backend.sql("SELECT count(DISTINCT UNIX_TIMESTAMP(at)) FROM stamps") == [(1,)]
    with backend.engine().connect() as conn:
        read = conn.execute(sa.text("SELECT at FROM stamps ORDER BY id")).scalars().all()
    assert read[0] == read[1]
    for event in (utc, east):
        assert event.timestamp is not None and event.timestamp.tzinfo is not None
        assert abs(event.timestamp - now) < dt.timedelta(seconds=WAIT), event
    # Documented: each as its writer reads it (the app cannot tell the
    # zone from the event; a writer in the app's zone is what instance()
    # needs to match a SELECT).
    assert utc.new["at"] == "2024-05-01 07:00:00.500"
    assert east.new["at"] == "2024-05-01 12:00:00.500"


# -- names -----------------------------------------------------------------------------

ODD_TABLE = 'Odd `Order` "Items" 100%.v2'
ODD_COLUMNS = ("Item ID", "MixedCase", 'Qty "Ordered"', "unit.price", "back`tick")


def test_names_with_backticks_spaces_dots_and_quotes(backend: Backend, events: Recorder) -> None:
    """A table and columns whose names hold backticks, spaces, dots, double
    quotes and capitals are watched (the name double-quoted in watch(), as
    it holds a dot) and deliver every operation, with the composite key in
    PRIMARY KEY order."""
    item, mixed, qty, price, tick = (quote(c) for c in ODD_COLUMNS)
    backend.sql(
        f"CREATE TABLE {quote(ODD_TABLE)} ({item} INT, {mixed} VARCHAR(10), {qty} INT, "
        f"{price} DECIMAL(8, 2), {tick} TEXT, PRIMARY KEY ({mixed}, {item}))"
    )
    watched = quote(ODD_TABLE)  # '"Odd `Order` ""Items"" 100%.v2"'
    app, ext = listening(backend.make_app, watched)
    assert ext.status(app).watches == {watched: "installed"}
    own = Recorder()
    with row_changed.connected_to(own, sender=watched):
        backend.sql(f"INSERT INTO {quote(ODD_TABLE)} VALUES (7, 'Ab', 2, 1.50, 'x`y')")
        backend.sql(f"UPDATE {quote(ODD_TABLE)} SET {tick} = 'z', {qty} = 3")
        backend.sql(f"DELETE FROM {quote(ODD_TABLE)}")
        got = own.wait_for(3)
        events.assert_no_more(3, marker(ext, app))
    assert [e.op for e in got] == [Operation.INSERT, Operation.UPDATE, Operation.DELETE]
    assert all(e.table == watched and e.pk == ("Ab", 7) for e in got)
    assert got[0].new == dict(zip(ODD_COLUMNS, [7, "Ab", 2, 1.5, "x`y"], strict=True))
    assert got[0].new["unit.price"].text == "1.50"
    assert got[1].changed == {'Qty "Ordered"', "back`tick"}
    assert got[1].new == dict(zip(ODD_COLUMNS, [7, "Ab", 3, 1.5, "z"], strict=True))
    assert got[2].old == got[1].new


@pytest.mark.parametrize(
    ("database", "table"),
    [("dbnotify_other_", "orders"), ('odd.db "x" `y`_', 'Order `Items"')],
    ids=["plain", "odd"],
)
def test_a_table_of_another_database(
    backend: Backend,
    events: Recorder,
    other_database: Callable[[str], str],
    database: str,
    table: str,
) -> None:
    """watch("otherdb.table") watches a table of another database on the
    same server (its names double-quoted when they hold dots or quotes):
    its triggers write to the app's journal, and status shows it installed."""
    other = other_database(database)
    backend.sql(f"CREATE TABLE {quote(other)}.{quote(table)} (id INT PRIMARY KEY, item TEXT)")
    watched = f"{quote(other)}.{quote(table)}" if database.startswith("odd") else f"{other}.orders"
    app, ext = listening(backend.make_app, watched)
    assert ext.status(app).watches == {watched: "installed"}
    assert backend.triggers() == []  # they are in the other database
    backend.sql(f"INSERT INTO {quote(other)}.{quote(table)} VALUES (1, 'a')")
    backend.sql(f"UPDATE {quote(other)}.{quote(table)} SET item = 'b'")
    got = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    assert [(e.table, e.op, e.pk) for e in got] == [
        (watched, Operation.INSERT, 1),
        (watched, Operation.UPDATE, 1),
    ]
    assert got[1].old == {"id": 1, "item": "a"} and got[1].new == {"id": 1, "item": "b"}


# -- what an UPDATE is ------------------------------------------------------------------


@pytest.mark.backends("mysql", "binlog")
def test_text_of_other_character_sets_is_written_and_arrives_as_a_select_reads_it(
    backend: Backend, events: Recorder
) -> None:
    """Columns in latin1 (MySQL's Windows-1252, its undefined bytes read as
    the same code points) and greek: a write of text beyond ASCII succeeds
    (JSON_ARRAY passed the bytes on unconverted, and the journal refused
    them: the user's write failed), and the event holds the text a SELECT
    returns, on both captures."""
    backend.sql(
        "CREATE TABLE names (id INT PRIMARY KEY, western VARCHAR(20) CHARACTER SET latin1, "
        "greek VARCHAR(20) CHARACTER SET greek, note TEXT CHARACTER SET latin1)"
    )
    app, ext = listening(backend.make_app, "names")
    writer = backend.connect()
    with writer.cursor() as cur:
        cur.execute("SET NAMES binary")
        cur.execute(
            "INSERT INTO names VALUES (1, %s, %s, %s)",
            (b"caf\xe9 \x80 \x81\x8d", b"\xe1\xe2", b"\xfc"),
        )
        cur.execute("UPDATE names SET western = %s WHERE id = 1", (b"na\xefve",))
    writer.commit()
    inserted, updated = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    selected = dict(
        zip(("id", "western", "greek", "note"), backend.sql("SELECT * FROM names")[0], strict=True)
    )
    assert inserted.new == {
        "id": 1,
        "western": "caf\u00e9 \u20ac \x81\x8d",
        "greek": "\u03b1\u03b2",
        "note": "\u00fc",
    }
    assert updated.new == selected and selected["western"] == "na\u00efve", selected
    assert updated.changed == {"western"}


def test_case_only_and_trailing_space_updates_arrive_and_no_ops_do_not(
    backend: Backend, events: Recorder
) -> None:
    """Under a case-insensitive collation, 'Bob' to 'bob' (and 'bob' to
    'bob ', equal under PAD SPACE) is a change and arrives; an UPDATE that
    changes no byte does not; when_changed= lets through only changes of
    its columns."""
    for table in ("people", "pets"):
        backend.sql(
            f"CREATE TABLE {table} (id INT PRIMARY KEY, "
            "name VARCHAR(50) COLLATE utf8mb4_general_ci, note VARCHAR(50))"
        )
    app, ext = backend.make_app()
    ext.watch("people")
    ext.watch("pets", when_changed=["name"])
    ext.install_triggers(app)
    ext.start(app)
    assert backend.sql("SELECT 'Bob' = 'bob', 'bob' = 'bob '") == [(1, 1)]  # the collation
    backend.sql("INSERT INTO people VALUES (1, 'Bob', 'x')")
    backend.sql("UPDATE people SET name = 'bob'")
    backend.sql("UPDATE people SET name = 'bob'")  # no change
    backend.sql("UPDATE people SET note = 'x', name = name")  # no change
    backend.sql("UPDATE people SET name = 'bob '")
    backend.sql("INSERT INTO pets VALUES (1, 'Rex', 'a')")
    backend.sql("UPDATE pets SET note = 'b'")  # not a column of when_changed
    backend.sql("UPDATE pets SET name = 'REX', note = 'c'")
    got = events.wait_for(5)
    events.assert_no_more(5, marker(ext, app))
    assert [(e.table, e.op) for e in got] == [
        ("people", Operation.INSERT),
        ("people", Operation.UPDATE),
        ("people", Operation.UPDATE),
        ("pets", Operation.INSERT),
        ("pets", Operation.UPDATE),
    ]
    assert (got[1].old["name"], got[1].new["name"], got[1].changed) == ("Bob", "bob", {"name"})
    assert (got[2].old["name"], got[2].new["name"], got[2].changed) == ("bob", "bob ", {"name"})
    assert got[4].old == {"id": 1, "name": "Rex", "note": "b"}
    assert got[4].new == {"id": 1, "name": "REX", "note": "c"}
    assert got[4].changed == {"name", "note"}


# -- journal ids given out before commit -----------------------------------------------


def insert_open(conn: Any, row_id: int, item: str) -> None:
    """Insert an order in ``conn``'s transaction, left open."""
    with conn.cursor() as cur:
        cur.execute("INSERT INTO orders VALUES (%s, %s, 1)", (row_id, item))


def test_a_transaction_committing_after_a_later_one_is_delivered_once(
    backend: Backend, events: Recorder
) -> None:
    """A transaction that wrote first (the lower journal id) and commits
    after another arrives when it commits, after the other's event: nothing
    lost, each event once."""
    backend.sql(ORDERS)
    app, ext = listening(backend.make_app, "orders")
    first, second = backend.connect(), backend.connect()
    insert_open(first, 1, "first")
    insert_open(second, 2, "second")
    second.commit()
    (early,) = events.wait_for(1, "the event of the transaction committed first")
    assert (early.pk, early.new["item"]) == (2, "second")
    events.assert_no_more(1, marker(ext, app))  # the open one's row is not read
    del events.items[:]

    first.commit()
    (late,) = events.wait_for(1, "the event of the transaction committed last")
    assert (late.pk, late.new["item"]) == (1, "first")
    assert late.id < early.id  # it filled the hole below what was read
    events.assert_no_more(1, marker(ext, app))


def test_a_rolled_back_write_does_not_hold_back_later_events(
    backend: Backend, events: Recorder
) -> None:
    """A transaction rolled back after writing leaves its journal id unused:
    it never arrives, and the events of later commits arrive at once (not
    after the HOLE_TIMEOUT the listener waits for the id)."""
    backend.sql(ORDERS)
    app, ext = listening(backend.make_app, "orders")
    gone = backend.connect()
    insert_open(gone, 1, "gone")
    backend.sql("INSERT INTO orders VALUES (2, 'kept', 1)")
    gone.rollback()
    backend.sql("INSERT INTO orders VALUES (3, 'after', 1)")
    # WAIT is far below HOLE_TIMEOUT: an event held back by the hole fails.
    assert WAIT < HOLE_TIMEOUT
    got = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    assert [e.pk for e in got] == [2, 3]
    # The rollback took the id before the kept row's: a hole the listener
    # looked for, and that nothing filled.
    assert got[0].id - 1 not in backend.journal_ids()


def test_a_late_commit_is_not_held_back_by_many_rolled_back_ids(
    backend: Backend, events: Recorder
) -> None:
    """An app that rolls back often (failed requests) leaves many unused
    journal ids behind; a transaction that commits after a later one must
    still arrive when it commits, not minutes later."""
    backend.sql(ORDERS)
    app, ext = listening(backend.make_app, "orders")
    failing = backend.connect()
    # LOOK_FOR + 10 separate unused ids, each between two committed rows.
    for n in range(LOOK_FOR + 10):
        insert_open(failing, 100_000 + n, "rolled back")
        failing.rollback()
        backend.sql("INSERT INTO orders VALUES (?, 'ok', 1)", (n + 1,))
    events.wait_for(LOOK_FOR + 10, "the committed rows between the rollbacks")
    del events.items[:]

    first, second = backend.connect(), backend.connect()
    insert_open(first, 9001, "first")
    insert_open(second, 9002, "second")
    second.commit()
    (early,) = events.wait_for(1, "the event of the transaction committed first")
    first.commit()
    (_, late) = events.wait_for(
        2, f"the late commit's event, held back while {LOOK_FOR}+ older holes are open"
    )
    assert (early.pk, late.pk) == (9002, 9001)
    events.assert_no_more(2, marker(ext, app))


@pytest.mark.parametrize("later_commit", [False, True], ids=["alone", "with-a-later-commit"])
def test_a_transaction_open_when_the_listener_starts_is_delivered_at_commit(
    backend: Backend, events: Recorder, later_commit: bool
) -> None:
    """A transaction that wrote before the listener started and commits
    after it is delivered when it commits, whether or not a later
    transaction committed before the start; what committed before the
    start is not delivered."""
    backend.sql(ORDERS)
    app, ext = backend.make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    open_one = backend.connect()
    insert_open(open_one, 1, "open at start")
    if later_commit:
        backend.sql("INSERT INTO orders VALUES (2, 'committed before start', 1)")
    ext.start(app)
    connected(ext, app)
    open_one.commit()
    (event,) = events.wait_for(1, "the event of the transaction open at start")
    assert (event.op, event.pk, event.new["item"]) == (Operation.INSERT, 1, "open at start")
    events.assert_no_more(1, marker(ext, app))


@pytest.mark.backends("mysql", "binlog")  # binlog: many rows events, one relay transaction
def test_twenty_thousand_rows_of_one_transaction_arrive_whole_and_in_order(
    backend: Backend, events: Recorder
) -> None:
    """One INSERT ... SELECT of 20,000 rows in one transaction arrives as
    20,000 events, in order, none missing or repeated."""
    backend.sql(ORDERS)
    app, ext = listening(backend.make_app, "orders")
    count = 20_000
    conn = backend.connect()
    with conn.cursor() as cur:
        cur.execute(f"SET SESSION max_recursive_iterations = {count * 5}")  # 1000 by default
        cur.execute(
            "INSERT INTO orders (id, item, qty) WITH RECURSIVE n (i) AS "
            f"(SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) "
            "SELECT i, CONCAT('item ', i), i * 2 FROM n"
        )
    conn.commit()
    got = events.wait_for(count, "events of the 20,000-row transaction", timeout=60)
    events.assert_no_more(count, marker(ext, app))
    assert [e.pk for e in got] == list(range(1, count + 1))
    assert all(e.op == Operation.INSERT for e in got)
    assert all(a.id < b.id for a, b in zip(got, got[1:], strict=False))
    assert got[-1].new == {"id": count, "item": f"item {count}", "qty": 2 * count}


# -- large rows ------------------------------------------------------------------------


class Sizes(Recorder):
    """Records row events with each value that is text as its length (so
    that a failure does not print megabytes), and messages."""

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        event = kwargs.get("event")
        if event is None:
            self.add(kwargs.get("payload"))
            return

        def sizes(row: dict[str, Any] | None) -> dict[str, Any] | None:
            if row is None:
                return None
            return {k: len(v) if isinstance(v, str) else v for k, v in row.items()}

        self.add((event.op, event.pk, event.cut, sizes(event.new), sizes(event.old)))

    @contextmanager
    def connected(self) -> Iterator[Sizes]:
        with row_changed.connected_to(self), notification_received.connected_to(self):
            yield self


def test_rows_over_the_limit_arrive_cut_and_the_write_succeeds(backend: Backend) -> None:
    """A row whose text takes more than 2 MiB (or whose blob takes more than
    1 MiB: blobs count twice, journaled in hex) arrives cut, its key only,
    and its write succeeds; a row just under the limit arrives whole."""
    backend.sql("CREATE TABLE docs (id INT PRIMARY KEY, body LONGTEXT, data LONGBLOB)")
    app, ext = listening(backend.make_app, "docs")
    assert MAX_ROW_BYTES == 2 * 1024 * 1024
    # The limit is the row's: its id counts too, so "just under" leaves room.
    under, over, half = MAX_ROW_BYTES - 1024, MAX_ROW_BYTES + 1, MAX_ROW_BYTES // 2
    with Sizes().connected() as got:
        conn = backend.connect()
        with conn.cursor() as cur:
            cur.execute("INSERT INTO docs VALUES (1, REPEAT('x', %s), NULL)", (under,))
            cur.execute("INSERT INTO docs VALUES (2, REPEAT('y', %s), NULL)", (over,))
            cur.execute("INSERT INTO docs VALUES (3, NULL, REPEAT(x'01', %s))", (half - 512,))
            cur.execute("INSERT INTO docs VALUES (4, NULL, REPEAT(x'02', %s))", (half + 1,))
        conn.commit()
        stored = backend.sql("SELECT id, LENGTH(body), LENGTH(data) FROM docs ORDER BY id")
        blobs = [(3, None, half - 512), (4, None, half + 1)]
        assert stored == [(1, under, None), (2, over, None), *blobs]
        got.wait_for(4, "the events of two whole rows and two cut ones")
        got.assert_no_more(4, marker(ext, app))
    insert = Operation.INSERT
    assert got.items[:4] == [
        (insert, 1, False, {"id": 1, "body": under, "data": None}, None),
        (insert, 2, True, {"id": 2}, None),
        (insert, 3, False, {"id": 3, "body": None, "data": 2 * (half - 512)}, None),
        (insert, 4, True, {"id": 4}, None),
    ]


def test_a_cut_update_and_delete_of_a_composite_key_arrive(backend: Backend) -> None:
    """An UPDATE and a DELETE of a row over the limit, in a table with a
    two-column key, arrive cut: new and old hold the key columns, pk the
    key in PRIMARY KEY order."""
    backend.sql("CREATE TABLE docs (a INT, b VARCHAR(5), body LONGTEXT, PRIMARY KEY (b, a))")
    app, ext = listening(backend.make_app, "docs")
    with Sizes().connected() as got:
        backend.sql("INSERT INTO docs VALUES (1, 'k', 'small')")
        backend.sql("UPDATE docs SET body = REPEAT('z', ?)", (MAX_ROW_BYTES + 1,))
        backend.sql("DELETE FROM docs")
        got.wait_for(3, "an insert, a cut update and a cut delete")
        got.assert_no_more(3, marker(ext, app))
    key = {"a": 1, "b": 1}  # b's value 'k', as its length
    assert got.items[:3] == [
        (Operation.INSERT, ("k", 1), False, {**key, "body": 5}, None),
        (Operation.UPDATE, ("k", 1), True, key, key),
        (Operation.DELETE, ("k", 1), True, None, key),
    ]


def test_a_double_mapped_as_decimal_comes_back_as_decimal(
    backend: Backend, events: Recorder
) -> None:
    """A DOUBLE mapped with SQLAlchemy's mysql.DOUBLE (which reads a Decimal
    by default, asdecimal=True) or Float(asdecimal=True) comes back from
    event.instance() as a Decimal, as a SELECT gives it."""

    class Base2(DeclarativeBase):
        pass

    class Reading(Base2):
        __tablename__ = "readings"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        value: Mapped[Decimal] = mapped_column(mysql.DOUBLE())
        other: Mapped[Decimal] = mapped_column(sa.Float(asdecimal=True))

    backend.sql("CREATE TABLE readings (id INT PRIMARY KEY, value DOUBLE, other DOUBLE)")
    app, ext = listening(backend.make_app, Reading)
    backend.sql("INSERT INTO readings VALUES (1, 2.5, 0.25)")
    (event,) = events.wait_for(1)
    built = event.instance(Reading)
    with Session(backend.engine()) as session:
        stored = session.get(Reading, 1)
        assert stored is not None
        assert (type(stored.value), type(stored.other)) == (Decimal, Decimal)
        assert (stored.value, stored.other) == (Decimal("2.5"), Decimal("0.25"))
    assert (built.value, type(built.value)) == (Decimal("2.5"), Decimal)
    assert (built.other, type(built.other)) == (Decimal("0.25"), Decimal)


# -- writers in other processes ---------------------------------------------------------

WRITER = """
import sys
import pymysql
host, port, user, password, database, name, count = sys.argv[1:8]
conn = pymysql.connect(
    host=host, port=int(port), user=user, password=password, database=database,
    autocommit=False, charset="utf8mb4",
)
with conn.cursor() as cur:
    for i in range(int(count)):
        cur.execute("INSERT INTO orders (writer, i) VALUES (%s, %s)", (name, i))
        if i % 7 == 6:
            conn.rollback()  # leaves a journal id unused
        else:
            conn.commit()
conn.close()
"""


def test_writers_in_other_processes_each_arrive_once(backend: Backend, events: Recorder) -> None:
    """Three writer processes commit concurrently (rolling some writes
    back): every committed row arrives exactly once, each writer's in its
    commit order, and no rolled back one."""
    backend.sql(
        "CREATE TABLE orders (id INT AUTO_INCREMENT PRIMARY KEY, writer VARCHAR(10), i INT)"
    )
    app, ext = listening(backend.make_app, "orders")
    url = sa.make_url(backend.url)
    where = [url.host or "127.0.0.1", str(url.port or 3306), url.username or "root"]
    where += [url.password or "", str(url.database)]
    count, names = 60, ["w1", "w2", "w3"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, *where, name, str(count)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for name in names
    ]
    try:
        for proc in procs:
            assert proc.stderr is not None
            code = proc.wait(timeout=3 * WAIT)
            assert code == 0, f"writer exited with {code}:\n{proc.stderr.read().decode()}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(WAIT)
            if proc.stderr is not None:
                proc.stderr.close()
    kept = [i for i in range(count) if i % 7 != 6]
    got = events.wait_for(len(kept) * len(names), "events of the three writers")
    events.assert_no_more(len(kept) * len(names), marker(ext, app))
    for name in names:
        assert [e.new["i"] for e in got if e.new["writer"] == name] == kept, name
    assert len({e.pk for e in got}) == len(got)


# -- what is refused, and how ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql+pymysql://root@127.0.0.1:3306/", "the MySQL URL names no database"),
        ("mariadb+pymysql://root@127.0.0.1", "the MySQL URL names no database"),
        ("mysql+asyncmy://root@127.0.0.1/app", "unsupported MySQL driver 'asyncmy'"),
    ],
)
def test_a_url_without_database_or_with_an_unsupported_driver_is_refused(
    url: str, message: str
) -> None:
    """DBNotify(app) refuses a MySQL URL that names no database, or a driver
    it does not take, with a ValueError that says what to write instead."""
    app = Flask("refused")
    app.config.update(DBNOTIFY_DATABASE_URI=url, DBNOTIFY_AUTOSTART=False)
    with pytest.raises(ValueError, match=message) as raised:
        DBNotify(app)
    assert "mysql+pymysql://" in str(raised.value)


@pytest.mark.parametrize("driver", ["mysql+mysqldb", "mariadb+mariadbconnector"])
def test_urls_of_other_drivers_work_through_pymysql(
    backend: Backend, events: Recorder, driver: str
) -> None:
    """An app whose URL names another MySQL driver (the one its SQLAlchemy
    uses) works as is: the extension connects with PyMySQL."""
    backend.sql(ORDERS)
    url = sa.make_url(backend.url).set(drivername=driver).render_as_string(hide_password=False)
    app, ext = listening(lambda: backend.make_app(DBNOTIFY_DATABASE_URI=url), "orders")
    backend.sql("INSERT INTO orders VALUES (1, 'a', 1)")
    (event,) = events.wait_for(1)
    events.assert_no_more(1, marker(ext, app))
    assert event.new == {"id": 1, "item": "a", "qty": 1}


def test_cli_status_says_a_missing_table_does_not_exist(mysql_url: str) -> None:
    """`flask dbnotify status` for a watch of a table that does not exist
    says so, names the database, says what to do, and exits 1."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update(CONFIGURED_URL=mysql_url, CONFIGURED_TABLE="ordrs")
    done = subprocess.run(
        [FLASK, "--app", "tests.apps.configured_app", "dbnotify", "status"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    database = sa.make_url(mysql_url).database
    first = done.stdout.splitlines()[0]
    assert first.startswith("error      ordrs  (table 'ordrs' does not exist in database "), first
    assert f"'{database}'" in first
    assert "create it first (run your migrations), or fix the name given to watch()" in first
    assert "Traceback" not in done.stderr, done.stderr


# -- TRUNCATE ------------------------------------------------------------------------------


def test_truncate_sends_nothing_and_later_writes_still_arrive(
    backend: Backend, events: Recorder
) -> None:
    """MySQL fires no trigger for TRUNCATE TABLE: it sends no event (neither
    table_truncated nor row events, even when the watch asks for 'truncate'),
    the triggers survive it, and rows written after it arrive."""
    backend.sql(ORDERS)
    app, ext = backend.make_app()
    ext.watch("orders", operations=["insert", "delete", "truncate"])
    ext.install_triggers(app)
    ext.start(app)
    truncated = Recorder()
    with table_truncated.connected_to(truncated):
        backend.sql("INSERT INTO orders VALUES (1, 'before', 1)")
        backend.sql("TRUNCATE TABLE orders")
        backend.sql("INSERT INTO orders VALUES (2, 'after', 1)")
        got = events.wait_for(2)
        events.assert_no_more(2, marker(ext, app))
    assert [(e.op, e.pk) for e in got] == [(Operation.INSERT, 1), (Operation.INSERT, 2)]
    assert truncated.items == []
    assert ext.status(app).watches == {"orders": "installed"}


WITHOUT_PYMYSQL = """
import sys


class NoPyMySQL:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pymysql":
            raise ImportError("no pymysql here")


sys.meta_path.insert(0, NoPyMySQL())
from flask import Flask

from flask_dbnotify import DBNotify

app = Flask("app")
app.config["DBNOTIFY_DATABASE_URI"] = "mysql+mysqldb://app@db.example/shop"
app.config["DBNOTIFY_AUTOSTART"] = False
try:
    DBNotify(app)
except ValueError as exc:
    print(exc)
"""


def test_without_pymysql_a_mysql_url_says_which_extra_to_install() -> None:
    """PyMySQL is the `mysql` extra, not a dependency: an app on a MySQL URL
    where it is not installed gets a ValueError naming the extra (not an
    ImportError from deep inside)."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PYMYSQL], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == (
        "MySQL and MariaDB need PyMySQL: pip install 'Flask-DBNotify[mysql]'"
    ), done.stdout + done.stderr
