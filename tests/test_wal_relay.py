"""The WAL relay (flask_dbnotify/backends/postgresql/wal/relay.py and
tojson.py): JSON built in Python from pgoutput's text is what the server's
``to_json()`` gives, byte for byte; bodies built in Python equal those the
server builds; journal ids keep commit order and the notification names
them; events equal durable triggers' under unusual session settings.
Values come from a real slot (its SQL interface), on the logical server."""

from __future__ import annotations

import json
import select
import threading
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from flask_dbnotify import ChangeEvent
from flask_dbnotify.backends.postgresql import pgoutput
from flask_dbnotify.backends.postgresql.common import CHANNEL
from flask_dbnotify.backends.postgresql.wal import Relayed, tojson, writer
from flask_dbnotify.backends.postgresql.wal.leader import Stream
from flask_dbnotify.backends.postgresql.wal.relay import Relay

from ._helpers import SQL, WAIT
from .test_wal import MakeApp, side_by_side

# -- each type's converter against to_json() --------------------------------------

ALL_CODE_POINTS = [
    "".join(chr(n) for n in range(start, min(start + 40_000, 0x110000)) if not 0xD800 <= n < 0xE000)
    for start in range(1, 0x110000, 40_000)
]
TRICKY_TEXT = [
    "",
    " ",
    'quote " and backslash \\ and slash /',
    "\b\f\n\r\t\x01\x07\x0b\x1b\x1f\x7f",
    "\u0080\u00a0\u00e9\u2028\u2029\ufeff\uffff",
    "😀 \U0001f600\U0010ffff",
    "tab\tnewline\nreturn\r",
    "%s %(x)s {} {{",
]
FLOATS = ["NaN", "Infinity", "-Infinity", "-0", "0", "0.1", "1e10", "123456789", "-1.5e-7"]
VALUES: dict[str, list[str]] = {
    "int2": ["-32768", "0", "32767"],
    "int4": ["-2147483648", "2147483647"],
    "int8": ["-9223372036854775808", "9223372036854775807"],
    "oid": ["0", "4294967295"],
    "float4": [*FLOATS, "1e-45", "3.4028235e38", "1.17549435e-38"],
    "float8": [
        *FLOATS,
        "5e-324",
        "1.7976931348623157e308",
        "0.30000000000000004",
        "1e15",
        "1e16",
        "1e22",
        "1e-5",
        "123456789012345678",
    ],
    "numeric": ["NaN", "Infinity", "-Infinity", "0", "-0", "0.000", "-1.5", "1e-20", "1e20"],
    "numeric(10, 2)": ["1.5", "-0.001", "99999999.99"],
    "bool": ["t", "f"],
    "text": TRICKY_TEXT + ALL_CODE_POINTS,
    "varchar(20)": ["a\tb", "é😀"],
    "character(5)": ["ab", "", "abcde"],
    "bpchar": ["ab  ", "x"],
    "name": ["a name", "é\n"],
    "uuid": ["A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"],
    "json": ['  {"b": 1,  "a": [1, 2.50] } ', '"x\\u0000y\\n"', "1e5", "null", '{"a":\n\t1}'],
    "jsonb": ['  {"b": 1,  "a": [1, 2.50] } ', '"\\u00e9\\u2028"', "1e5", "1.000", "null"],
    "date": ["2024-01-02", "infinity", "-infinity", "0044-03-15 BC", "4713-01-01 BC"]
    + ["5874897-12-31", "0001-01-01", "0001-12-31 BC"],
    "timestamp": ["2024-01-02 03:04:05.123456", "2024-01-02 03:04:05.1", "2024-01-02 03:04:05"]
    + ["infinity", "-infinity", "0044-03-15 12:00:00 BC", "4713-11-24 00:00:00 BC"]
    + ["294276-12-31 23:59:59.999999"],
}
ZONED = [
    "2024-01-02 03:04:05.123456+00",
    "2024-07-01 12:00:00.5+00",
    "1970-01-01 00:00:00+00",
    "1900-06-01 12:00:00+00",
    "1845-01-01 00:00:00+00",
    "0044-03-15 12:00:00+00 BC",
    "294276-12-31 23:59:59.999999+00",
    "infinity",
    "-infinity",
]
#: Offsets of whole hours, with minutes, with seconds (local mean time
#: before standard time), east and west, and fixed POSIX zones.
TIME_ZONES = [
    "UTC",
    "Asia/Kolkata",
    "America/St_Johns",
    "Europe/Amsterdam",
    "Pacific/Chatham",
    "Africa/Monrovia",
    "Europe/London",
    "<+0530>-05:30",
    "-03:15",
    "EST5EDT",
]


class Slot:
    """A pgoutput slot on the test's database, read through its SQL
    interface, in a session whose settings the test chooses (the text of
    values follows them, as it follows a WAL sender's)."""

    def __init__(self, url: str) -> None:
        self.sql = SQL(url)
        self.name = f"{make_url(url).database}_relay"
        self.sql("CREATE PUBLICATION relay_pub FOR ALL TABLES")
        self.sql("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.name,))

    def records(self, peek: bool = False) -> list[pgoutput.Record]:
        function = "peek" if peek else "get"
        rows = self.sql(
            f"SELECT data FROM pg_logical_slot_{function}_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', 'relay_pub')",
            (self.name,),
        )
        return [pgoutput.parse(bytes(data)) for (data,) in rows]

    def inserted(self) -> list[pgoutput.Values]:
        return [r.new for r in self.records() if isinstance(r, pgoutput.Insert)]


@pytest.fixture()
def slot(logical_url: str) -> Iterator[Slot]:
    made = Slot(logical_url)
    yield made
    made.sql.close()


def texts_and_json(slot: Slot, type_name: str, values: list[str]) -> list[tuple[str, str]]:
    """Each value of ``type_name`` as pgoutput writes it, and as to_json()
    writes it, both in the slot's session."""
    slot.sql(f"CREATE TABLE v (k serial PRIMARY KEY, v {type_name})")
    slot.sql(
        f"INSERT INTO v (v) SELECT x::{type_name} FROM unnest(%s::text[]) "
        "WITH ORDINALITY AS u(x, n) ORDER BY n",
        (values,),
    )
    texts = [row[1] for row in slot.inserted()]
    expected = [j for (j,) in slot.sql("SELECT to_json(v)::text FROM v ORDER BY k")]
    assert len(texts) == len(expected) == len(values)
    assert all(isinstance(t, str) for t in texts), texts
    return list(zip(texts, expected, strict=True))


@pytest.mark.parametrize("type_name", list(VALUES))
def test_python_json_of_each_type_is_what_to_json_gives(slot: Slot, type_name: str) -> None:
    slot.sql("SET DateStyle = 'ISO, MDY'")
    oid = int(slot.sql("SELECT %s::regtype::oid", (type_name,))[0][0])
    convert = tojson.converters({"DateStyle": "ISO, MDY"}, None)[oid]
    pairs = texts_and_json(slot, type_name, VALUES[type_name])
    assert [convert(text) for text, _ in pairs] == [expected for _, expected in pairs]


@pytest.mark.parametrize("zone", TIME_ZONES)
@pytest.mark.parametrize("date_style", ["ISO, MDY", "ISO, DMY"])
def test_timestamptz_in_python_is_what_to_json_gives_in_the_same_zone(
    slot: Slot, zone: str, date_style: str
) -> None:
    slot.sql("SET TimeZone = %s", (zone,))
    slot.sql("SET DateStyle = %s", (date_style,))
    stream = {"DateStyle": date_style, "TimeZone": zone}
    convert = tojson.converters(stream, zone)[tojson.TIMESTAMPTZ]
    pairs = texts_and_json(slot, "timestamptz", ZONED)
    assert [convert(text) for text, _ in pairs] == [expected for _, expected in pairs]


def test_dates_stay_with_the_server_unless_written_iso_in_the_relay_zone() -> None:
    """Another DateStyle writes text the Python converters do not read;
    another zone gives other offsets: those types go to the server."""
    datetimes = {tojson.DATE, tojson.TIMESTAMP, tojson.TIMESTAMPTZ}
    iso_utc = tojson.converters({"DateStyle": "ISO, MDY", "TimeZone": "UTC"}, "UTC")
    assert datetimes <= iso_utc.keys()
    for style in ("SQL, DMY", "Postgres, MDY", "German, DMY"):
        other = tojson.converters({"DateStyle": style, "TimeZone": "UTC"}, "UTC")
        assert not datetimes & other.keys()
    elsewhere = tojson.converters({"DateStyle": "ISO, MDY", "TimeZone": "UTC"}, "Etc/UTC")
    assert tojson.TIMESTAMPTZ not in elsewhere and tojson.TIMESTAMP in elsewhere
    assert not datetimes & tojson.converters({}, None).keys()


# -- the relay: Python-built bodies against the server's ---------------------------

WEIRD = "we\\ird\tname"  # a backslash and a tab: COPY must escape both
TABLES = f"""
CREATE TABLE fast (id int PRIMARY KEY, "Name" text, qty int8, price numeric(10, 2), ok bool,
    ratio float8, doc json, tags jsonb, day date, at timestamp, seen timestamptz,
    code uuid, big text);
ALTER TABLE fast ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE "{WEIRD}" (id int PRIMARY KEY, list int[], note text);
"""
BIG = "".join(f"{i:05d}," for i in range(2000))  # stored out of line: TOASTed
#: A json value's whitespace is kept: a return, a newline and a tab in a body.
DOC = '{"a":\r\n\t1,  "b": "\\\\ \\"", "c": 2.50}'
ROW = (
    "INSERT INTO fast VALUES (%s, %s, 9007199254740993, 1.50, true, 'NaN', %s, "
    "'{\"b\": [1, 2.50]}', '0044-03-15 BC', '2024-01-02 03:04:05.5', '1900-06-01 12:00:00+00', "
    "gen_random_uuid(), %s)"
)
WRITES: list[tuple[str, tuple[Any, ...]]] = [
    (ROW, (1, 'tab\there "quoted" back\\slash\nnew line', DOC, BIG)),
    (ROW, (2, None, None, "small")),
    (f"INSERT INTO \"{WEIRD}\" VALUES (1, '{{1,NULL}}', 'x')", ()),
    ("UPDATE fast SET qty = qty + 1 WHERE id = 1", ()),  # big is UNCHANGED
    ('UPDATE fast SET "Name" = "Name"', ()),  # changes nothing
    ("UPDATE fast SET ratio = '-Infinity', \"Name\" = 'é\u2028😀' WHERE id = 2", ()),
    (f"UPDATE \"{WEIRD}\" SET note = E'a\\tb'", ()),
    ("DELETE FROM fast WHERE id = 1", ()),
    (
        "INSERT INTO fast (id, ratio) SELECT g, g / 3.0::float8 FROM generate_series(10, 60) AS g",
        (),
    ),
    (f'DELETE FROM "{WEIRD}"', ()),
]
#: Journal rows: fast 2 + 51 inserts, 2 updates (one changes nothing, one
#: only qty), a delete; the other table an insert, an update, a delete.
EXPECTED = {"all": 59, "columns": 59, "when_changed": 58}
WATCHES = {
    "all": {},
    "columns": {"columns": ["qty", "doc"]},
    "when_changed": {"when_changed": ["ratio"]},
}


@pytest.fixture()
def relay_conn(logical_url: str) -> Iterator[Any]:
    conn = psycopg2.connect(logical_url)
    yield conn
    conn.close()


def journal_bodies(sql: SQL, after: int) -> list[tuple[int, str | None, str]]:
    return [
        (int(i), w, b)
        for i, w, b in sql(
            "SELECT id, watch, body FROM dbnotify_journal WHERE id > %s ORDER BY id", (after,)
        )
    ]


@pytest.mark.parametrize(
    ("small", "chars"),
    [(writer.SMALL, writer.SMALL_CHARS), (0, writer.SMALL_CHARS), (writer.SMALL, 10)],
    ids=["one-query", "copy", "copy-by-size"],
)
@pytest.mark.parametrize("watch", list(WATCHES))
def test_bodies_built_in_python_equal_the_servers(
    wal_app: MakeApp,
    wal_sql: SQL,
    relay_conn: Any,
    logical_url: str,
    watch: str,
    small: int,
    chars: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same decoded changes relayed twice: bodies built in Python
    (sent in the relay's one query, or past SMALL rows or SMALL_CHARS
    characters copied in), then
    every body built by the server: byte for byte the same, in the same
    order; the notification names each time's ids."""
    monkeypatch.setattr(writer, "SMALL", small)
    monkeypatch.setattr(writer, "SMALL_CHARS", chars)
    wal_sql(TABLES)
    app, ext = wal_app()
    ext.watch("fast", **WATCHES[watch])
    ext.watch(f'"{WEIRD}"')
    ext.install_triggers(app)
    for statement, params in WRITES:
        wal_sql(statement, params)
    slot = app.config["DBNOTIFY_SLOT"]
    # Floats to 15 digits in the relay's session: the WAL sender's must
    # follow (its default writes 17), or the server's bodies would differ.
    relay = Relay(relay_conn, "public", slot)
    relay_conn.cursor().execute("SET extra_float_digits = 0")
    relay.load()
    relay.set_up_stream(wal_sql.conn)  # the session that decodes
    data = wal_sql(
        "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
        "'proto_version', '1', 'publication_names', %s)",
        (slot, slot),
    )
    stream = Stream(None, relay, 0, None)
    for (message,) in data:
        stream.handle(pgoutput.parse(bytes(message)))
    fast = next(r for r in stream.relations.values() if r.name == "fast")
    assert {c.type_oid for c in fast.columns} <= relay.converters.keys()
    assert any(v is pgoutput.UNCHANGED for c in stream.pending if c.new for v in c.new), (
        "no TOASTed value left out"
    )

    listener = psycopg2.connect(logical_url)
    listener.autocommit = True
    listener.cursor().execute(f"LISTEN {CHANNEL}")
    try:
        runs = []
        for converters in (relay.converters, {}):
            relay.converters = converters
            last = int(wal_sql("SELECT coalesce(max(id), 0) FROM dbnotify_journal")[0][0])
            relay.relay(stream.pending, stream.pending_end)
            rows = journal_bodies(wal_sql, last)
            notified = json.loads(next_notification(listener))
            assert notified["J"] == [rows[0][0], rows[-1][0]], (notified, rows[0][0])
            runs.append([(w, b) for _, w, b in rows])
    finally:
        listener.close()
    python, server = runs
    assert python == server
    assert len(python) == EXPECTED[watch]


def next_notification(conn: Any) -> str:
    conn.poll()
    while not conn.notifies:
        assert select.select([conn], [], [], WAIT)[0], "no notification"
        conn.poll()
    return str(conn.notifies.pop(0).payload)


# -- events against durable triggers' under other session settings ---------------

SHAPE = (
    'CREATE TABLE {{}} (id int PRIMARY KEY, "Part" text, qty int2, big int8, price numeric(8, 3), '
    "ratio float4, ok bool, note varchar(30), code character(4), nm name, u uuid, o oid, "
    "doc json, tags jsonb, day date, at timestamp, seen timestamptz{})"
)
SHAPED_WRITES = [
    "INSERT INTO {} VALUES (1, E'a\\tb\\\\c\"d\\u2028', 32767, -9223372036854775808, 1.5, "
    "'Infinity', true, E'\\x01\\x7f', 'ab', 'nm', gen_random_uuid(), 42, "
    "E'{{\"a\":\\n 1.50}}', '[1, 2.0]', '0044-03-15 BC', '294276-12-31 23:59:59.999999', "
    "'1900-06-01 12:00:00+00'), (2, 'x', NULL, NULL, 'NaN', '-0', false, NULL, NULL, NULL, "
    "NULL, NULL, NULL, NULL, 'infinity', '-infinity', '2024-07-01 12:00:00.5+00')",
    "UPDATE {} SET qty = 1, seen = '1845-01-01 00:00:00+00' WHERE id = 2",
    "DELETE FROM {} WHERE id = 1",
]


@pytest.mark.parametrize("extra", ["", ", list int[]"], ids=["python", "server"])
@pytest.mark.parametrize(
    "settings",
    [("ISO, DMY", "America/St_Johns"), ("SQL, DMY", "Asia/Kolkata"), ("German", "UTC")],
    ids=["iso", "sql", "german"],
)
def test_events_equal_trigger_events_under_other_date_styles_and_zones(
    logical_url: str,
    wal_app: MakeApp,
    wal_sql: SQL,
    settings: tuple[str, str],
    extra: str,
) -> None:
    """The database's DateStyle and TimeZone, which every session takes
    (writers, the WAL sender, the relay): whatever they are, events equal
    durable triggers', whether the relay builds the bodies (every column
    of a type it knows) or the server does (a column of another type)."""
    style, zone = settings
    database = make_url(logical_url).database
    wal_sql(f'ALTER DATABASE "{database}" SET DateStyle = %s', (style,))
    wal_sql(f'ALTER DATABASE "{database}" SET TimeZone = %s', (zone,))
    writer = SQL(logical_url)  # a session with the database's settings
    writer(SHAPE.format(extra).format("by_triggers"))
    writer(SHAPE.format(extra).format("by_wal"))
    try:
        with side_by_side(logical_url, wal_app, "by_triggers", "by_wal") as (by_triggers, by_wal):
            for statement in SHAPED_WRITES:
                writer(statement.format("by_triggers"))
                writer(statement.format("by_wal"))
            expected = by_triggers.wait_for(4)
            got = by_wal.wait_for(4)
    finally:
        writer.close()

    def shape(e: ChangeEvent) -> tuple[Any, ...]:
        new = {k: v for k, v in (e.new or {}).items() if k != "u"}
        old = {k: v for k, v in (e.old or {}).items() if k != "u"}
        return (e.op, e.pk, new, old, e.changed)

    assert [shape(e) for e in got] == [shape(e) for e in expected]
    assert got[0].new is not None and got[0].new["seen"] == expected[0].new["seen"]


# -- the hand-over to the leading process's own listener -------------------------


def test_a_listener_waits_for_the_relay_under_way_and_no_later_one() -> None:
    """A notification can reach the leading process's listener before its
    relay has handed the rows over: the listener waits for that relay.
    One that names rows of no relay of ours (another process's, a durable
    message) waits for the relay under way only, even when the next one
    begins at once (a busy stream), and is then read from the journal."""
    relayed = Relayed()
    relayed.expect()
    got: dict[str, Any] = {}
    started = threading.Event()

    def listener(name: str, key: tuple[int, int, int]) -> None:
        started.set()
        got[name] = relayed.take(*key)

    ours = threading.Thread(target=listener, args=("ours", (1, 2, 7)))
    ours.start()
    started.wait(WAIT)
    relayed.put((1, 2, 7, ["a", "b"]))
    ours.join(WAIT)
    assert got["ours"] == [(1, "a"), (2, "b")]

    relayed.expect()
    started.clear()
    foreign = threading.Thread(target=listener, args=("foreign", (5, 5, 9)))
    foreign.start()
    started.wait(WAIT)
    relayed.put((3, 3, 8, ["c"]))
    relayed.expect()  # the next relay, still under way
    foreign.join(WAIT)
    assert not foreign.is_alive(), "the listener waits for a later relay"
    assert got["foreign"] is None
    relayed.put(None)

    # A relay whose rows are not handed over (some built on the server):
    # its notification is read back at once, even while the next relay runs.
    relayed.expect()
    relayed.put((6, 9, 10, None))
    relayed.expect()
    done = threading.Event()
    server_built = threading.Thread(target=lambda: (listener("server", (6, 9, 10)), done.set()))
    server_built.start()
    assert done.wait(WAIT / 4), "the listener waited for the next relay"
    assert got["server"] is None
    relayed.put(None)
