"""Binary-log capture on MariaDB (``DBNOTIFY_CAPTURE = "binlog"``): no
trigger in any writer's transaction; one elected process follows the
row-based binary log and relays each committed transaction into the
journal, as the triggers would have written it.

What a user notices: every column type arrives with the values the
triggers give; no trigger is installed and ``status()`` says which
capture runs and who leads; TRUNCATE arrives as ``table_truncated``; a
transaction's context and messages arrive in order with its changes; of
two processes exactly one leads, and when it stops the other takes over
without losing or repeating a row; rows committed while no process runs
are relayed when one starts; a restart of the server loses nothing; a
purged log is reported as a gap; a server whose log cannot be followed
gets triggers instead, and says so; a 20,000-row transaction arrives
whole.

Most tests run on the run's binary-log server (``binlog_server``); the
ones that restart a server or purge its logs share a server of this
module's own (``own_server``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pymysql
import pytest
import sqlalchemy as sa
from flask import Flask, current_app

from flask_dbnotify import (
    ChangeEvent,
    DBNotify,
    ExactFloat,
    Operation,
    notification_received,
    row_changed,
    table_truncated,
)
from flask_dbnotify._payload import encode_message

from ._helpers import (
    WAIT,
    Backend,
    Lifecycle,
    Lines,
    MySQLDB,
    Recorder,
    app_factory,
    assert_once,
    listening,
    local_ports,
    marker,
    not_here,
    poll_until,
)
from ._mariadb import ThrowawayMariaDB
from ._mariadb import connect as mysql_connect

pytestmark = pytest.mark.backends("binlog")

ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")
ORDERS = "CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(50) NOT NULL, qty INT NOT NULL)"


# -- helpers -------------------------------------------------------------------------


class ByApp(Recorder):
    """Row events, filed by the name of the app whose listener delivered them
    (receivers run in its application context)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_app: dict[str, list[ChangeEvent]] = {}

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        event = kwargs["event"]
        with self._cond:
            self.by_app.setdefault(current_app.name, []).append(event)
        self.add(event)

    def of(self, app: Flask, count: int, what: str) -> list[ChangeEvent]:
        """The first ``count`` events of ``app``, waiting (bounded) for them."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.by_app.get(app.name, [])) >= count, WAIT):
                got = self.by_app.get(app.name, [])
                raise AssertionError(
                    f"expected {count} {what} from {app.name} within {WAIT}s, got {len(got)}"
                )
            return list(self.by_app[app.name])


def plain(value: Any) -> Any:
    """A value as a user compares it: its type too (an int is not a float).
    A number with a fraction compares by its exact value: the triggers
    write MariaDB's digits (``-1e300``), which arrive as an ExactFloat when
    Python would print them otherwise, the binary log writes Python's
    (``-1e+300``), a float; equal values (a DECIMAL's scale is checked
    apart)."""
    if isinstance(value, ExactFloat):
        return ("number", Decimal(value.text))
    if isinstance(value, float):
        return ("number", Decimal(repr(value)))
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return (type(value).__name__, value)


@pytest.fixture()
def second_database(binlog_server: ThrowawayMariaDB) -> Iterator[str]:
    """A second fresh database on the binary-log server, dropped afterwards."""
    name = f"dbnotify_binlog_triggers_{os.getpid()}"
    admin = mysql_connect(binlog_server.url)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield (
            sa.make_url(binlog_server.url).set(database=name).render_as_string(hide_password=False)
        )
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


MakeApp = Callable[..., tuple[Flask, DBNotify]]


@pytest.fixture()
def factory() -> Iterator[Callable[..., MakeApp]]:
    """``factory(url, name, **config)``: :func:`app_factory` for a database
    the test chose; every app made is closed afterwards."""
    lists: list[list[tuple[Flask, DBNotify]]] = []

    def make(url: str, name: str, **config: Any) -> MakeApp:
        make_app, made = app_factory(url, name, **config)
        lists.append(made)
        return make_app

    yield make
    for made in lists:
        for app, ext in made:
            ext.close(app)


# -- values ----------------------------------------------------------------------------

WIDE = """CREATE TABLE wide (
    id INT PRIMARY KEY,
    ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, siu SMALLINT UNSIGNED,
    mi MEDIUMINT, miu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED,
    bi BIGINT, biu BIGINT UNSIGNED, flag BOOLEAN,
    dec1 DECIMAL(20,6), dec2 DECIMAL(5,2), dec3 DECIMAL(30,12), dec0 DECIMAL(10,0),
    fl FLOAT, dbl DOUBLE,
    dt0 DATETIME, dt3 DATETIME(3), dt6 DATETIME(6), ts3 TIMESTAMP(3) NULL, d DATE,
    t6 TIME(6), t0 TIME, t2 TIME(2), y YEAR,
    c CHAR(10), c100 CHAR(100), vc VARCHAR(200), lat VARCHAR(50) CHARACTER SET latin1,
    tx TEXT, lt LONGTEXT, doc JSON,
    bl BLOB, vb VARBINARY(16), bn BINARY(4), b1 BIT(1), b10 BIT(10), b64 BIT(64),
    e ENUM('red', 'green', 'blue'), s SET('a', 'b', 'c', 'd')
) CHARACTER SET utf8mb4"""
TEXT = "Emoji \U0001f389 \"double\" 'single' back\\slash\nnewline \u00e9\u4e2d\ttab"
#: Row 1: each type's extremes and awkward values.
FIRST: dict[str, Any] = {
    "id": 1,
    "ti": -128,
    "tiu": 255,
    "si": -32768,
    "siu": 65535,
    "mi": -8388608,
    "miu": 16777215,
    "i": -2147483648,
    "iu": 4294967295,
    "bi": -9223372036854775808,
    "biu": 18446744073709551615,
    "flag": 1,
    "dec1": Decimal("12345678901234.123456"),
    "dec2": Decimal("-999.99"),
    "dec3": Decimal("-123456789012345678.000000000001"),
    "dec0": Decimal("-1"),
    "fl": 3.14159,
    "dbl": 0.30000000000000004,
    "dt0": "2024-05-01 12:34:56",
    "dt3": "2024-05-01 12:34:56.789",
    "dt6": "1999-12-31 23:59:59.999999",
    "ts3": "2024-05-01 12:34:56.789",
    "d": "2024-02-29",
    "t6": "-12:34:56.000007",
    "t0": "838:59:59",
    "t2": "-00:00:01.5",
    "y": 2155,
    "c": "abc",
    "c100": "wide \u2713 char",
    "vc": TEXT,
    "lat": "caf\u00e9 \u20ac \u00ff",
    "tx": TEXT,
    "lt": "x" * 70000,
    "doc": '{"a": [1, 2.5, null], "s": "q \\" b \\\\", "n": {"deep": true}}',
    "bl": b"\x00\x01\xffdata",
    "vb": b"\x0a\x0b",
    "bn": b"\x01\x02",
    "b1": 1,
    "b10": 0b1010101010,
    "b64": 2**64 - 1,
    "e": "green",
    "s": "a,c",
}
#: Row 3: the other extremes, empty texts, zeros.
THIRD: dict[str, Any] = {
    **FIRST,
    "id": 3,
    "ti": 127,
    "tiu": 0,
    "si": 32767,
    "mi": 8388607,
    "i": 2147483647,
    "bi": 9223372036854775807,
    "biu": 0,
    "flag": 0,
    "dec1": Decimal("-0.000001"),
    "dec2": Decimal("0.00"),
    "dec3": Decimal("999999999999999999.999999999999"),
    "dec0": Decimal("9999999999"),
    "fl": -1.5e-10,
    "dbl": -1e300,
    "dt0": "1000-01-01 00:00:00",
    "dt6": "9999-12-31 23:59:59.000001",
    "ts3": "1970-01-01 00:00:01.001",
    "d": "1000-01-01",
    "t6": "-838:59:59.000000",
    "t0": "-00:00:01",
    "t2": "00:00:00.01",
    "y": 1901,
    "c": "",
    "vc": "",
    "lat": "",
    "tx": "",
    "doc": "[]",
    "bl": b"",
    "vb": b"",
    "bn": b"\xff\xff\xff\xff",
    "b1": 0,
    "b10": 0,
    "b64": 0,
    "e": "red",
    "s": "",
}


def insert_wide(db: MySQLDB, row: dict[str, Any]) -> None:
    names = ", ".join(f'"{name}"' for name in row)
    marks = ", ".join("?" for _ in row)
    db(f"INSERT INTO wide ({names}) VALUES ({marks})", tuple(row.values()))


def write_wide(db: MySQLDB) -> None:
    """The same writes, on either database."""
    insert_wide(db, FIRST)
    db("INSERT INTO wide (id) VALUES (2)")  # every other column NULL
    insert_wide(db, THIRD)
    db("BEGIN")
    db(
        "UPDATE wide SET ti = ti + 1, vc = 'changed \U0001f600', doc = '{\"k\": []}', "
        "t6 = '00:00:00', fl = NULL, b64 = 5, s = 'b,d', lat = 'na\u00efve' WHERE id = 1"
    )
    db("UPDATE wide SET tiu = 7, dt6 = '2001-02-03 04:05:06.7', e = 'blue' WHERE id = 2")
    db("COMMIT")
    updates = ", ".join(f'"{name}" = NULL' for name in THIRD if name != "id")
    db(f"UPDATE wide SET {updates} WHERE id = 3")
    db("DELETE FROM wide WHERE id IN (1, 2)")
    db("DELETE FROM wide WHERE id = 3")


def test_every_column_type_arrives_with_the_values_the_triggers_give(
    binlog_url: str, second_database: str, factory: Callable[..., MakeApp]
) -> None:
    """The same table and writes in two databases of one server, one app
    capturing with triggers and one with the binary log: every INSERT,
    UPDATE and DELETE arrives in both with equal ``new``, ``old`` and
    ``changed``, value for value and type for type (integers at their
    extremes, unsigned BIGINT's maximum, DECIMAL's digits, FLOAT's shortest
    digits, times with fractions and negative TIMEs, utf8mb4 and latin1
    text, JSON, bytes in hex, BIT, ENUM, SET, NULL). A TIMESTAMP is shown
    by the triggers in the writing session's time zone and by the binary
    log in UTC: the server and its sessions run in UTC here, so they agree."""
    apps = []
    got = ByApp()
    for url, capture in ((second_database, "triggers"), (binlog_url, "binlog")):
        db = MySQLDB(url)
        try:
            assert db("SELECT @@session.time_zone, @@system_time_zone") == [("SYSTEM", "UTC")]
            db(WIDE)
        finally:
            db.close()
        app, _ = listening(factory(url, f"{capture}_values", DBNOTIFY_CAPTURE=capture), "wide")
        apps.append(app)
    with row_changed.connected_to(got):
        for url in (second_database, binlog_url):
            db = MySQLDB(url)
            try:
                write_wide(db)
            finally:
                db.close()
        triggered = got.of(apps[0], 9, "events of the triggers")
        relayed = got.of(apps[1], 9, "events of the binary log")
    assert [(e.op, e.pk) for e in triggered] == [
        (Operation.INSERT, 1),
        (Operation.INSERT, 2),
        (Operation.INSERT, 3),
        (Operation.UPDATE, 1),
        (Operation.UPDATE, 2),
        (Operation.UPDATE, 3),
        (Operation.DELETE, 1),
        (Operation.DELETE, 2),
        (Operation.DELETE, 3),
    ]
    differ = []
    for mine, theirs in zip(relayed, triggered, strict=True):
        where = f"{mine.op.value} {mine.pk}"
        if (mine.op, mine.pk, mine.cut) != (theirs.op, theirs.pk, theirs.cut):
            differ.append((where, "op, pk, cut", (mine.op, mine.pk), (theirs.op, theirs.pk)))
            continue
        for part in ("new", "old"):
            a, b = getattr(mine, part) or {}, getattr(theirs, part) or {}
            for column in sorted(set(a) | set(b)):
                if plain(a.get(column, "absent")) != plain(b.get(column, "absent")):
                    differ.append((where, f"{part}[{column}]", a.get(column), b.get(column)))
        if sorted(mine.changed or ()) != sorted(theirs.changed or ()):
            differ.append((where, "changed", mine.changed, theirs.changed))
    shown = [(w, c, repr(plain(x))[:80], repr(plain(y))[:80]) for w, c, x, y in differ]
    assert differ == [], "binary log (left) against triggers (right):\n" + "\n".join(
        map(repr, shown)
    )
    # And the values are the ones written (a check of the comparison itself).
    first = relayed[0].new
    assert first is not None
    assert first["biu"] == 18446744073709551615 and first["b64"] == 2**64 - 1
    assert first["t6"] == "-12:34:56.000007" and first["vc"] == TEXT
    assert first["bn"] == "01020000" and first["doc"]["s"] == 'q " b \\'
    decimals = [(e.new or {}).get("dec2") for e in relayed[:3]]
    texts = [None if v is None else getattr(v, "text", repr(v)) for v in decimals]
    assert texts == ["-999.99", None, "0.00"]
    assert relayed[0].new["dec3"].text == "-123456789012345678.000000000001"


def test_latin1_text_arrives_as_a_select_reads_it(backend: Backend, events: Recorder) -> None:
    """Text of a latin1 column arrives as a SELECT reads it, every byte:
    MariaDB's latin1 maps 0x81, 0x8D, 0x8F, 0x90 and 0x9D to U+0081,
    U+008D, ... (as the triggers journal them), where Python's cp1252 has
    no character."""
    backend.sql("CREATE TABLE names (id INT PRIMARY KEY, name VARCHAR(20) CHARACTER SET latin1)")
    app, ext = listening(backend.make_app, "names")
    backend.sql("INSERT INTO names VALUES (1, ?)", ("\x81\x8d\x8f\x90\x9d \u20ac\u00ff",))
    ((selected,),) = backend.sql("SELECT name FROM names")
    (event,) = events.wait_for(1, "the INSERT")
    assert event.new == {"id": 1, "name": selected}, f"SELECT reads {selected!r}"


# -- what is installed, and status -----------------------------------------------------


def cli_status(url: str) -> list[str]:
    """``flask dbnotify status`` of an app in another process, on ``url``
    with binary-log capture: its lines."""
    done = subprocess.run(
        [FLASK, "--app", "tests.apps.env_app", "dbnotify", "status"],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "FLASK_DBNOTIFY_DATABASE_URI": url,
            "FLASK_DBNOTIFY_CAPTURE": "binlog",
            "FLASK_DBNOTIFY_AUTOSTART": "false",
        },
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
    )
    assert done.returncode == 0, f"status failed: {done.stdout}{done.stderr}"
    return done.stdout.splitlines()


def test_no_trigger_is_installed_and_status_names_the_capture_and_the_leader(
    backend: Backend, events: Recorder
) -> None:
    """install_triggers() installs no trigger (and drops one left from
    trigger capture); status() says the binary log is followed by one
    process and names the leader's connection, which is this process's;
    another process's ``flask dbnotify status`` says the same; with the app
    closed, nobody leads."""
    backend.sql(ORDERS)
    trig_app, trig_ext = backend.make_app(DBNOTIFY_CAPTURE="triggers")
    trig_ext.watch("orders")
    trig_ext.install_triggers(trig_app)
    assert backend.triggers(), "trigger capture installs triggers"
    trig_ext.close(trig_app)

    app, ext = listening(backend.make_app, "orders")
    assert backend.triggers() == []
    assert {"table dbnotify_binlog", "table dbnotify_shapes"} <= set(backend.objects())
    status = poll_until(
        lambda: (s := ext.status(app)).health.get("leader", "none") != "none" and s,
        "status() names a leader",
    )
    assert status.watches == {"orders": "installed"}, status.details
    assert status.health["capture"] == "the binary log, followed by one process"
    assert status.warnings == []
    leader = status.health["leader"]
    assert leader.startswith("connection ")
    ((host,),) = backend.sql(
        "SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = ?", (int(leader.split()[1]),)
    )
    assert int(host.rsplit(":", 1)[1]) in local_ports(os.getpid()), "the leader is ours"

    backend.sql("INSERT INTO orders VALUES (1, 'relayed', 1)")
    (event,) = events.wait_for(1, "the INSERT")
    assert (event.op, event.pk) == (Operation.INSERT, 1)
    relayed = poll_until(
        lambda: (where := ext.status(app).health.get("relayed to", "")) != "not yet" and where,
        "status() says where the relay stands",
    )
    ((file, position),) = backend.sql("SELECT file, position FROM dbnotify_binlog")
    assert relayed == f"{file}:{position}" and file.startswith("binlog.")

    lines = cli_status(backend.url)
    assert "capture: the binary log, followed by one process" in lines, lines
    assert f"leader: {leader}" in lines, lines

    ext.close(app)
    poll_until(lambda: ext.status(app).health["leader"] == "none", "nobody leads once closed")


# -- TRUNCATE, context and messages ------------------------------------------------


def test_truncate_arrives_once_as_table_truncated(backend: Backend, events: Recorder) -> None:
    """TRUNCATE of a watched table (named bare or with its database) arrives
    once each as table_truncated, between the rows written before and
    after it; TRUNCATE of a table nobody watches sends nothing."""
    backend.sql(ORDERS)
    backend.sql("CREATE TABLE other (id INT PRIMARY KEY)")
    app, ext = listening(backend.make_app, "orders")
    database = sa.make_url(backend.url).database
    with table_truncated.connected_to(events):
        backend.sql("INSERT INTO orders VALUES (1, 'a', 1)")
        backend.sql("TRUNCATE TABLE orders")
        backend.sql("INSERT INTO other VALUES (1)")
        backend.sql("TRUNCATE other")
        backend.sql("INSERT INTO orders VALUES (2, 'b', 1)")
        backend.sql(f"TRUNCATE `{database}`.`orders`")
        got = events.wait_for(4, "two rows and two truncates")
        events.assert_no_more(4, marker(ext, app))
    assert [(e.op, e.pk, e.table) for e in got] == [
        (Operation.INSERT, 1, "orders"),
        (Operation.TRUNCATE, None, "orders"),
        (Operation.INSERT, 2, "orders"),
        (Operation.TRUNCATE, None, "orders"),
    ]


def test_a_truncate_after_a_comment_and_latin1_enum_values_arrive(
    backend: Backend, events: Recorder
) -> None:
    """A TRUNCATE that an ORM or a tool begins with a comment still arrives
    as table_truncated, and ENUM/SET values in latin1 arrive as text (their
    names are in the column's character set, not UTF-8: the relay stalled
    on them for good)."""
    backend.sql(
        "CREATE TABLE orders (id INT PRIMARY KEY, kind ENUM('café', 'thé') CHARACTER SET latin1, "
        "tags SET('épicé', 'doux') CHARACTER SET latin1)"
    )
    app, ext = listening(backend.make_app, "orders")
    with table_truncated.connected_to(events):
        backend.sql("INSERT INTO orders VALUES (1, 'thé', 'épicé,doux')")
        backend.sql("/* app: nightly */ TRUNCATE TABLE orders")
        backend.sql("INSERT INTO orders VALUES (2, 'café', '')")
        got = events.wait_for(3, "two rows and a truncate")
        events.assert_no_more(3, marker(ext, app))
    assert [(e.op, e.new) for e in got] == [
        (Operation.INSERT, {"id": 1, "kind": "thé", "tags": "épicé,doux"}),
        (Operation.TRUNCATE, None),
        (Operation.INSERT, {"id": 2, "kind": "café", "tags": ""}),
    ]


def test_an_xa_transaction_is_reported_as_missed_not_relayed_into_the_next(
    backend: Backend, events: Recorder
) -> None:
    """An XA transaction, prepared then rolled back, relays nothing (its
    rows went into the next transaction's); XA is not relayed, and every
    listener is told changes were missed (a gap). Later rows arrive."""
    backend.sql(ORDERS)
    lifecycle = Lifecycle()
    with lifecycle.connected():
        app, ext = listening(backend.make_app, "orders")
        lifecycle.wait_for_name("connected", 1)  # the start's
        backend.sql("XA START 'dbnotify-test'")
        backend.sql("INSERT INTO orders VALUES (1, 'rolled back', 1)")
        backend.sql("XA END 'dbnotify-test'")
        backend.sql("XA PREPARE 'dbnotify-test'")
        backend.sql("XA ROLLBACK 'dbnotify-test'")
        backend.sql("INSERT INTO orders VALUES (2, 'after', 1)")
        (event,) = events.wait_for(1, "the row after the XA transaction")
        events.assert_no_more(1, marker(ext, app))
        _, gap, _ = lifecycle.wait_for_name("connected", 2)
    assert (event.pk, event.new["item"]) == (2, "after")
    assert gap == {"reconnect": True, "gap": True}


class Messages:
    """``notification_received`` as ``(channel, payload, context)``, into a recorder."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def __call__(self, sender: Any, payload: Any, context: Any = None, **extra: Any) -> None:
        self.recorder.add(("message", sender, payload, context))


def test_context_and_messages_arrive_in_order_with_the_transactions_changes(
    backend: Backend,
) -> None:
    """In one transaction: a row, set_context(), a row, notify(connection=),
    an UPDATE, another message: everything arrives in that order, the
    rows after set_context() and both messages with the context; the next
    transaction on the connection has none; a message of a transaction
    rolled back never arrives."""
    backend.sql(ORDERS)
    app, ext = listening(backend.make_app, "orders")
    got = Recorder()
    rows = Recorder()
    messages = Messages(got)

    def row(sender: Any, event: ChangeEvent, **extra: Any) -> None:
        got.add(("row", event.op.value, event.pk, event.context))

    ctx = {"user_id": 42, "request": "r-1"}
    engine = backend.engine()
    with (
        row_changed.connected_to(row),
        row_changed.connected_to(rows),
        notification_received.connected_to(messages),
        engine.connect() as conn,
    ):
        conn.execute(sa.text("INSERT INTO orders VALUES (1, 'before', 1)"))
        ext.set_context(conn, **ctx)
        conn.execute(sa.text("INSERT INTO orders VALUES (2, 'with', 1)"))
        ext.notify("audit", {"n": 1}, connection=conn, app=app)
        conn.execute(sa.text("UPDATE orders SET qty = 5 WHERE id = 1"))
        ext.notify("audit", {"n": 2}, connection=conn, app=app)
        conn.commit()
        ext.notify("audit", {"n": "dropped"}, connection=conn, app=app)
        conn.execute(sa.text("INSERT INTO orders VALUES (9, 'rolled back', 1)"))
        conn.rollback()
        conn.execute(sa.text("INSERT INTO orders VALUES (3, 'after', 1)"))
        ext.notify("audit", {"n": 3}, connection=conn, app=app)
        conn.commit()
        got.wait_for(7, "four rows and three messages")
        got.assert_no_more(7, marker(ext, app))
    assert got.items[:7] == [
        ("row", "INSERT", 1, None),
        ("row", "INSERT", 2, ctx),
        ("message", "audit", {"n": 1}, ctx),
        ("row", "UPDATE", 1, ctx),
        ("message", "audit", {"n": 2}, ctx),
        ("row", "INSERT", 3, None),
        ("message", "audit", {"n": 3}, None),
    ]
    assert backend.sql("SELECT count(*) FROM dbnotify_relay") == [(0,)], "handed rows relayed"


def test_a_savepoint_keeps_the_transactions_context(backend: Backend, events: Recorder) -> None:
    """set_context(), then a nested transaction (SAVEPOINT, as SQLAlchemy's
    begin_nested() makes), part of it rolled back: the rows after the
    savepoint carry the context as those before it do (as with triggers),
    and the rolled-back row never arrives."""
    backend.sql(ORDERS)
    app, ext = listening(backend.make_app, "orders")
    engine = backend.engine()
    with engine.connect() as conn:
        ext.set_context(conn, job="nightly")
        conn.execute(sa.text("INSERT INTO orders VALUES (1, 'before', 1)"))
        with conn.begin_nested():
            conn.execute(sa.text("INSERT INTO orders VALUES (2, 'kept', 1)"))
        nested = conn.begin_nested()
        conn.execute(sa.text("INSERT INTO orders VALUES (3, 'undone', 1)"))
        nested.rollback()
        conn.execute(sa.text("INSERT INTO orders VALUES (4, 'after', 1)"))
        conn.commit()
    got = events.wait_for(3, "the three rows kept")
    events.assert_no_more(3, marker(ext, app))
    assert [(e.pk, e.context) for e in got] == [(pk, {"job": "nightly"}) for pk in (1, 2, 4)]


# -- leaders ---------------------------------------------------------------------------


class App:
    """A process running ``tests/apps/once_app.py`` with an ordinary receiver
    on ``orders`` and binary-log capture; the primary keys it handled."""

    def __init__(self, proc: subprocess.Popen[bytes], lines: Lines) -> None:
        self.proc, self.lines = proc, lines
        self.pks: list[int] = []

    def read_to(self, last: int, timeout: float = WAIT) -> list[int]:
        """Read its lines until it has handled the row ``last`` (bounded)."""
        deadline = time.monotonic() + timeout
        while last not in self.pks:
            line = json.loads(
                self.lines.readline(f"the row {last}", max(0.0, deadline - time.monotonic()))
            )
            if line.get("r") == "plain":
                self.pks.append(int(line["pk"]))
        return self.pks


def leader_pid(db: MySQLDB, apps: list[App]) -> int | None:
    """The pid of the process whose connection holds the leader's lock."""
    rows = db(
        "SELECT p.HOST FROM information_schema.PROCESSLIST p WHERE p.ID = IS_USED_LOCK(?)",
        (f"dbnotify:{db.database}",),
    )
    if not rows:
        return None
    port = int(rows[0][0].rsplit(":", 1)[1])
    running = [app.proc.pid for app in apps if app.proc.poll() is None]
    return next((pid for pid in running if port in local_ports(pid)), None)


def test_of_two_processes_one_leads_and_the_other_takes_over_losing_nothing(
    backend: Backend, spawn: Callable[..., tuple[subprocess.Popen[bytes], Lines]]
) -> None:
    """Two processes of the app: exactly one holds the lead, and each
    listener gets each row once. The leader stops while a writer goes on:
    the other process takes the lead and every row, those written while
    nobody led included, arrives there exactly once, in commit order."""
    backend.sql(ORDERS)
    app, ext = backend.make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    ext.close(app)
    config = json.dumps({"DBNOTIFY_CAPTURE": "binlog"})
    apps = []
    for name in ("A", "B"):
        proc, lines = spawn(
            "-c",
            "from tests.apps.once_app import main; main()",
            backend.url,
            "plain",
            config,
            name=name,
        )
        lines.wait_for('"ready"')
        apps.append(App(proc, lines))
    db = backend.writer
    assert isinstance(db, MySQLDB)
    first = poll_until(lambda: leader_pid(db, apps), "one of the two processes leads")
    for n in range(1, 21):
        backend.sql("INSERT INTO orders VALUES (?, 'x', 1)", (n,))
    for each in apps:
        assert_once(each.read_to(20), range(1, 21), f"process {each.proc.pid}")
    assert leader_pid(db, apps) == first, "the lead stays where it is"

    leading = next(each for each in apps if each.proc.pid == first)
    other = next(each for each in apps if each.proc.pid != first)
    total = 220
    writer = MySQLDB(backend.url)
    failed: list[BaseException] = []

    def write() -> None:
        try:
            for n in range(21, total + 1):
                writer("INSERT INTO orders VALUES (?, 'y', 1)", (n,))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        assert leading.proc.stdin is not None
        leading.proc.stdin.close()  # the app stops, and exits
        assert leading.proc.wait(WAIT) == 0
    finally:
        thread.join(WAIT)
        writer.close()
    assert not thread.is_alive() and not failed, failed
    poll_until(lambda: leader_pid(db, apps) == other.proc.pid, "the other process leads")
    assert_once(other.read_to(total), range(1, total + 1), "the process that took over")
    ids = backend.journal_ids()
    assert len(ids) == total, f"{len(ids)} journal rows for {total} rows"


# -- while no process runs -------------------------------------------------------------

once_handled = Recorder()


def handle_once(event: ChangeEvent) -> None:
    """A once receiver of the app (processes know it by this name)."""
    once_handled.add(event)


def test_rows_committed_while_no_process_runs_are_relayed_when_one_starts(
    backend: Backend,
) -> None:
    """After install-triggers, rows committed while no process of the app
    runs are not journaled (nothing relays them), and the first process to
    start relays them: its once receiver handles each exactly once (and,
    relayed after its listener started, its ordinary receivers get them
    too). A process started later listens from the journal's end: its
    ordinary receivers get none of those, only what is committed after."""
    backend.sql(ORDERS)
    once_handled.items.clear()
    first_app, first = backend.make_app()
    first.watch("orders", durable=True)
    first.on("orders", once=True)(handle_once)
    first.install_triggers(first_app)
    backend.sql("INSERT INTO orders VALUES (1, 'a', 1), (2, 'b', 1)")
    backend.sql("UPDATE orders SET qty = 2 WHERE id = 2")
    backend.sql("DELETE FROM orders WHERE id = 1")
    assert backend.journal_ids() == [], "journaled with no process running"

    got = ByApp()
    with row_changed.connected_to(got):
        first.start(first_app)
        handled = once_handled.wait_for(4, "the once receiver to handle the four changes")
        assert [(e.op, e.pk) for e in handled] == [
            (Operation.INSERT, 1),
            (Operation.INSERT, 2),
            (Operation.UPDATE, 2),
            (Operation.DELETE, 1),
        ]
        poll_until(lambda: len(backend.journal_ids()) == 4, "the four changes journaled")

        later_app, later = backend.make_app()
        later.watch("orders", durable=True)
        later.start(later_app)
        backend.sql("INSERT INTO orders VALUES (3, 'c', 1)")
        (event,) = got.of(later_app, 1, "the row committed after the later start")
        assert (event.op, event.pk) == (Operation.INSERT, 3)
        once_handled.wait_for(5, "the once receiver to handle the new row")
        once_handled.assert_no_more(5, lambda: backend.sql("INSERT INTO orders VALUES (4, 'm', 1)"))
        got.of(later_app, 2, "the marker row")
        got.of(first_app, 6, "the backlog, the new row and the marker row")
    assert [e.pk for e in got.by_app[later_app.name]] == [3, 4]
    # The first process listens from the journal's end too, and the
    # backlog is journaled after it: its ordinary receivers get it, as in
    # WAL capture (docs/capture.rst, "Guarantees").
    assert [e.pk for e in got.by_app[first_app.name]] == [1, 2, 2, 1, 3, 4]


# -- a server of our own: restarts, purged logs ----------------------------------------


@pytest.fixture(scope="module")
def own_server() -> Iterator[ThrowawayMariaDB]:
    """A binary-log server of this module's own, which tests restart and
    whose logs they purge (never the run's shared one)."""
    try:
        server = ThrowawayMariaDB(binlog=True)
    except RuntimeError as exc:
        not_here(f"binary-log tests NOT RUN: no server of our own with a binary log: {exc}")
    yield server
    server.cleanup()


@pytest.fixture()
def own_url(own_server: ThrowawayMariaDB, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the module's server, with ``orders``."""
    name = f"own_{request.node.name[5:40]}"
    admin = mysql_connect(own_server.url)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        cur.execute(f"CREATE TABLE `{name}`.orders (id INT PRIMARY KEY, item TEXT, qty INT)")
    admin.close()
    yield sa.make_url(own_server.url).set(database=name).render_as_string(hide_password=False)
    if own_server.proc is not None and own_server.proc.poll() is None:
        admin = mysql_connect(own_server.url)
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


class Writer(threading.Thread):
    """Inserts rows 1, 2, 3, ... (autocommit), one after the other, until
    told to stop, through a server that goes away: on a lost connection it
    connects again and inserts the row unless it did commit (a duplicate
    key says so)."""

    def __init__(self, url: str) -> None:
        super().__init__(name="writer", daemon=True)
        self.url = url
        self.written = 0  # the last row known committed
        self.outages = 0
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        conn: Any = None
        deadline = time.monotonic() + 60
        try:
            while not self.done.is_set():
                n = self.written + 1
                try:
                    if conn is None:
                        conn = mysql_connect(self.url, connect_timeout=2)
                    with conn.cursor() as cur:
                        cur.execute("INSERT INTO orders VALUES (%s, 'w', 1)", (n,))
                except pymysql.IntegrityError:
                    pass  # committed before the connection was lost
                except pymysql.MySQLError:
                    self.outages += conn is not None
                    if conn is not None and conn.open:
                        conn.close()
                    conn = None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)  # the server is restarting: try again
                    continue
                self.written = n
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            if conn is not None and conn.open:
                conn.close()


def test_a_server_restart_while_writing_loses_and_repeats_nothing(
    own_server: ThrowawayMariaDB,
    own_url: str,
    factory: Callable[..., MakeApp],
    events: Recorder,
) -> None:
    """The server restarts while a writer commits row after row: the
    listener and the leader reconnect, and every committed row arrives
    exactly once, in commit order (from the log of before the restart and
    the new one after it)."""
    app, ext = listening(factory(own_url, "restart", DBNOTIFY_CAPTURE="binlog"), "orders")
    writer = Writer(own_url)
    writer.start()
    try:
        events.wait_for(30, "rows before the restart")
        own_server.stop()
        own_server.start()
        after = writer.written + 50
        poll_until(lambda: writer.written >= after or writer.error, "50 rows after the restart")
    finally:
        writer.done.set()
        writer.join(WAIT)
    assert not writer.is_alive() and writer.error is None, writer.error
    assert writer.outages >= 1, "the writer did not see the server go"
    total = writer.written
    got = events.wait_for(total, "every row written through the restart", timeout=30)
    events.assert_no_more(total, marker(ext, app))
    assert_once([e.pk for e in got], range(1, total + 1), "the listener")
    check = MySQLDB(own_url)
    try:
        assert check("SELECT count(*), max(id) FROM orders") == [(total, total)]
    finally:
        check.close()


def test_a_log_written_with_another_checksum_setting_is_read(
    own_server: ThrowawayMariaDB,
    own_url: str,
    factory: Callable[..., MakeApp],
    events: Recorder,
) -> None:
    """binlog_checksum changes while the leader follows the log (the server
    starts a new file): each file is read as it was written, and every row
    arrives with its values (the checksum was read once, and the relay
    wrote garbage, then stalled)."""
    make_app = factory(own_url, "checksum", DBNOTIFY_CAPTURE="binlog")
    app, ext = listening(make_app, "orders")
    db = MySQLDB(own_url)
    try:
        db("INSERT INTO orders VALUES (1, 'crc32 era', 1)")
        db("SET GLOBAL binlog_checksum = NONE")
        db("INSERT INTO orders VALUES (2, 'none era', 1)")
        db("UPDATE orders SET qty = 5 WHERE id = 2")
        db("SET GLOBAL binlog_checksum = CRC32")
        db("INSERT INTO orders VALUES (3, 'crc32 again', 1)")
        got = events.wait_for(4, "every row, in both settings")
        events.assert_no_more(4, marker(ext, app))
    finally:
        db("SET GLOBAL binlog_checksum = CRC32")
        db.close()
    assert [(e.pk, e.new) for e in got] == [
        (1, {"id": 1, "item": "crc32 era", "qty": 1}),
        (2, {"id": 2, "item": "none era", "qty": 1}),
        (2, {"id": 2, "item": "none era", "qty": 5}),
        (3, {"id": 3, "item": "crc32 again", "qty": 1}),
    ]


def test_a_purged_log_is_reported_as_a_gap_and_later_rows_arrive(
    own_server: ThrowawayMariaDB,
    own_url: str,
    factory: Callable[..., MakeApp],
    events: Recorder,
) -> None:
    """With no process running, rows are committed and the binary log
    holding them is purged: the next process's listener reports a gap
    (``listener_connected(reconnect=True, gap=True)``), the purged rows
    never arrive, and rows committed afterwards do."""
    make_app = factory(own_url, "purge", DBNOTIFY_CAPTURE="binlog")
    app, ext = listening(make_app, "orders")
    db = MySQLDB(own_url)
    try:
        db("INSERT INTO orders VALUES (1, 'before', 1)")
        events.wait_for(1, "the row before the stop")
        ext.close(app)
        db("INSERT INTO orders VALUES (2, 'purged', 1), (3, 'purged', 1)")
        # A log a replica session still reads is not purged: the server ends
        # a closed leader's session at its next heartbeat.
        poll_until(
            lambda: (
                db(
                    "SELECT count(*) FROM information_schema.PROCESSLIST "
                    "WHERE COMMAND LIKE 'Binlog Dump%'"
                )
                == [(0,)]
            ),
            "no session reads the log",
        )
        db("FLUSH BINARY LOGS")
        ((newest, *_),) = db("SHOW MASTER STATUS")

        def purged() -> bool:
            # A log is kept until InnoDB has flushed its transactions (the
            # binlog checkpoint): a warning then, and PURGE again.
            db(f"PURGE BINARY LOGS TO '{newest}'")
            return [row[0] for row in db("SHOW BINARY LOGS")] == [newest]

        poll_until(purged, f"the logs before {newest} purged")

        lifecycle = Lifecycle()
        with lifecycle.connected():
            later_app, later = make_app()
            later.watch("orders")
            later.start(later_app)
            lifecycle.wait_for_name("connected", 1)
            _, gap, _ = lifecycle.wait_for_name("connected", 2)
            assert gap == {"reconnect": True, "gap": True}
            db("INSERT INTO orders VALUES (4, 'after', 1)")
            got = events.wait_for(2, "the row after the gap")
            events.assert_no_more(2, marker(later, later_app))
        assert [e.pk for e in got] == [1, 4]
        assert [name for name, _ in lifecycle.names()] == ["connected", "connected"]
        assert "purged" in str(db("SELECT body FROM dbnotify_journal WHERE body LIKE '%gap%'")), (
            "the gap is journaled with its reason"
        )
    finally:
        db.close()


# -- where the log cannot be followed --------------------------------------------------


@pytest.mark.backends("mysql")  # the shared server: log_bin is OFF
def test_a_server_without_a_binary_log_gets_triggers_and_says_why(
    backend: Backend, events: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """DBNOTIFY_CAPTURE = 'binlog' on a server whose binary log is off:
    install_triggers() installs triggers and logs a warning naming
    log_bin; status() says triggers capture the changes and why, with a
    warning; rows still arrive, once each."""
    ((log_bin,),) = backend.sql("SELECT @@log_bin")
    assert log_bin == 0, "the shared server's binary log is off"
    backend.sql(ORDERS)
    app, ext = backend.make_app(DBNOTIFY_CAPTURE="binlog")
    ext.watch("orders")
    with caplog.at_level(logging.WARNING, logger="flask_dbnotify"):
        ext.install_triggers(app)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("log_bin is OFF" in line and "triggers" in line for line in warned), warned
    assert len(backend.triggers()) == 3, backend.triggers()
    status = ext.status(app)
    assert status.watches == {"orders": "installed"}, status.details
    capture = status.health["capture"]
    assert capture.startswith("triggers") and "log_bin is OFF" in capture, capture
    assert any("log_bin is OFF" in warning for warning in status.warnings), status.warnings
    ext.start(app)
    backend.sql("INSERT INTO orders VALUES (1, 'a', 1), (2, 'b', 1)")
    got = events.wait_for(2, "the rows, through triggers")
    events.assert_no_more(2, marker(ext, app))
    assert [(e.op, e.pk) for e in got] == [(Operation.INSERT, 1), (Operation.INSERT, 2)]


# -- a large transaction ---------------------------------------------------------------


# -- what a low-privilege account can do -------------------------------------------------


def test_an_account_that_may_hand_over_rows_sends_messages_and_nothing_else(
    backend: Backend, binlog_server: ThrowawayMariaDB, events: Recorder
) -> None:
    """A real account with INSERT on dbnotify_relay alone (what a writer
    that calls notify(connection=...) needs): its well-formed messages
    arrive, as notify()'s would; a gap, a marker or anything else it writes
    there is not relayed; it can neither read nor write the journal."""
    backend.sql(ORDERS)
    lifecycle = Lifecycle()
    with lifecycle.connected():
        app, ext = listening(backend.make_app, "orders")
        lifecycle.wait_for_name("connected", 1)  # the start's
    database = sa.make_url(backend.url).database
    name = f"dbn_relay_{os.getpid()}"
    backend.sql(f"CREATE USER '{name}'@'127.0.0.1' IDENTIFIED BY 'pw'")
    try:
        backend.sql(f"GRANT INSERT ON `{database}`.dbnotify_relay TO '{name}'@'127.0.0.1'")
        url = sa.make_url(binlog_server.url).set(database=database, username=name, password="pw")
        account = MySQLDB(url.render_as_string(hide_password=False))
        with lifecycle.connected(), notification_received.connected_to(events):
            compact = {"separators": (",", ":")}
            forged = [
                ("m", json.dumps({"v": 1, "gap": "forged"}, **compact)),
                ("m", json.dumps({"v": 1, "m": "news", "gap": "forged"}, **compact)),
                ("m", json.dumps({"v": 1, "m": {"a": 1}, "p": 1}, **compact)),
                ("x", "not JSON"),
                ("m", encode_message("news", {"n": 1})),  # what notify() writes
            ]
            for kind, body in forged:
                account("INSERT INTO dbnotify_relay (kind, body) VALUES (?, ?)", (kind, body))
            (message,) = events.wait_for(1, "the one well-formed message")
            events.assert_no_more(1, marker(ext, app))
        assert message == {"n": 1}
        assert lifecycle.names() == [("connected", {"reconnect": False, "gap": False})], (
            "a forged gap was reported"
        )
        for statement in (
            "SELECT count(*) FROM dbnotify_journal",
            "INSERT INTO dbnotify_journal (created_at, body) VALUES (0, '{}')",
        ):
            with pytest.raises(pymysql.err.OperationalError, match="denied"):
                account(statement)
        account.close()
    finally:
        backend.sql(f"DROP USER '{name}'@'127.0.0.1'")
