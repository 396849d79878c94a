"""The pgoutput decoder (flask_dbnotify/backends/postgresql/pgoutput.py):
against a real server with wal_level=logical (the ``logical_url``
fixture), through a slot's SQL interface and through a streaming
replication connection, and on hand-built bytes, valid and not."""

from __future__ import annotations

import copy
import pickle
import random
import select
import struct
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg2
import psycopg2.extras
import pytest
from sqlalchemy.engine import make_url

from flask_dbnotify.backends.postgresql.pgoutput import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    ProtocolError,
    Record,
    Relation,
    Truncate,
    Type,
    Unchanged,
    Update,
    parse,
)

from ._helpers import SQL, WAIT

# -- against a real server ------------------------------------------------------------

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE items (
    id int PRIMARY KEY, label text, doc jsonb, price numeric(10, 2), at timestamptz,
    flag bool, raw bytea, tags text[], "Odd ""Name"" Col" text, big text, feeling mood
);
-- stored out of line, uncompressed: TOASTed
ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE SCHEMA "Other Schema";
CREATE TABLE "Other Schema"."Things" (k text PRIMARY KEY, n int, big text);
ALTER TABLE "Other Schema"."Things" REPLICA IDENTITY FULL;
ALTER TABLE "Other Schema"."Things" ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE by_index (a int NOT NULL, b int NOT NULL, c text);
CREATE UNIQUE INDEX by_index_ab ON by_index (a, b);
ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_ab;
CREATE TABLE no_identity (a int);
ALTER TABLE no_identity REPLICA IDENTITY NOTHING;
CREATE TABLE parted (id int, part int, PRIMARY KEY (id, part)) PARTITION BY LIST (part);
CREATE TABLE parted_1 PARTITION OF parted FOR VALUES IN (1);
CREATE TABLE parted_2 PARTITION OF parted FOR VALUES IN (2);
CREATE PUBLICATION pub FOR TABLE items, "Other Schema"."Things", by_index, no_identity, parted;
"""
THINGS = '"Other Schema"."Things"'
BIG = "".join(f"{i:05d}," for i in range(2000))  # 12000 bytes
INSERT_ITEM = (
    "INSERT INTO items VALUES (1, 'a', '{\"b\": [true, null], \"a\": 1}', 1.5, "
    "'2024-01-02 03:04:05.123456+00', true, '\\x0001ff', '{a,\"b c\",NULL}', 'odd', %s, 'happy')"
)
ITEM = (
    "1",
    "a",
    '{"a": 1, "b": [true, null]}',
    "1.50",
    "2024-01-02 03:04:05.123456+00",
    "t",
    "\\x0001ff",
    '{a,"b c",NULL}',
    "odd",
    BIG,
    "happy",
)
OPTIONS = {"proto_version": "1", "publication_names": "pub", "messages": "true"}
Statement = str | tuple[str, tuple[Any, ...]]


class Wal:
    """The test's database with SCHEMA, a pgoutput slot named after the
    database, a writer, and the slot's changes decoded."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.slot = f"{make_url(url).database}_slot"
        self.sql = SQL(url)
        # Text of a timestamptz follows the decoding session's TimeZone.
        self.sql("SET TimeZone = 'UTC'")
        self.sql(SCHEMA)
        self.sql("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,))
        self.writer = psycopg2.connect(url)

    def oid(self, table: str) -> int:
        return int(self.sql("SELECT %s::regclass::oid", (table,))[0][0])

    def type_oid(self, name: str) -> int:
        return int(self.sql("SELECT %s::regtype::oid", (name,))[0][0])

    def now(self) -> datetime:
        stamp: datetime = self.sql("SELECT clock_timestamp()")[0][0]
        return stamp

    def transaction(self, *statements: Statement, commit: bool = True) -> int:
        """Run ``statements`` in one transaction of the writer; its xid."""
        with self.writer.cursor() as cur:
            cur.execute("SELECT pg_current_xact_id()::xid::text")
            xid = int(cur.fetchone()[0])
            for statement in statements:
                cur.execute(*((statement,) if isinstance(statement, str) else statement))
        (self.writer.commit if commit else self.writer.rollback)()
        return xid

    def take(self, peek: bool = False) -> list[Record]:
        """The slot's changes since the last take (peek: and leave them)."""
        function = "peek" if peek else "get"
        options = [v for pair in OPTIONS.items() for v in pair]
        rows = self.sql(
            f"SELECT data FROM pg_logical_slot_{function}_binary_changes"
            "(%s, NULL, NULL, %s, %s, %s, %s, %s, %s)",
            (self.slot, *options),
        )
        return [parse(bytes(data)) for (data,) in rows]

    def close(self) -> None:
        self.writer.close()
        self.sql.close()


@pytest.fixture()
def wal(logical_url: str) -> Iterator[Wal]:
    made = Wal(logical_url)
    yield made
    made.close()


def transactions(records: list[Record]) -> list[tuple[Begin, list[Record], Commit]]:
    """``records`` as whole transactions, checked to pair up."""
    found = []
    rest = list(records)
    while rest:
        begin = rest.pop(0)
        assert isinstance(begin, Begin), records
        end = next(i for i, r in enumerate(rest) if isinstance(r, Commit | Begin))
        commit = rest[end]
        assert isinstance(commit, Commit), records
        assert (commit.commit_lsn, commit.commit_time) == (begin.final_lsn, begin.commit_time)
        assert commit.flags == 0 and commit.end_lsn > commit.commit_lsn
        found.append((begin, rest[:end], commit))
        del rest[: end + 1]
    return found


def only(records: list[Record], xid: int) -> list[Record]:
    """The changes of the one transaction in ``records``, which is ``xid``."""
    ((begin, body, _),) = transactions(records)
    assert begin.xid == xid
    return body


def items_relation(wal: Wal) -> Relation:
    def col(name: str, type_oid: int, typmod: int = -1) -> Column:
        return Column(name == "id", name, type_oid, typmod)

    return Relation(
        wal.oid("items"),
        "public",
        "items",
        "d",
        (
            *(col("id", 23), col("label", 25), col("doc", 3802)),
            col("price", 1700, (10 << 16 | 2) + 4),  # numeric(10, 2)
            *(col("at", 1184), col("flag", 16), col("raw", 17), col("tags", 1009)),
            *(col('Odd "Name" Col', 25), col("big", 25), col("feeling", wal.type_oid("mood"))),
        ),
    )


def test_insert_comes_with_its_type_relation_and_transaction(wal: Wal) -> None:
    before = wal.now()
    xid = wal.transaction((INSERT_ITEM, (BIG,)))
    after = wal.now()
    records = wal.take(peek=True)
    assert wal.take() == records  # peek leaves them, get takes them
    ((begin, body, commit),) = transactions(records)
    assert begin.xid == xid
    assert before <= begin.commit_time <= after and begin.commit_time.tzinfo is UTC
    mood = wal.type_oid("mood")
    assert body == [
        Type(mood, "public", "mood"),  # a column's type that is not built in
        items_relation(wal),
        Insert(wal.oid("items"), ITEM),
    ]
    assert commit.commit_time == begin.commit_time
    assert wal.take() == []  # taken


def test_update_and_delete_with_replica_identity_default(wal: Wal) -> None:
    wal.transaction((INSERT_ITEM, (BIG,)))
    wal.take()
    items = wal.oid("items")
    xids = [
        wal.transaction("UPDATE items SET label = 'b'"),
        wal.transaction("UPDATE items SET id = 2"),
        wal.transaction("UPDATE items SET big = 'small', flag = NULL"),
        wal.transaction("DELETE FROM items"),
    ]
    done = transactions(wal.take())
    assert [begin.xid for begin, _, _ in done] == xids
    changes = [body[-1] for _, body, _ in done]
    # Sent again: each take is a new decoding session.
    assert done[0][1][:2] == [Type(wal.type_oid("mood"), "public", "mood"), items_relation(wal)]
    assert [len(body) for _, body, _ in done] == [3, 1, 1, 1]
    labelled = ("1", "b", *ITEM[2:9], UNCHANGED, "happy")  # the TOASTed value is not sent
    moved = ("2", *labelled[1:])
    nothing_but_key: tuple[None, ...] = (None,) * 10
    assert changes == [
        # No old row: the key did not change.
        Update(items, None, None, labelled),
        # The old key, the other columns NULL.
        Update(items, None, ("1", *nothing_but_key), moved),
        Update(items, None, None, (*moved[:5], None, *moved[6:9], "small", "happy")),
        Delete(items, None, ("2", *nothing_but_key)),
    ]


def test_update_and_delete_with_replica_identity_full(wal: Wal) -> None:
    things = wal.oid(THINGS)
    wal.transaction((f"INSERT INTO {THINGS} VALUES ('k', 1, %s)", (BIG,)))
    up = wal.transaction(f"UPDATE {THINGS} SET n = 2")
    down = wal.transaction(f"DELETE FROM {THINGS}")
    _, (begin_up, update, _), (begin_down, delete, _) = transactions(wal.take())
    assert (begin_up.xid, begin_down.xid) == (up, down)
    # The whole old row, TOASTed value too; the new row leaves it out.
    assert update == [Update(things, ("k", "1", BIG), None, ("k", "2", UNCHANGED))]
    assert delete == [Delete(things, ("k", "2", BIG), None)]


def test_relation_of_each_replica_identity(wal: Wal) -> None:
    xid = wal.transaction(
        f"INSERT INTO {THINGS} (k) VALUES ('k')",
        "INSERT INTO by_index VALUES (1, 2, 'c')",
        "INSERT INTO no_identity VALUES (7)",
        "UPDATE by_index SET c = 'd'",
        "UPDATE by_index SET b = 3",
        "DELETE FROM by_index",
    )
    things, by_index, no_identity = (wal.oid(t) for t in (THINGS, "by_index", "no_identity"))
    assert only(wal.take(), xid) == [
        Relation(
            things,
            "Other Schema",
            "Things",
            "f",
            tuple(Column(True, n, t, -1) for n, t in (("k", 25), ("n", 23), ("big", 25))),
        ),
        Insert(things, ("k", None, None)),
        Relation(
            by_index,
            "public",
            "by_index",
            "i",
            (Column(True, "a", 23, -1), Column(True, "b", 23, -1), Column(False, "c", 25, -1)),
        ),
        Insert(by_index, ("1", "2", "c")),
        Relation(no_identity, "public", "no_identity", "n", (Column(False, "a", 23, -1),)),
        Insert(no_identity, ("7",)),
        Update(by_index, None, None, ("1", "2", "d")),
        Update(by_index, None, ("1", "2", None), ("1", "3", "d")),
        Delete(by_index, None, ("1", "3", None)),
    ]


def test_truncate(wal: Wal) -> None:
    items, things = wal.oid("items"), wal.oid(THINGS)
    parts = [wal.oid("parted_1"), wal.oid("parted_2")]
    xids = [
        wal.transaction(f"TRUNCATE items, {THINGS} RESTART IDENTITY CASCADE"),
        wal.transaction("TRUNCATE items"),
        wal.transaction("TRUNCATE parted"),
    ]
    done = transactions(wal.take())
    assert [begin.xid for begin, _, _ in done] == xids
    assert [[r.oid for r in body if isinstance(r, Relation)] for _, body, _ in done] == [
        [items, things],
        [items],  # again: a TRUNCATE invalidates what was sent
        parts,
    ]
    assert [body[-1] for _, body, _ in done] == [
        Truncate((items, things), True, True),
        Truncate((items,), False, False),
        # A partitioned table: its leaf partitions, as published.
        Truncate(tuple(parts), False, False),
    ]


def test_messages_transactional_and_not(wal: Wal) -> None:
    xid = wal.transaction(
        "INSERT INTO no_identity VALUES (1)",
        "SELECT pg_logical_emit_message(true, 'dbnotify', 'hello')",
    )
    # Not transactional: decoded even from a transaction rolled back. Neither
    # it nor the rollback flushes WAL, and a slot reads flushed WAL only: it
    # is seen once the WAL writer flushes (within 3 x wal_writer_delay) or
    # the next commit does.
    wal.transaction(
        "INSERT INTO no_identity VALUES (2)",
        ("SELECT pg_logical_emit_message(false, 'dbnotify', %s::bytea)", (b"\x00bye\xff",)),
        commit=False,
    )
    flushing = wal.transaction("INSERT INTO no_identity VALUES (3)")
    relation = wal.oid("no_identity")
    records = wal.take()
    message = records[5]
    assert isinstance(message, Message)
    first, last = transactions(records[:5] + records[6:])
    assert (first[0].xid, last[0].xid) == (xid, flushing)
    hello = first[1][2]
    assert isinstance(hello, Message)
    assert first[1][1:] == [
        Insert(relation, ("1",)),
        Message(True, hello.lsn, "dbnotify", b"hello"),
    ]
    # Its LSN: the end of its own record, which is where the commit record
    # starts, or just before it when a page header (or another backend's
    # record) falls between the two; CI once saw the page header.
    assert 0 < hello.lsn <= first[0].final_lsn
    assert first[2].end_lsn < message.lsn < last[0].final_lsn
    assert message == Message(False, message.lsn, "dbnotify", b"\x00bye\xff")
    assert last[1] == [Insert(relation, ("3",))]


def test_rollbacks_are_not_decoded_and_a_transaction_keeps_its_order(wal: Wal) -> None:
    wal.transaction("INSERT INTO no_identity VALUES (0)", commit=False)
    xid = wal.transaction(
        (INSERT_ITEM, (BIG,)),
        f"INSERT INTO {THINGS} VALUES ('k', 1, 'b')",
        "SAVEPOINT s",
        "INSERT INTO no_identity VALUES (-1)",
        "ROLLBACK TO SAVEPOINT s",
        "UPDATE items SET price = 2.255",
        f"DELETE FROM {THINGS}",
        "INSERT INTO no_identity VALUES (1)",
    )
    items, things, no_identity = (wal.oid(t) for t in ("items", THINGS, "no_identity"))
    body = only(wal.take(), xid)
    assert [r for r in body if not isinstance(r, Relation | Type)] == [
        Insert(items, ITEM),
        Insert(things, ("k", "1", "b")),
        Update(items, None, None, (*ITEM[:3], "2.26", *ITEM[4:9], UNCHANGED, "happy")),
        Delete(things, ("k", "1", "b"), None),
        Insert(no_identity, ("1",)),
    ]


def test_origin(wal: Wal) -> None:
    name = f"{wal.slot}_origin"
    wal.sql("SELECT pg_replication_origin_create(%s)", (name,))
    try:
        xid = wal.transaction(
            ("SELECT pg_replication_origin_session_setup(%s)", (name,)),
            "SELECT pg_replication_origin_xact_setup('1/AB', now())",
            "INSERT INTO no_identity VALUES (1)",
        )
        wal.transaction("SELECT pg_replication_origin_session_reset()")
        body = only(wal.take(), xid)
        # The origin's LSN of the transaction, not the local commit's.
        assert body[0] == Origin(1 << 32 | 0xAB, name)
        assert body[2] == Insert(wal.oid("no_identity"), ("1",))
    finally:
        wal.sql("SELECT pg_replication_origin_drop(%s)", (name,))


def test_streaming_replication_connection_and_feedback(wal: Wal) -> None:
    """What production reads: a walsender's stream, acknowledged with
    feedback that advances the slot."""
    conn = psycopg2.connect(
        wal.url,
        connection_factory=psycopg2.extras.LogicalReplicationConnection,
        options="-c TimeZone=UTC",  # the walsender's text of timestamptz
    )
    try:
        cur = conn.cursor()
        cur.start_replication(slot_name=wal.slot, decode=False, options=OPTIONS)
        first = wal.transaction((INSERT_ITEM, (BIG,)), "UPDATE items SET label = 'b'")
        deadline = time.monotonic() + WAIT
        records: list[Record] = []
        while not records or not isinstance(records[-1], Commit):
            message = cur.read_message()
            if message is None:
                left = deadline - time.monotonic()
                assert left > 0, f"no Commit within {WAIT} s, got {records}"
                select.select([conn], [], [], left)
            else:
                # (data_start is 0/0 for Type and Relation messages.)
                records.append(parse(message.payload))
        items = wal.oid("items")
        assert only(records, first)[1:] == [
            items_relation(wal),
            Insert(items, ITEM),
            Update(items, None, None, ("1", "b", *ITEM[2:9], UNCHANGED, "happy")),
        ]
        commit = records[-1]
        assert isinstance(commit, Commit)

        def confirmed() -> int:
            (lsn,) = wal.sql(
                "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots WHERE slot_name = %s",
                (wal.slot,),
            )[0]
            return int(lsn)

        assert confirmed() < commit.end_lsn
        cur.send_feedback(flush_lsn=commit.end_lsn, reply=True)
        deadline = time.monotonic() + WAIT
        while confirmed() != commit.end_lsn:  # the server's reply follows the update
            left = deadline - time.monotonic()
            assert left > 0, f"confirmed_flush_lsn not advanced within {WAIT} s"
            select.select([conn], [], [], min(left, 0.5))
            assert cur.read_message() is None  # a keepalive
        second = wal.transaction("DELETE FROM items")
    finally:
        conn.close()
    # Let the walsender go (it releases the slot on exit), then look: only
    # what was not confirmed is decoded again.
    wal.sql(
        "SELECT pg_terminate_backend(active_pid, %s) FROM pg_replication_slots "
        "WHERE slot_name = %s AND active_pid IS NOT NULL",
        (int(WAIT * 1000), wal.slot),
    )
    assert only(wal.take(), second)[-1] == Delete(items, None, ("1", *(None,) * 10))


# -- hand-built bytes -----------------------------------------------------------------


def string(text: str) -> bytes:
    return text.encode() + b"\0"


def tuple_data(*values: bytes | None | Unchanged) -> bytes:
    """TupleData: text for str-like bytes, 'n' for None, 'u' for UNCHANGED."""
    out = struct.pack("!H", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED:
            out += b"u"
        else:
            assert isinstance(value, bytes)
            out += b"t" + struct.pack("!I", len(value)) + value
    return out


WHEN = datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
WHEN_MICROS = 757_479_845_123_456  # since 2000-01-01 UTC
BINARY = b"b" + struct.pack("!I", 3) + b"\x00\x01\xff"
VALID: list[tuple[bytes, Record]] = [
    (
        b"B" + struct.pack("!QqI", 0x1_0000_00AB, WHEN_MICROS, 4_000_000_000),
        Begin(0x1_0000_00AB, WHEN, 4_000_000_000),
    ),
    (
        b"C" + struct.pack("!BQQq", 0, 0x1_0000_00AB, 0x1_0000_00F0, WHEN_MICROS),
        Commit(0, 0x1_0000_00AB, 0x1_0000_00F0, WHEN),
    ),
    (
        b"R"
        + struct.pack("!I", 16385)
        + string("Other Schema")
        + string("Tëst")
        + b"f"
        + struct.pack("!H", 2)
        + b"\x01"
        + string("id")
        + struct.pack("!Ii", 23, -1)
        + b"\x00"
        + string('Odd "Name" Col')
        + struct.pack("!Ii", 1700, 655366),
        Relation(
            16385,
            "Other Schema",
            "Tëst",
            "f",
            (Column(True, "id", 23, -1), Column(False, 'Odd "Name" Col', 1700, 655366)),
        ),
    ),
    (
        b"R" + struct.pack("!I", 7) + string("") + string("t") + b"n" + struct.pack("!H", 0),
        Relation(7, "", "t", "n", ()),
    ),
    (
        b"I" + struct.pack("!I", 16385) + b"N" + tuple_data(b"1", None, UNCHANGED, "é".encode()),
        Insert(16385, ("1", None, UNCHANGED, "é")),
    ),
    (
        b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!H", 2) + BINARY + b"t\0\0\0\0",
        Insert(1, (b"\x00\x01\xff", "")),
    ),
    (b"I" + struct.pack("!I", 1) + b"N" + tuple_data(), Insert(1, ())),
    (
        b"U" + struct.pack("!I", 9) + b"N" + tuple_data(b"1", UNCHANGED),
        Update(9, None, None, ("1", UNCHANGED)),
    ),
    (
        b"U" + struct.pack("!I", 9) + b"K" + tuple_data(b"1", None) + b"N" + tuple_data(b"2", b"x"),
        Update(9, None, ("1", None), ("2", "x")),
    ),
    (
        b"U" + struct.pack("!I", 9) + b"O" + tuple_data(b"1", b"a") + b"N" + tuple_data(b"1", b"b"),
        Update(9, ("1", "a"), None, ("1", "b")),
    ),
    (b"D" + struct.pack("!I", 9) + b"K" + tuple_data(b"1", None), Delete(9, None, ("1", None))),
    (b"D" + struct.pack("!I", 9) + b"O" + tuple_data(b"1", b"a"), Delete(9, ("1", "a"), None)),
    (b"T" + struct.pack("!IBII", 2, 3, 10, 11), Truncate((10, 11), True, True)),
    (b"T" + struct.pack("!IBI", 1, 2, 10), Truncate((10,), False, True)),
    (b"T" + struct.pack("!IB", 0, 0), Truncate((), False, False)),
    (
        b"M\x01" + struct.pack("!Q", 99) + string("dbnotify") + struct.pack("!I", 5) + b"hello",
        Message(True, 99, "dbnotify", b"hello"),
    ),
    (
        b"M\x00" + struct.pack("!Q", 99) + string("") + struct.pack("!I", 3) + b"\0\n\0",
        Message(False, 99, "", b"\0\n\0"),
    ),
    (b"O" + struct.pack("!Q", 0xAB) + string("upstream"), Origin(0xAB, "upstream")),
    (
        b"Y" + struct.pack("!I", 16390) + string("public") + string("mood"),
        Type(16390, "public", "mood"),
    ),
]


@pytest.mark.parametrize(("data", "record"), VALID, ids=[repr(r)[:40] for _, r in VALID])
def test_parse_hand_built(data: bytes, record: Record) -> None:
    assert parse(data) == record
    assert parse(bytearray(data)) == record and parse(memoryview(data)) == record


def test_timestamps_count_microseconds_from_2000_utc() -> None:
    begin = parse(b"B" + struct.pack("!QqI", 1, 0, 1))
    assert isinstance(begin, Begin) and begin.commit_time == datetime(2000, 1, 1, tzinfo=UTC)
    begin = parse(b"B" + struct.pack("!QqI", 1, -1, 1))
    assert isinstance(begin, Begin)
    assert begin.commit_time == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    with pytest.raises(ProtocolError, match="Begin: timestamp .* out of range"):
        parse(b"B" + struct.pack("!QqI", 1, 2**63 - 1, 1))


def test_unchanged_is_one_readable_value() -> None:
    assert repr(UNCHANGED) == "UNCHANGED" and Unchanged() is UNCHANGED
    assert copy.deepcopy(UNCHANGED) is UNCHANGED
    assert pickle.loads(pickle.dumps(UNCHANGED)) is UNCHANGED
    record = Insert(1, ("a", UNCHANGED))
    assert repr(record) == "Insert(relation_oid=1, new=('a', UNCHANGED))"
    assert pickle.loads(pickle.dumps(record)) == record


@pytest.mark.parametrize(("data", "record"), VALID, ids=[repr(r)[:40] for _, r in VALID])
def test_every_truncation_and_extra_byte_is_a_protocol_error(data: bytes, record: Record) -> None:
    for end in range(len(data)):
        with pytest.raises(ProtocolError):
            parse(data[:end])
    with pytest.raises(ProtocolError, match="bytes too many|must be|does not end"):
        parse(data + b"\0")


INSERT_1 = b"I" + struct.pack("!I", 1) + b"N"


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "empty message"),
        (b"Z\0\0", r"unknown message tag 'Z' \(byte 0x5a at offset 0\)"),
        (b"\xff", "unknown message tag 'ÿ' .byte 0xff"),
        *((tag, r"streamed transactions are not supported \(proto_version 1\)") for tag in b"SEcA"),
        *((tag, "two-phase commit messages are not supported") for tag in b"bPKrp"),
        (b"B" + bytes(19), "Begin message must be 21 bytes, got 20"),
        (b"C" + bytes(30), "Commit message must be 26 bytes, got 31"),
        (b"I\0\0", r"Insert message truncated: relation oid and 'N' needs 5 bytes at offset 1"),
        (INSERT_1[:-1] + b"X" + tuple_data(), "Insert: expected 'N' at offset 5, got 'X'"),
        (INSERT_1 + b"\0", "Insert message truncated: no column count at offset 6"),
        (INSERT_1 + b"\0\2n", "Insert message truncated: column 2 of 2 missing at offset 9"),
        (
            INSERT_1 + b"\0\1x",
            r"Insert: column 1 of 1 has unknown kind 'x' \(byte 0x78 at offset 8",
        ),
        (INSERT_1 + b"\0\1t\0\0", "Insert message truncated: column 1 of 1 has no length"),
        (
            INSERT_1 + b"\0\1t\x7f\xff\xff\xff",
            "Insert message truncated: column 1 of 1 is 2147483647 bytes at offset 13",
        ),
        (INSERT_1 + b"\0\1t\0\0\0\1\xff", "Insert: column 1 of 1 at offset 13 is not UTF-8"),
        (b"U\0\0\0\1X", "Update: expected 'K', 'O' or 'N' at offset 5, got 'X'"),
        (b"U\0\0\0\1K" + tuple_data() + b"O", "Update: expected 'N' at offset 8, got 'O'"),
        (b"D\0\0\0\1N" + tuple_data(), "Delete: expected 'K' or 'O' at offset 5, got 'N'"),
        (b"R\0\0\0\1s\0t\0x\0\0", "Relation: unknown replica identity 'x' at offset 9"),
        (b"R\0\0\0\1s\0t", "Relation message truncated: relation name at offset 7 has no ending"),
        (b"R\0\0\0\1\xff\0t\0d\0\0", "Relation: schema at offset 5 is not UTF-8"),
        (
            b"R\0\0\0\1s\0t\0d\0\1\1c\0\0\0",
            "Relation message truncated: column 1 of 1: type and typmod needs 8 bytes at offset 15",
        ),
        (b"T\0\0\0\2\0\0\0\0\1", "Truncate message of 2 relations must be 14 bytes, got 10"),
        (
            b"M\1" + bytes(8) + b"p\0\0\0\0\5abc",
            "Message: content of 5 bytes at offset 16 does not end the message of 19 bytes",
        ),
        (b"O" + bytes(8) + b"name", "Origin message truncated: name at offset 9 has no ending NUL"),
        (b"Y\0\0\0\1s\0t\0\0", "Type message has 1 bytes too many at offset 9"),
    ],
)
def test_malformed_input_says_what_is_wrong(data: bytes | int, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        parse(bytes([data]) + bytes(30) if isinstance(data, int) else data)


def test_no_other_exception_escapes() -> None:
    """Random damage to valid messages: a record or a ProtocolError."""
    rng = random.Random(13)
    for _ in range(20_000):
        data = bytearray(rng.choice(VALID)[0])
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            where = rng.randrange(len(data))
            if rng.random() < 0.2:
                del data[where:]
                data += rng.randbytes(rng.randint(0, 8))
            else:
                data[where] = rng.choice((0, 1, 0x7F, 0xFF, rng.randrange(256)))
        try:
            parse(bytes(data))
        except ProtocolError:
            pass
