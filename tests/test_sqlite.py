"""The SQLite backend on real database files: what is SQLite's own (WAL,
journal pruning by listener position, the trigger column lists, SQLite's
value types, in-memory and relative URLs, writers and listeners in
separate processes, locking).

The public contract SQLite shares with PostgreSQL (code that works on one
works on the other by changing the URL) is tested on both by the tests that
take the ``backend`` fixture, in test_events.py and test_triggers.py."""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from flask import Flask, current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from flask_dbnotify import (
    ChangeEvent,
    DBNotify,
    DBNotifyError,
    listener_connected,
    listener_disconnected,
    row_changed,
    row_inserted,
)

from ._helpers import WAIT, Lines, Recorder, SQLiteDB, listening, marker, poll_until, quote

T = TypeVar("T")
SqliteApp = Callable[..., tuple[Flask, DBNotify]]
ROOT = Path(__file__).resolve().parent.parent

ORDERS = "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL, qty INTEGER NOT NULL)"


# -- fixtures and helpers ------------------------------------------------------


@pytest.fixture()
def engine(sqlite_path: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine("sqlite:///" + sqlite_path, connect_args={"timeout": WAIT})
    yield eng
    eng.dispose()


def run_python(code: str, *args: str, timeout: float = 3 * WAIT) -> str:
    """Run ``code`` with ``sys.executable -c`` in a separate process; return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"writer process failed:\n{result.stderr}"
    return result.stdout


def finish(proc: subprocess.Popen[bytes], what: str) -> str:
    """Close the child's stdin, wait (bounded) for it to exit 0; return its stderr."""
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.close()
    try:
        code = proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} did not exit within {WAIT}s") from None
    stderr = proc.stderr.read().decode()
    assert code == 0, f"{what} exited with {code}:\n{stderr}"
    return stderr


# -- installing, inspecting and removing triggers ------------------------------


def test_added_column_makes_status_outdated_until_reinstalled(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """SQLite triggers list the columns: after ALTER TABLE ADD COLUMN, writes
    still succeed and deliver the old columns, status says outdated, and
    install-triggers brings the new column in."""
    sqlite_db(ORDERS)
    app, ext = listening(sqlite_app, "orders")
    sqlite_db("ALTER TABLE orders ADD COLUMN note TEXT")
    status = ext.status(app)
    assert status.watches == {"orders": "outdated"}
    assert status.details["orders"]
    sqlite_db("INSERT INTO orders VALUES (1, 'a', 1, 'hello')")
    sqlite_db("UPDATE orders SET note = 'unseen'")  # the triggers do not know the column
    (before,) = events.wait_for(1)
    events.assert_no_more(1, marker(ext, app))
    assert before.new == {"id": 1, "item": "a", "qty": 1}
    del events.items[:]

    ext.install_triggers(app)
    assert ext.status(app).watches == {"orders": "installed"}
    sqlite_db("UPDATE orders SET note = 'changed'")
    (after,) = events.wait_for(1)
    events.assert_no_more(1, marker(ext, app))
    assert after.changed == {"note"}
    assert after.old == {"id": 1, "item": "a", "qty": 1, "note": "unseen"}
    assert after.new == {"id": 1, "item": "a", "qty": 1, "note": "changed"}


def test_rows_of_earlier_triggers_are_read(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """Journal rows as the triggers of earlier versions wrote them (values
    in chunks, the trigger's name as the shape key) are still read: an
    install keeps its triggers until install-triggers runs again."""
    sqlite_db(ORDERS)
    app, ext = listening(sqlite_app, "orders")
    columns = {"k": ["id"], "c": ["id", "item", "qty"], "keep": None}
    for op, body in [
        ("I", '[[7,"a",1]]'),
        ("U", '[[[7,"b",2]],[[7,"a",1]]]'),
        ("D", '[[7,"b",2]]'),
    ]:
        key = f"dbnotify_orders_{op.lower()}_0123456789"
        header = json.dumps({"t": "orders", "o": op, **columns})
        sqlite_db("INSERT INTO dbnotify_shapes (key, header) VALUES (?, ?)", (key, header))
        sqlite_db(
            "INSERT INTO dbnotify_journal (created_at, shape, body) "
            "VALUES (julianday('now'), ?, ?)",
            (key, body),
        )
    inserted, updated, deleted = events.wait_for(3)
    assert (inserted.op, inserted.pk, inserted.new, inserted.old) == (
        "INSERT",
        7,
        {"id": 7, "item": "a", "qty": 1},
        None,
    )
    assert updated.changed == {"item", "qty"} and updated.old == inserted.new
    assert updated.new == deleted.old == {"id": 7, "item": "b", "qty": 2}
    assert deleted.new is None and deleted.timestamp is not None


def test_renamed_column_keeps_its_old_key_until_reinstalled(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """After ALTER TABLE RENAME COLUMN, writes still succeed and events keep
    the old key; status says outdated; install-triggers switches to the new name."""
    sqlite_db(ORDERS)
    app, ext = listening(sqlite_app, "orders")
    sqlite_db("ALTER TABLE orders RENAME COLUMN item TO thing")
    assert ext.status(app).watches == {"orders": "outdated"}
    sqlite_db("INSERT INTO orders VALUES (1, 'a', 1)")
    (before,) = events.wait_for(1)
    assert before.new == {"id": 1, "item": "a", "qty": 1}
    ext.install_triggers(app)
    assert ext.status(app).watches == {"orders": "installed"}
    sqlite_db("UPDATE orders SET thing = 'b'")
    _, after = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    assert after.changed == {"thing"} and after.new == {"id": 1, "thing": "b", "qty": 1}


def test_table_names_match_without_regard_to_case(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """As in SQLite itself, watch("ORDERS") covers table orders; the sender
    is the name as given."""
    sqlite_db(ORDERS)
    app, ext = listening(sqlite_app, "ORDERS")
    assert ext.status(app).watches == {"ORDERS": "installed"}
    sqlite_db("INSERT INTO orders VALUES (1, 'a', 1)")
    (event,) = events.wait_for(1)
    events.assert_no_more(1, marker(ext, app))
    assert (event.table, event.pk) == ("ORDERS", 1)


def test_uninstall_everything_drops_journal_and_listeners(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB
) -> None:
    """uninstall_triggers(everything=True) removes every dbnotify object,
    dbnotify_journal and dbnotify_listeners included; notify() then says
    how to fix it."""
    sqlite_db(ORDERS)
    app, ext = sqlite_app(DBNOTIFY_PAYLOAD_RETENTION=0.2)
    ext.watch("orders")
    ext.install_triggers(app)
    ext.start(app)
    poll_until(
        lambda: sqlite_db("SELECT count(*) FROM dbnotify_listeners")[0][0],
        "the listener records its position in dbnotify_listeners",
    )
    tables = {name for kind, name in sqlite_db.objects() if kind == "table"}
    assert tables == {
        "dbnotify_journal",
        "dbnotify_shapes",
        "dbnotify_listeners",
        "dbnotify_receivers",
        "dbnotify_claims",
    }
    ext.stop(app)
    ext.uninstall_triggers(app, everything=True)
    assert sqlite_db.objects() == []
    assert sqlite_db("SELECT count(*) FROM orders") == [(0,)]
    with pytest.raises(DBNotifyError, match="install-triggers"):
        ext.notify("cache", "x", app=app)


def test_cli_replay_for_a_receiver_when_there_are_none(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """`replay --receiver NAME` in an app without on() receivers is a usage
    error that says so; without --receiver the row signals get the events."""
    sqlite_db(ORDERS)
    app, ext = sqlite_app()
    ext.watch("orders")
    ext.install_triggers(app)
    sqlite_db("INSERT INTO orders VALUES (1, 'tea', 1)")
    runner = app.test_cli_runner()
    result = runner.invoke(args=["dbnotify", "replay", "--since", "1", "--receiver", "app.nope"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "no receiver is named 'app.nope': the app has no receivers" in message
    assert "known are" not in message
    assert events.items == []

    result = runner.invoke(args=["dbnotify", "replay", "--since", "1"])
    assert result.exit_code == 0, result.output
    assert "replayed 1 event(s)" in result.output
    assert [e.pk for e in events.items] == [1]


# -- row events ------------------------------------------------------------------


def test_update_changes_name_exactly_the_changed_columns(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """changed names exactly the columns whose value changed, including a
    change to or from NULL and a change of primary key."""
    sqlite_db("CREATE TABLE notes (id INTEGER PRIMARY KEY, a TEXT, b INTEGER, c REAL, d BLOB)")
    sqlite_db("INSERT INTO notes VALUES (1, 'x', 1, 1.5, x'00')")
    app, ext = listening(sqlite_app, "notes")
    sqlite_db("UPDATE notes SET a = NULL, b = 1, c = 1.5")
    sqlite_db("UPDATE notes SET a = 'y', d = x'01'")
    sqlite_db("UPDATE notes SET id = 2, b = 2, c = 1.5")
    first, second, third = events.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    assert first.changed == {"a"} and first.new["a"] is None
    assert second.changed == {"a", "d"}
    assert third.changed == {"id", "b"}
    assert third.pk == 2 and third.old["id"] == 1


def test_one_transaction_of_many_rows_arrives_whole_and_in_order(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """12,001 rows inserted and then updated in one transaction each arrive
    once, in order, with strictly increasing ids."""
    sqlite_db(ORDERS)
    app, ext = listening(sqlite_app, "orders")
    sqlite_db(
        "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 12001) "
        "INSERT INTO orders SELECT n, 'bulk', n * 3 FROM g"
    )
    sqlite_db("UPDATE orders SET qty = qty + 1 WHERE id % 2 = 0")
    got = events.wait_for(12001 + 6000, timeout=3 * WAIT)
    events.assert_no_more(12001 + 6000, marker(ext, app))
    assert [e.pk for e in got[:12001]] == list(range(1, 12002))
    assert all(e.op == "INSERT" and e.new["qty"] == e.pk * 3 for e in got[:12001])
    assert [e.pk for e in got[12001:]] == list(range(2, 12002, 2))
    assert all(e.op == "UPDATE" and e.changed == {"qty"} for e in got[12001:])
    ids = [e.id for e in got]
    assert all(a < b for a, b in zip(ids, ids[1:], strict=False))


def test_sqlite_values_arrive_as_json(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder, decoder: str
) -> None:
    """BLOBs arrive as hex strings; unicode text, NULL, INTEGER (to 64 bits)
    and REAL values arrive as written."""
    sqlite_db(
        "CREATE TABLE vals (id INTEGER PRIMARY KEY, data BLOB, empty BLOB, "
        "txt TEXT, n INTEGER, big INTEGER, neg INTEGER, r REAL, tiny REAL, huge REAL, none TEXT)"
    )
    app, ext = listening(sqlite_app, "vals")
    text = "ünïcödé 🐍 中文 \"quoted\" 'single' back\\slash \n\t\x01 end"
    row = (1, b"\x00\x01\xffdata", b"", text, 0, 2**63 - 1, -(2**63), 2.5, 1e-300, -1.5e300, None)
    sqlite_db("INSERT INTO vals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    (event,) = events.wait_for(1)
    events.assert_no_more(1, marker(ext, app))
    assert event.new == {
        "id": 1,
        "data": "0001FF64617461",
        "empty": "",
        "txt": text,
        "n": 0,
        "big": 2**63 - 1,
        "neg": -(2**63),
        "r": 2.5,
        "tiny": 1e-300,
        "huge": -1.5e300,
        "none": None,
    }


def test_real_values_arrive_exactly(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder, decoder: str
) -> None:
    """A REAL arrives as the same float that was written (PostgreSQL's float8
    does): 17 significant digits, not 15."""
    values = [math.pi, 0.1 + 0.2, 1 / 3, 123456789.12345679, 2.0**0.5]
    sqlite_db("CREATE TABLE measures (id INTEGER PRIMARY KEY, v REAL)")
    app, ext = listening(sqlite_app, "measures")
    for n, value in enumerate(values):
        sqlite_db("INSERT INTO measures VALUES (?, ?)", (n, value))
    got = events.wait_for(len(values))
    events.assert_no_more(len(values), marker(ext, app))
    assert [e.new["v"] for e in got] == values


#: One column of each affinity SQLite knows, and the rowid.
EVERY_AFFINITY = (
    "CREATE TABLE anything (id INTEGER PRIMARY KEY, t TEXT, v VARCHAR(5), i INT, "
    "n NUMERIC, r REAL, d DOUBLE, b BLOB, x, j JSON)"
)
#: What a writer may put in any of them: SQLite stores some as another type.
ANY_VALUE = [b"\x00\xffz", 0.1 + 0.2, 2**62 + 1, "12", "1.5", " text ", None, 7.0, 1e300]


def as_delivered(value: Any) -> Any:
    """A value as SELECT returns it, as events carry it: BLOBs as hex."""
    return value.hex().upper() if isinstance(value, bytes) else value


def test_every_value_arrives_as_select_returns_it_in_columns_of_every_affinity(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder, decoder: str
) -> None:
    """Whatever type SQLite stored in a column of any affinity (a number in
    TEXT becomes text, '12' in INT a number, a blob stays a blob), the
    event's values are what a SELECT of the row returns, on insert, update
    and delete. The triggers skip the checks a column's affinity makes
    needless, so each affinity gets every kind of value."""
    sqlite_db(EVERY_AFFINITY)
    app, ext = listening(sqlite_app, "anything")
    columns = ["t", "v", "i", "n", "r", "d", "b", "x", "j"]
    stored = []
    for n, value in enumerate(ANY_VALUE):
        sqlite_db(
            f"INSERT INTO anything VALUES ({n}, {', '.join('?' * len(columns))})",
            [value] * len(columns),
        )
        stored.append(sqlite_db("SELECT * FROM anything WHERE id = ?", (n,))[0])
    # Every column to the next value: each row changes type in every column.
    sqlite_db(
        "UPDATE anything SET (" + ", ".join(columns) + ") = "
        "(SELECT " + ", ".join(f"o.{c}" for c in columns) + " FROM anything AS o "
        f"WHERE o.id = (anything.id + 1) % {len(ANY_VALUE)})"
    )
    updated = sqlite_db("SELECT * FROM anything ORDER BY id")
    sqlite_db("DELETE FROM anything")
    count = 3 * len(ANY_VALUE)
    got = events.wait_for(count)
    events.assert_no_more(count, marker(ext, app))
    names = ["id", *columns]

    def row(values: tuple[Any, ...]) -> dict[str, Any]:
        return {c: as_delivered(v) for c, v in zip(names, values, strict=True)}

    assert [e.new for e in got[: len(ANY_VALUE)]] == [row(r) for r in stored]
    by_pk = {e.pk: e for e in got[len(ANY_VALUE) : 2 * len(ANY_VALUE)]}
    assert [by_pk[r[0]].new for r in updated] == [row(r) for r in updated]
    assert [by_pk[r[0]].old for r in updated] == [row(r) for r in stored]
    assert [e.old for e in got[2 * len(ANY_VALUE) :]] == [row(r) for r in updated]
    # The values did change type: the check above covers mixed types.
    assert {type(v) for v in stored[0][1:]} >= {bytes}
    assert {type(v) for r in stored for v in r[1:]} == {bytes, float, int, str, type(None)}


@pytest.mark.parametrize(
    "ddl",
    [
        "CREATE TABLE keyed (id INTEGER PRIMARY KEY DESC, v TEXT)",
        "CREATE TABLE keyed (id INTEGER PRIMARY KEY, v TEXT) WITHOUT ROWID",
        "CREATE TABLE keyed (id INT PRIMARY KEY, v TEXT)",
    ],
    ids=["desc", "without-rowid", "int"],
)
def test_an_integer_key_that_is_not_the_rowid_may_hold_text_and_blobs(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder, ddl: str
) -> None:
    """Only a lone ``INTEGER PRIMARY KEY`` of a rowid table is the rowid,
    whose values are always integers: these keys look like it, but hold
    anything, and arrive as stored."""
    sqlite_db(ddl)
    app, ext = listening(sqlite_app, "keyed")
    sqlite_db("INSERT INTO keyed VALUES ('abc', 'a'), (x'0102', 'b'), (3, 'c')")
    got = events.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    assert sorted((str(e.pk), e.new["v"]) for e in got) == [("0102", "b"), ("3", "c"), ("abc", "a")]


def test_a_case_only_change_in_a_nocase_column_is_an_update(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """'Bob' to 'bob' under the column's NOCASE collation is still a change
    of the stored value: it arrives, with the column in ``changed``."""
    sqlite_db("CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT COLLATE NOCASE, n INT)")
    sqlite_db("INSERT INTO people VALUES (1, 'Bob@Example.com', 1)")
    app, ext = listening(sqlite_app, "people")
    sqlite_db("UPDATE people SET email = lower(email)")
    (event,) = events.wait_for(1)
    events.assert_no_more(1, marker(ext, app))
    assert event.changed == {"email"}
    assert (event.old["email"], event.new["email"]) == ("Bob@Example.com", "bob@example.com")


def test_a_writer_without_a_columns_custom_collation_can_still_write(
    sqlite_app: SqliteApp, sqlite_path: str, events: Recorder
) -> None:
    """A column may use a collation the app registers on its own
    connections; the triggers compare values byte for byte, so a writer
    that lacks the collation (a script, the sqlite3 shell) still writes,
    and its changes arrive."""
    maker = sqlite3.connect(sqlite_path, isolation_level=None)
    maker.create_collation("app_order", lambda a, b: (a > b) - (a < b))
    maker.execute(
        "CREATE TABLE tags "
        "(id INTEGER PRIMARY KEY, name TEXT COLLATE app_order, n INT COLLATE app_order)"
    )
    maker.close()
    app, ext = listening(sqlite_app, "tags")
    writer = SQLiteDB(sqlite_path)
    try:
        writer("INSERT INTO tags VALUES (1, 'a', 1)")
        writer("UPDATE tags SET name = 'b', n = 2")
        writer("DELETE FROM tags")
    finally:
        writer.close()
    got = events.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    assert [(e.op.value, e.changed) for e in got] == [
        ("INSERT", frozenset()),
        ("UPDATE", {"name", "n"}),
        ("DELETE", frozenset()),
    ]


def test_one_megabyte_row_arrives_whole(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """A 1 MB text value is written and delivered intact, on insert, update
    (old and new) and delete."""
    sqlite_db("CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)")
    app, ext = listening(sqlite_app, "docs")
    body = ("żółw 🐢 " * 100_000)[:1_000_000]
    sqlite_db("INSERT INTO docs VALUES (1, ?)", (body,))
    sqlite_db("UPDATE docs SET body = body || '!'")
    sqlite_db("DELETE FROM docs")
    ins, upd, dele = events.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    assert ins.new["body"] == body
    assert upd.old["body"] == body and upd.new["body"] == body + "!"
    assert dele.old["body"] == body + "!"


def test_rows_over_the_limit_arrive_cut_and_the_write_succeeds(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """A row whose values exceed MAX_ROW_BYTES is journaled cut: its key
    only, with event.cut set; the other rows arrive whole. (A few times
    larger, its JSON would pass SQLite's string limit and fail the write.)"""
    from flask_dbnotify.backends.sqlite import MAX_ROW_BYTES

    sqlite_db("CREATE TABLE docs (id INTEGER, part TEXT, body TEXT, PRIMARY KEY (id, part))")
    app, ext = listening(sqlite_app, "docs")
    big = "\x01" * (MAX_ROW_BYTES + 1)
    sqlite_db("INSERT INTO docs VALUES (1, 'a', 'small'), (2, 'b', ?)", (big,))
    sqlite_db("UPDATE docs SET body = body || 'x'")
    sqlite_db("DELETE FROM docs")
    got = events.wait_for(6)
    events.assert_no_more(6, marker(ext, app))
    assert [(e.op.value, e.pk, e.cut, e.new, e.old) for e in got] == [
        ("INSERT", (1, "a"), False, {"id": 1, "part": "a", "body": "small"}, None),
        ("INSERT", (2, "b"), True, {"id": 2, "part": "b"}, None),
        (
            "UPDATE",
            (1, "a"),
            False,
            {"id": 1, "part": "a", "body": "smallx"},
            {"id": 1, "part": "a", "body": "small"},
        ),
        ("UPDATE", (2, "b"), True, {"id": 2, "part": "b"}, {"id": 2, "part": "b"}),
        ("DELETE", (1, "a"), False, None, {"id": 1, "part": "a", "body": "smallx"}),
        ("DELETE", (2, "b"), True, None, {"id": 2, "part": "b"}),
    ]
    assert all(e.changed == frozenset() for e in got if e.cut)


def test_a_large_value_in_a_numeric_column_is_counted_towards_the_cut(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """Text and blobs in a column of numeric affinity count towards the
    limit as in a TEXT column (the triggers size such columns another way)."""
    from flask_dbnotify.backends.sqlite import MAX_ROW_BYTES

    sqlite_db("CREATE TABLE counts (id INTEGER PRIMARY KEY, n INT, r REAL)")
    app, ext = listening(sqlite_app, "counts")
    half = MAX_ROW_BYTES // 2 + 1
    sqlite_db(
        "INSERT INTO counts VALUES (1, ?, ?), (2, 5, 2.5)", ("1" * half + "x", b"\x00" * half)
    )
    got = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    assert [(e.pk, e.cut, e.new) for e in got] == [
        (1, True, {"id": 1}),
        (2, False, {"id": 2, "n": 5, "r": 2.5}),
    ]


class Color(enum.Enum):
    RED = "r"
    GREEN = "g"


def test_instance_builds_python_values_from_what_sqlalchemy_stored(
    sqlite_app: SqliteApp, events: Recorder, engine: sa.Engine
) -> None:
    """Rows written through the SQLAlchemy ORM come back from
    event.instance(Model) with Python types: datetime, date, time, Decimal,
    bool, bytes, UUID, Enum, and None."""

    class Base(DeclarativeBase):
        pass

    class Thing(Base):
        __tablename__ = "things"
        id: Mapped[int] = mapped_column(primary_key=True)
        at: Mapped[dt.datetime] = mapped_column(sa.DateTime)
        at_whole: Mapped[dt.datetime] = mapped_column(sa.DateTime)
        day: Mapped[dt.date] = mapped_column(sa.Date)
        clock: Mapped[dt.time] = mapped_column(sa.Time)
        price: Mapped[Decimal] = mapped_column(sa.Numeric(12, 2))
        flag: Mapped[bool] = mapped_column(sa.Boolean)
        off: Mapped[bool] = mapped_column(sa.Boolean)
        data: Mapped[bytes] = mapped_column(sa.LargeBinary)
        ref: Mapped[uuid.UUID] = mapped_column(sa.Uuid)
        color: Mapped[Color] = mapped_column(sa.Enum(Color))
        note: Mapped[str | None] = mapped_column(sa.Text, nullable=True)

    Base.metadata.create_all(engine)
    app, ext = listening(sqlite_app, Thing)
    at = dt.datetime(2024, 5, 1, 12, 34, 56, 123456)
    values: dict[str, Any] = {
        "id": 1,
        "at": at,
        "at_whole": dt.datetime(2024, 5, 1, 0, 0, 0),
        "day": dt.date(2024, 2, 29),
        "clock": dt.time(23, 59, 58, 7),
        "price": Decimal("1234.56"),
        "flag": True,
        "off": False,
        "data": b"\x00\x01\xffdata",
        "ref": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "color": Color.GREEN,
        "note": None,
    }
    with Session(engine) as session:
        session.add(Thing(**values))
        session.commit()
    (event,) = events.wait_for(1)
    assert event.table == "things"
    assert event.new["at"] == "2024-05-01 12:34:56.123456"  # as SQLAlchemy stores it
    assert event.new["flag"] == 1 and event.new["data"] == "0001FF64617461"

    thing = event.instance(Thing)
    assert isinstance(thing, Thing)
    assert sa.inspect(thing).transient
    assert {key: getattr(thing, key) for key in values} == values
    assert isinstance(thing.price, Decimal)
    assert thing.flag is True and thing.off is False

    with Session(engine) as session:
        session.execute(sa.delete(Thing))
        session.commit()
    _, deleted = events.wait_for(2)
    gone = deleted.instance(Thing)
    assert {key: getattr(gone, key) for key in values} == values


# -- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["table", "string"])
def test_quoted_table_and_column_names(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder, form: str
) -> None:
    """A table with capitals, spaces and a double quote in its name, and a
    column with a space and a quote, work as a SQLAlchemy Table and as a string."""
    table, column = 'Order "Big" Items', 'Qty "Ordered"'
    sqlite_db(
        f"CREATE TABLE {quote(table)} (id INTEGER PRIMARY KEY, {quote(column)} INTEGER, other TEXT)"
    )
    target: Any
    if form == "table":
        target = sa.Table(
            table,
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column(column, sa.Integer),
            sa.Column("other", sa.Text),
        )
    else:
        target = table
    app, ext = listening(sqlite_app, target, columns=[column], when_changed=[column])
    assert ext.status(app).watches == {table: "installed"}
    own = Recorder()
    with row_changed.connected_to(own, sender=table):
        sqlite_db(f"INSERT INTO {quote(table)} VALUES (1, 5, 'a')")
        sqlite_db(f"UPDATE {quote(table)} SET other = 'b'")
        sqlite_db(f"UPDATE {quote(table)} SET {quote(column)} = 6")
        sqlite_db(f"DELETE FROM {quote(table)}")
        got = own.wait_for(3)
        events.assert_no_more(3, marker(ext, app))
    assert [e.op.value for e in got] == ["INSERT", "UPDATE", "DELETE"]
    assert all(e.table == table and e.pk == 1 for e in got)
    assert got[0].new == {"id": 1, column: 5}
    assert got[1].old == {"id": 1, column: 5} and got[1].new == {"id": 1, column: 6}
    assert got[1].changed == {column}
    assert got[2].old == {"id": 1, column: 6}


# -- notify() --------------------------------------------------------------------------


# -- writers and listeners in other processes ----------------------------------------


SQLITE3_WRITER = """
import sqlite3, sys
path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = sqlite3.connect(path, timeout=30, isolation_level=None)
for i in range(count):
    conn.execute("BEGIN IMMEDIATE")
    (n,) = conn.execute("UPDATE seq SET n = n + 1 RETURNING n").fetchone()
    conn.execute("INSERT INTO orders (seq, writer, i) VALUES (?, ?, ?)", (n, name, i))
    if i % 5 == 4:
        conn.execute("UPDATE orders SET i = i WHERE seq = ?", (n,))  # a no-op
    conn.execute("COMMIT")
conn.close()
"""

SQLALCHEMY_WRITER = """
import sys
import threading
import sqlalchemy as sa
path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = sa.create_engine("sqlite:///" + path, connect_args={"timeout": 30})
for i in range(count):
    with engine.begin() as conn:
        n = conn.execute(sa.text("UPDATE seq SET n = n + 1 RETURNING n")).scalar_one()
        conn.execute(
            sa.text("INSERT INTO orders (seq, writer, i) VALUES (:n, :w, :i)"),
            {"n": n, "w": name, "i": i},
        )
engine.dispose()
"""

SEQ_ORDERS = "CREATE TABLE orders (seq INTEGER PRIMARY KEY, writer TEXT, i INTEGER)"


def seq_tables(sqlite_db: SQLiteDB) -> None:
    """``orders`` rows carry ``seq``, a counter bumped in the same transaction,
    so ``seq`` is the commit order."""
    sqlite_db(SEQ_ORDERS)
    sqlite_db("CREATE TABLE seq (n INTEGER NOT NULL)")
    sqlite_db("INSERT INTO seq VALUES (0)")


def test_writers_in_other_processes_arrive_in_commit_order_once(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, sqlite_path: str, events: Recorder
) -> None:
    """Three writer processes (two with sqlite3, one with SQLAlchemy) commit
    concurrently: every commit arrives exactly once, in commit order, with
    strictly increasing ids."""
    seq_tables(sqlite_db)
    app, ext = listening(sqlite_app, "orders")
    count = 40
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, sqlite_path, name, str(count)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for code, name in [
            (SQLITE3_WRITER, "sqlite3-a"),
            (SQLALCHEMY_WRITER, "sqlalchemy"),
            (SQLITE3_WRITER, "sqlite3-b"),
        ]
    ]
    for proc in procs:
        assert proc.stderr is not None
        with proc.stderr:
            try:
                assert proc.wait(timeout=3 * WAIT) == 0, proc.stderr.read().decode()
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"writer {proc.args!r} still running") from None
    total = 3 * count
    got = events.wait_for(total, timeout=3 * WAIT)
    events.assert_no_more(total, marker(ext, app))
    assert all(e.op == "INSERT" for e in got)
    assert [e.pk for e in got] == list(range(1, total + 1))
    for name in ("sqlite3-a", "sqlalchemy", "sqlite3-b"):
        assert [e.new["i"] for e in got if e.new["writer"] == name] == list(range(count))
    ids = [e.id for e in got]
    assert all(a < b for a, b in zip(ids, ids[1:], strict=False))


def test_two_listening_processes_each_get_every_event_once(
    sqlite_app: SqliteApp,
    sqlite_db: SQLiteDB,
    sqlite_path: str,
    events: Recorder,
    spawn: Callable[..., tuple[subprocess.Popen[bytes], Lines]],
) -> None:
    """A Flask app listening in another process and the test's own listener
    each receive every change from two writer processes and the test
    process, exactly once and in the same order."""
    seq_tables(sqlite_db)
    app, ext = listening(sqlite_app, "orders")
    proc, lines = spawn(
        "-m", "tests.sqlite_writers.listen_app", sqlite_path, "orders", name="listener"
    )
    assert json.loads(lines.readline("the ready line")) == {"ready": True}

    run_python(SQLITE3_WRITER, sqlite_path, "proc", "25")
    sqlite_db("BEGIN IMMEDIATE")
    sqlite_db("UPDATE seq SET n = n + 1")
    sqlite_db("INSERT INTO orders SELECT n, 'test', 0 FROM seq")
    sqlite_db("COMMIT")
    run_python(SQLALCHEMY_WRITER, sqlite_path, "sa", "25")
    sqlite_db("UPDATE orders SET writer = 'renamed' WHERE seq = 26")
    sqlite_db("DELETE FROM orders WHERE seq = 1")
    ext.notify("done", {"n": 53}, app=app)

    here = events.wait_for(54)
    events.assert_no_more(54, marker(ext, app))
    there: list[dict[str, Any]] = []
    while True:
        item = json.loads(lines.readline(f"line {len(there) + 1} of the other listener"))
        if item.get("channel") == "done":
            break
        there.append(item)
    assert item == {"channel": "done", "payload": {"n": 53}}
    assert json.loads(lines.readline("the marker")) == {"channel": "marker", "payload": "end"}
    finish(proc, "the listening process")
    assert proc.stdout is not None
    assert lines.buf + proc.stdout.read() == b"", "the other listener printed more"

    mine = [(e.table, e.op.value, e.pk, e.new, e.old, e.id) for e in here[:53]]
    theirs = [(t["table"], t["op"], t["pk"], t["new"], t["old"], t["id"]) for t in there]
    assert theirs == mine
    assert [e.pk for e in here[:51]] == list(range(1, 52))
    assert [(e.op.value, e.pk) for e in here[51:53]] == [("UPDATE", 26), ("DELETE", 1)]


# -- locking: the listener never blocks writers, and writers never break it --------


def journal_mode(path: str) -> str:
    """The journal mode recorded in the database file, as a new connection sees it."""
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


def test_install_and_start_put_the_database_in_wal_mode(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, sqlite_path: str, tmp_path: Path
) -> None:
    """install_triggers() switches a rollback-journal database to WAL, so
    readers never block writers; so does start() on a database whose
    triggers were installed from the printed SQL."""
    sqlite_db(ORDERS)
    assert journal_mode(sqlite_path) == "delete"
    app, ext = sqlite_app()
    ext.watch("orders")
    ext.install_triggers(app)
    assert journal_mode(sqlite_path) == "wal"

    other_path = str(tmp_path / "other.db")
    other = SQLiteDB(other_path)
    try:
        other(ORDERS)
        other.conn.executescript("\n".join(s + ";" for s in ext.install_sql(app)))
        assert journal_mode(other_path) == "delete"
        other_app, other_ext = sqlite_app(DBNOTIFY_DATABASE_URI="sqlite:///" + other_path)
        other_ext.watch("orders")
        assert other_ext.status(other_app).watches == {"orders": "installed"}
        other_ext.start(other_app)
        assert journal_mode(other_path) == "wal"
    finally:
        other.close()


HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO orders VALUES (1, 'held', 1)")
print("holding", flush=True)
time.sleep(float(sys.argv[2]))  # the scenario: a slow transaction holds the write lock
conn.execute("COMMIT")
print("committed", flush=True)
conn.close()
"""


def test_writer_holding_the_write_lock_does_not_break_the_listener(
    sqlite_app: SqliteApp,
    sqlite_db: SQLiteDB,
    sqlite_path: str,
    events: Recorder,
    spawn: Callable[..., tuple[subprocess.Popen[bytes], Lines]],
) -> None:
    """A writer process that holds a write transaction open for a second,
    while the listener polls, probes and prunes often, does not make the
    listener fail: the held row and later rows arrive."""
    sqlite_db(ORDERS)
    app, ext = sqlite_app(DBNOTIFY_PAYLOAD_RETENTION=0.2, DBNOTIFY_PROBE_INTERVAL=0.05)
    ext.watch("orders")
    ext.install_triggers(app)
    disconnected, connected = Recorder(), Recorder()
    with (
        listener_disconnected.connected_to(disconnected),
        listener_connected.connected_to(connected),
    ):
        ext.start(app)
        proc, lines = spawn("-c", HOLDER, sqlite_path, "1.0", name="holder")
        assert lines.readline("holding") == "holding"
        sqlite_db("INSERT INTO orders VALUES (2, 'waited', 1)")  # waits for the lock
        assert lines.readline("committed") == "committed"
        finish(proc, "the holder")
        sqlite_db("INSERT INTO orders VALUES (3, 'after', 1)")
        got = events.wait_for(3)
        events.assert_no_more(3, marker(ext, app))
        assert ext.is_running(app)
    assert [(e.pk, e.new["item"]) for e in got] == [(1, "held"), (2, "waited"), (3, "after")]
    assert disconnected.items == []
    assert len(connected.items) == 1


BURST = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=float(sys.argv[3]), isolation_level=None)
for i in range(int(sys.argv[2])):
    conn.execute("BEGIN")
    conn.execute("INSERT INTO orders (item, qty) VALUES ('burst', ?)", (i,))
    conn.execute("COMMIT")
conn.close()
"""


@pytest.mark.parametrize(
    ("config", "writer_timeout"),
    [({}, "0"), ({"DBNOTIFY_PAYLOAD_RETENTION": 0.2}, "5")],
    ids=["busy-timeout-0", "pruning-often"],
)
def test_back_to_back_commits_are_never_locked_out(
    sqlite_app: SqliteApp,
    sqlite_db: SQLiteDB,
    sqlite_path: str,
    events: Recorder,
    config: dict[str, Any],
    writer_timeout: str,
) -> None:
    """A writer process commits 200 single-row transactions back to back
    while the listener reads them: no "database is locked", every row
    arrives in order. With default settings the listener never takes the
    write lock, so even a writer with no busy timeout succeeds."""
    sqlite_db(ORDERS)
    app, ext = sqlite_app(**config)
    ext.watch("orders")
    ext.install_triggers(app)
    ext.start(app)
    run_python(BURST, sqlite_path, "200", writer_timeout)
    got = events.wait_for(200)
    events.assert_no_more(200, marker(ext, app))
    assert [e.new["qty"] for e in got] == list(range(200))


def test_a_slow_receiver_holds_no_lock(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, sqlite_path: str, events: Recorder
) -> None:
    """While the listener thread is busy in a slow receiver, a writer process
    with no busy timeout commits 50 transactions; they all arrive afterwards."""
    sqlite_db(ORDERS)
    app, ext = listening(sqlite_app, "orders")
    entered, released = threading.Event(), threading.Event()

    def slow(sender: Any, event: ChangeEvent, **extra: Any) -> None:
        if event.pk == 1:
            entered.set()
            released.wait(3 * WAIT)

    with row_inserted.connected_to(slow, sender="orders"):
        sqlite_db("INSERT INTO orders VALUES (1, 'first', -1)")
        assert entered.wait(WAIT), "the receiver was not called for the first row"
        try:
            run_python(BURST, sqlite_path, "50", "0")
        finally:
            released.set()
        got = events.wait_for(51)
        events.assert_no_more(51, marker(ext, app))
    assert [e.new["qty"] for e in got] == [-1, *range(50)]


# -- journal pruning -------------------------------------------------------------------


def listener_rows(sqlite_db: SQLiteDB) -> dict[str, tuple[int, float]]:
    """``name -> (position, seen_at)`` from dbnotify_listeners."""
    rows = sqlite_db("SELECT name, position, seen_at FROM dbnotify_listeners")
    return {name: (position, seen_at) for name, position, seen_at in rows}


def listener_name(app: Flask) -> str:
    return str(app.extensions["dbnotify"].listener._feed.name)


def test_journal_is_pruned_once_read_and_delivery_goes_on(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """With DBNOTIFY_PAYLOAD_RETENTION=0.2, journal rows the listener has read
    are deleted once older than that; later changes still arrive, with
    larger ids. status() still shows the last id given out."""
    sqlite_db(ORDERS)
    app, ext = sqlite_app(DBNOTIFY_PAYLOAD_RETENTION=0.2)
    ext.watch("orders")
    ext.install_triggers(app)
    assert ext.status(app).health["journal"] == "0 rows, none written yet"
    ext.start(app)
    for n in range(1, 21):
        sqlite_db("INSERT INTO orders VALUES (?, 'x', 1)", (n,))
    got = events.wait_for(20)
    assert len({e.id for e in got}) == 20  # each came from its own journal row
    poll_until(
        lambda: sqlite_db("SELECT count(*) FROM dbnotify_journal") == [(0,)],
        "the listener prunes the 20 journal rows it has read",
    )
    last_id = max(e.id for e in got if e.id is not None)
    assert ext.status(app).health["journal"] == f"0 rows, last id {last_id}"
    sqlite_db("INSERT INTO orders VALUES (21, 'x', 1)")
    (later,) = events.wait_for(21)[20:]
    events.assert_no_more(21, marker(ext, app))
    assert later.pk == 21
    assert later.id is not None and later.id > max(e.id for e in got)


def test_rows_a_stopped_listener_has_not_read_survive_pruning(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB
) -> None:
    """Another listener prunes only what every live listener has read: rows
    past a stopped listener's recorded position stay, and that listener gets
    them all after start()."""
    sqlite_db(ORDERS)
    seen = Recorder()

    def receiver(sender: Any, event: ChangeEvent, **extra: Any) -> None:
        seen.add((current_app.name, event.pk))

    app_a, ext_a = sqlite_app(DBNOTIFY_PAYLOAD_RETENTION=0.2)
    app_b, ext_b = sqlite_app(DBNOTIFY_PAYLOAD_RETENTION=0.2)
    for ext in (ext_a, ext_b):
        ext.watch("orders")
    ext_a.install_triggers(app_a)
    name_a, name_b = listener_name(app_a), listener_name(app_b)
    assert name_a != name_b
    with row_changed.connected_to(receiver):
        ext_a.start(app_a)
        ext_b.start(app_b)
        for n in range(1, 6):
            sqlite_db("INSERT INTO orders VALUES (?, 'first', 1)", (n,))
        seen.wait_for(10)
        last_read = sqlite_db.journal_ids()[-1]
        poll_until(
            lambda: listener_rows(sqlite_db).get(name_b, (0, 0.0))[0] >= last_read,
            "the second listener records that it read the first rows",
        )
        ext_b.stop(app_b)
        position_b = listener_rows(sqlite_db)[name_b][0]

        for n in range(6, 16):
            sqlite_db("INSERT INTO orders VALUES (?, 'second', 1)", (n,))
        seen.wait_for(20)
        newest = sqlite_db("SELECT max(id), max(created_at) FROM dbnotify_journal")[0]

        def pruned_after_retention() -> bool:
            position, seen_at = listener_rows(sqlite_db)[name_a]
            return bool(position >= newest[0] and seen_at > newest[1] + 0.3)

        poll_until(pruned_after_retention, "the first listener prunes after reading every row")
        ids = sqlite_db.journal_ids()
        assert [i for i in ids if i <= position_b] == []  # pruning did run
        assert [i for i in ids if i > position_b] == list(range(position_b + 1, newest[0] + 1))

        del seen.items[:]
        ext_b.start(app_b)
        seen.wait_for(10)
        # The marker: a row both listeners get after anything pending.
        sqlite_db("INSERT INTO orders VALUES (99, 'marker', 1)")
        got = seen.wait_for(12)
    assert sorted(got[:10]) == [(app_b.name, pk) for pk in range(6, 16)]
    assert sorted(got[10:]) == [(app_a.name, 99), (app_b.name, 99)]


# -- stop(), start() and reconnecting ---------------------------------------------------


def gated_listener(
    sqlite_app: SqliteApp, **config: Any
) -> tuple[Flask, DBNotify, threading.Event, threading.Event]:
    """A listener on orders whose receiver holds the event of pk 1 until
    the gate opens: what is committed meanwhile waits in its queue."""
    blocked, gate = threading.Event(), threading.Event()
    app, ext = sqlite_app(**config)
    ext.watch("orders")

    @ext.on("orders", "insert")
    def hold(event: ChangeEvent) -> None:
        if event.pk == 1:
            blocked.set()
            assert gate.wait(WAIT), "the test never opened the gate"

    ext.install_triggers(app)
    ext.start(app)
    return app, ext, blocked, gate


def queue_behind_row_one(
    sqlite_db: SQLiteDB, app: Flask, ext: DBNotify, blocked: threading.Event, rows: int
) -> None:
    """With a :func:`gated_listener`: row 1 committed and held by its
    receiver, then rows 2 to ``rows`` in one transaction, until the reader
    has queued them behind it."""
    sqlite_db("INSERT INTO orders VALUES (1, 'held', 1)")
    assert blocked.wait(WAIT), "the first event never arrived"
    sqlite_db(
        "WITH RECURSIVE g(n) AS (SELECT 2 UNION ALL SELECT n + 1 FROM g WHERE n < ?) "
        "INSERT INTO orders SELECT n, 'waiting', n FROM g",
        (rows,),
    )
    poll_until(lambda: ext.listener_state(app).received >= rows, f"rows 2 to {rows} queued")


def test_pruning_keeps_the_rows_a_lagging_dispatcher_has_not_delivered(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """The reader hands the dispatcher spans of journal ids, and the
    dispatcher reads their rows when it gets to them. While a span waits
    behind a slow receiver, the position a listener records for pruning is
    what it has delivered, not what it has queued, so another process's
    pruning cannot delete rows it has yet to read. The receiver here holds
    the first event of the first transaction until the second transaction's
    span is queued and a prune has recorded the position."""
    sqlite_db(ORDERS)
    # Pruning as often as it goes (every millisecond): a prune queued while
    # the receiver holds the first event runs before the second span.
    app, ext, blocked, gate = gated_listener(sqlite_app, DBNOTIFY_PAYLOAD_RETENTION=0.002)
    try:
        # Both spans are queued: the reader has found all 1,001 ids.
        queue_behind_row_one(sqlite_db, app, ext, blocked, 1001)
    finally:
        gate.set()
    got = events.wait_for(1001, timeout=3 * WAIT)
    events.assert_no_more(1001, marker(ext, app))
    assert [e.pk for e in got] == list(range(1, 1002))


def test_a_journal_made_anew_while_rows_wait_delivers_each_new_row_once(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """The journal dropped and made anew (uninstall --all, install) while
    the old one's ids wait in the listener's queue: its ids restart, and
    the waiting ids must not be read from the new journal; each new row
    arrives once, in order."""
    sqlite_db(ORDERS)
    app, ext, blocked, gate = gated_listener(sqlite_app)
    try:
        queue_behind_row_one(sqlite_db, app, ext, blocked, 10)
        ext.uninstall_triggers(app, everything=True)
        ext.install_triggers(app)
        sqlite_db(
            "WITH RECURSIVE g(n) AS (SELECT 101 UNION ALL SELECT n + 1 FROM g WHERE n < 108) "
            "INSERT INTO orders SELECT n, 'new journal', n FROM g"
        )
        poll_until(lambda: ext.listener_state(app).received >= 18, "the new rows queued")
    finally:
        gate.set()
    got = events.wait_for(9)
    events.assert_no_more(9, marker(ext, app))
    # The old journal's rows, but the one being delivered, went with it.
    assert [e.pk for e in got] == [1, *range(101, 109)]


def test_rows_deleted_before_the_listener_read_them_are_reported_as_a_gap(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """Journal rows gone before the listener got to them (deleted by hand
    here; pruned after the listener was gone for long, in life) are not
    skipped silently: ``listener_connected`` says ``gap=True``, and the
    rows still there arrive."""
    sqlite_db(ORDERS)
    connected = Recorder()
    with listener_connected.connected_to(connected):
        app, ext, blocked, gate = gated_listener(sqlite_app)
        connected.wait_for(1, "listener_connected")
        try:
            queue_behind_row_one(sqlite_db, app, ext, blocked, 10)
            sqlite_db("DELETE FROM dbnotify_journal WHERE body LIKE '[4,%' OR body LIKE '[5,%'")
        finally:
            gate.set()
        got = events.wait_for(8)
        events.assert_no_more(8, marker(ext, app))
        gaps = [kw for kw in connected.wait_for(2, "listener_connected") if kw.get("gap")]
    assert [e.pk for e in got] == [1, 2, 3, 6, 7, 8, 9, 10]
    assert gaps and all(kw["reconnect"] for kw in gaps)


def test_a_row_that_cannot_be_decoded_is_skipped_alone(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """A journal row no event can be made of (here: a time no datetime
    holds, written by hand) is logged and skipped; the rows around it
    arrive."""
    sqlite_db(ORDERS)
    app, ext = listening(sqlite_app, "orders")
    sqlite_db("BEGIN")
    sqlite_db(
        "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 500) "
        "INSERT INTO orders SELECT n, 'row', n FROM g"
    )
    sqlite_db("UPDATE dbnotify_journal SET created_at = 1e300 WHERE body LIKE '[250,%'")
    sqlite_db("COMMIT")
    got = events.wait_for(499)
    events.assert_no_more(499, marker(ext, app))
    assert [e.pk for e in got] == [n for n in range(1, 501) if n != 250]


def test_changes_made_while_stopped_arrive_after_start(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """SQLite is journaled: rows and messages committed while the listener is
    stopped arrive after start(), in order, once; listener_connected says
    no gap. The first start begins at the end of the journal."""
    sqlite_db(ORDERS)
    app, ext = sqlite_app()
    ext.watch("orders")
    ext.install_triggers(app)
    sqlite_db("INSERT INTO orders VALUES (0, 'before the first start', 1)")
    connected = Recorder()
    with listener_connected.connected_to(connected):
        ext.start(app)
        sqlite_db("INSERT INTO orders VALUES (1, 'running', 1)")
        assert [e.pk for e in events.wait_for(1)] == [1]
        ext.stop(app)
        sqlite_db("INSERT INTO orders VALUES (2, 'stopped', 1)")
        sqlite_db("UPDATE orders SET qty = 2 WHERE id = 1")
        ext.notify("cache", "while stopped", app=app)
        sqlite_db("DELETE FROM orders WHERE id = 2")
        ext.start(app)
        got = events.wait_for(5)
        events.assert_no_more(5, marker(ext, app))
        kinds = connected.wait_for(2, "listener_connected")
    assert [(e.op.value, e.pk) if isinstance(e, ChangeEvent) else e for e in got[1:]] == [
        ("INSERT", 2),
        ("UPDATE", 1),
        "while stopped",
        ("DELETE", 2),
    ]
    assert [kwargs["gap"] for kwargs in kinds] == [False, False]


def test_listener_reconnects_after_a_failing_read_without_a_gap(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """When reading the journal fails (here: its column renamed under the
    listener), the listener reports the error, keeps retrying, and once the
    journal is readable again reconnects with gap=False and delivers what
    was committed meanwhile."""
    sqlite_db(ORDERS)
    app, ext = sqlite_app(DBNOTIFY_RECONNECT_MAX_DELAY=0.2)
    ext.watch("orders")
    ext.install_triggers(app)
    disconnected = Recorder()
    connected = Recorder()
    with (
        listener_disconnected.connected_to(disconnected),
        listener_connected.connected_to(connected),
    ):
        ext.start(app)
        sqlite_db("ALTER TABLE dbnotify_journal RENAME COLUMN body TO body_moved")
        sqlite_db("INSERT INTO orders VALUES (1, 'during', 1)")  # the trigger follows the rename
        (failure,) = disconnected.wait_for(1, "listener_disconnected")[:1]
        assert isinstance(failure["error"], Exception)
        sqlite_db("ALTER TABLE dbnotify_journal RENAME COLUMN body_moved TO body")
        sqlite_db("INSERT INTO orders VALUES (2, 'after', 1)")
        got = events.wait_for(2)
        events.assert_no_more(2, marker(ext, app))
        reconnects = [kw for kw in connected.wait_for(2, "listener_connected") if kw["reconnect"]]
    assert [e.pk for e in got] == [1, 2]
    assert reconnects and all(kw["gap"] is False for kw in reconnects)
    assert ext.is_running(app)


# -- database URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///shared.db?mode=memory",
        "sqlite:///file:mem1?mode=memory&uri=true",
    ],
)
def test_in_memory_database_is_refused_with_a_fix(uri: str) -> None:
    """An in-memory database cannot be shared with a listener: DBNotify(app)
    raises ValueError saying to use a file."""
    app = Flask("memory_app")
    app.config.update(DBNOTIFY_DATABASE_URI=uri, DBNOTIFY_AUTOSTART=False)
    with pytest.raises(ValueError, match=r"sqlite:///"):
        DBNotify(app)
    assert "dbnotify" not in app.extensions


def test_relative_url_is_the_file_flask_sqlalchemy_uses(tmp_path: Path, events: Recorder) -> None:
    """sqlite:///rel.db names a file under app.instance_path, as in
    Flask-SQLAlchemy, so both talk about the same database: rows added
    through sqlite_db.session arrive."""
    app = Flask("relative_app", instance_path=str(tmp_path / "instance"))
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite:///rel.db", DBNOTIFY_AUTOSTART=False)

    class Base(DeclarativeBase):
        pass

    fsa = SQLAlchemy(app, model_class=Base)

    class Note(fsa.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        text: Mapped[str]

    ext = DBNotify(app)
    backend = app.extensions["dbnotify"].backend
    try:
        assert backend.path == os.path.join(app.instance_path, "rel.db")
        with app.app_context():
            assert fsa.engine.url.database == backend.path
            fsa.create_all()
            ext.watch(Note)
            ext.install_triggers()
            ext.start()
            fsa.session.add(Note(id=1, text="hello"))
            fsa.session.commit()
            (event,) = events.wait_for(1)
            assert (event.table, event.pk, event.new) == (
                "notes",
                1,
                {"id": 1, "text": "hello"},
            )
            assert event.instance(Note).text == "hello"
    finally:
        ext.close(app)
        with app.app_context():
            fsa.engine.dispose()


def test_events_queued_at_stop_are_delivered_after_start(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """On SQLite, rows read but not yet delivered when stop() is called are
    delivered after the next start(): the journal keeps them."""
    sqlite_db(ORDERS)
    app, ext = listening(sqlite_app, "orders")
    entered, release = threading.Event(), threading.Event()

    @ext.on("orders", "insert", where={"item": "first"})
    def slow(event: Any) -> None:
        entered.set()
        release.wait(WAIT)

    sqlite_db("INSERT INTO orders VALUES (1, 'first', 1)")
    assert entered.wait(WAIT), "the first event did not reach its receiver"
    for n in range(2, 7):
        sqlite_db("INSERT INTO orders VALUES (?, 'later', 1)", (n,))
    poll_until(
        lambda: ext.listener_state(app).queued > 0,
        "the later rows were read while the receiver was busy",
    )
    stopper = threading.Thread(target=ext.stop, args=(app,))
    stopper.start()
    # The reader has gone once stop() has told the run to stop (the
    # dispatcher is still in the receiver): only then may it go on.
    poll_until(lambda: not ext.is_running(app), "stop() told the listener to stop")
    release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive(), "stop() did not return"
    assert [e.pk for e in events.items] == [1]
    ext.start(app)
    got = events.wait_for(6)
    assert [e.pk for e in got] == [1, 2, 3, 4, 5, 6]
    events.assert_no_more(6, marker(ext, app))


def test_printing_the_ddl_does_not_create_the_database(tmp_path: Path) -> None:
    """install_sql() for a database file that does not exist fails clearly
    and leaves no empty file behind (only install_triggers() creates one)."""
    missing = tmp_path / "nowhere.db"
    app = Flask("missing_db")
    app.config.update(DBNOTIFY_DATABASE_URI=f"sqlite:///{missing}", DBNOTIFY_AUTOSTART=False)
    ext = DBNotify(app)
    ext.watch("orders")
    with pytest.raises(DBNotifyError, match="cannot open"):
        ext.install_sql(app)
    assert not missing.exists()


def test_stop_during_a_burst_loses_nothing(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB, events: Recorder
) -> None:
    """stop() while a receiver holds up one batch and another batch waits
    behind it: after start(), every row arrives (the rest of the
    interrupted batch included), once."""
    sqlite_db(ORDERS)
    app, ext = listening(sqlite_app, "orders")
    entered, release = threading.Event(), threading.Event()

    @ext.on("orders", "insert", where={"item": "first"})
    def slow(event: Any) -> None:
        entered.set()
        release.wait(WAIT)

    sqlite_db("BEGIN")
    for n, item in ((1, "first"), (2, "b"), (3, "c")):
        sqlite_db("INSERT INTO orders VALUES (?, ?, 1)", (n, item))
    sqlite_db("COMMIT")
    assert entered.wait(WAIT), "the first batch did not reach its receiver"
    for n in range(4, 7):
        sqlite_db("INSERT INTO orders VALUES (?, 'later', 1)", (n,))
    poll_until(lambda: ext.listener_state(app).queued > 0, "the second batch to be queued")
    stopper = threading.Thread(target=ext.stop, args=(app,))
    stopper.start()
    poll_until(lambda: not ext.is_running(app), "the reader to stop while the receiver waits")
    release.set()
    stopper.join(WAIT)
    ext.start(app)
    sqlite_db("INSERT INTO orders VALUES (7, 'after', 1)")
    got = events.wait_for(7)
    assert sorted(e.pk for e in got) == [1, 2, 3, 4, 5, 6, 7]
    events.assert_no_more(7, marker(ext, app))
