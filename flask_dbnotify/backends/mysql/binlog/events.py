"""The binary log, read as a replica reads it: the dump request and the
events we use, parsed from their bytes (the formats of MariaDB's and
MySQL's replication protocol; no library).

:class:`Dump` asks the server for the log from a position and yields
:class:`Event` (header and body, checksum removed); :func:`table_map`
and :func:`rows` read the two events that carry row changes.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import pymysql
from pymysql.constants import COMMAND

# Event types (the ones we read).
QUERY = 2
ROTATE = 4
FORMAT_DESCRIPTION = 15
XID = 16
TABLE_MAP = 19
WRITE_ROWS = (23, 30)
UPDATE_ROWS = (24, 31)
DELETE_ROWS = (25, 32)
HEARTBEAT = 27
XA_PREPARE = 38
MARIADB_GTID = 162
#: MariaDB's compressed events (``log_bin_compress``), which we do not read.
COMPRESSED = frozenset(range(165, 172))

#: Column types (``enum_field_types``) whose layout differs.
TINY, SHORT, LONG, FLOAT, DOUBLE, NULL, TIMESTAMP, LONGLONG, INT24 = 1, 2, 3, 4, 5, 6, 7, 8, 9
DATE, TIME, DATETIME, YEAR, NEWDATE, VARCHAR, BIT = 10, 11, 12, 13, 14, 15, 16
TIMESTAMP2, DATETIME2, TIME2 = 17, 18, 19
JSON, NEWDECIMAL, ENUM, SET = 245, 246, 247, 248
TINY_BLOB, MEDIUM_BLOB, LONG_BLOB, BLOB, VAR_STRING, STRING, GEOMETRY = (
    249,
    250,
    251,
    252,
    253,
    254,
    255,
)
#: Numeric columns, which the signedness bitmap covers (YEAR is one in MariaDB).
NUMERIC = {TINY, SHORT, INT24, LONG, LONGLONG, NEWDECIMAL, FLOAT, DOUBLE, YEAR}
#: Types that carry a character set in the table map's optional metadata.
CHARACTER = {STRING, VAR_STRING, VARCHAR, TINY_BLOB, MEDIUM_BLOB, LONG_BLOB, BLOB, GEOMETRY}
_META_BYTES = {
    FLOAT: 1,
    DOUBLE: 1,
    VARCHAR: 2,
    VAR_STRING: 2,
    STRING: 2,
    BIT: 2,
    NEWDECIMAL: 2,
    ENUM: 2,
    SET: 2,
    BLOB: 1,
    TINY_BLOB: 1,
    MEDIUM_BLOB: 1,
    LONG_BLOB: 1,
    GEOMETRY: 1,
    JSON: 1,
    TIMESTAMP2: 1,
    DATETIME2: 1,
    TIME2: 1,
}


class Event(NamedTuple):
    """One event: its type, the server time it was written (seconds),
    where the next event begins in the log, and its body."""

    type: int
    timestamp: int
    next_position: int
    body: bytes


class Column(NamedTuple):
    """A column as a table map describes it."""

    name: str
    type: int
    #: Per type: max length, (precision, scale), fsp, length bytes, bits.
    meta: Any
    unsigned: bool
    #: Collation id of a character column (63: binary), else None.
    collation: int | None
    #: The names of an ENUM's or SET's values, in its character set.
    values: tuple[bytes, ...] | None


class TableMap(NamedTuple):
    table_id: int
    schema: str
    table: str
    columns: list[Column]


class Dump:
    """A replication session: the log from ``file``:``position`` on, as
    events. ``server_id`` must be unique among the server's replicas: a
    random one in a range no replica is usually given."""

    def __init__(
        self, connect_args: dict[str, Any], file: str, position: int, heartbeat: float
    ) -> None:
        args = dict(connect_args, autocommit=True, read_timeout=max(5, int(heartbeat * 5)))
        self.conn = pymysql.connect(**args)
        self.file = file
        #: Whether each event ends with a CRC32 (as the server writes them).
        self.checksum = False
        self.id_bytes = 6
        with self.conn.cursor() as cur:
            # Events come with the checksum the server writes (we strip it),
            # MariaDB's GTID events instead of BEGIN, and a heartbeat when
            # nothing happens, so that a dead server is noticed.
            cur.execute("SELECT @@global.binlog_checksum")
            self.checksum = str(cur.fetchone()[0]).upper() == "CRC32"
            cur.execute("SET @master_binlog_checksum = @@global.binlog_checksum")
            cur.execute("SET @mariadb_slave_capability = 4")
            cur.execute("SET @master_heartbeat_period = %s", (int(heartbeat * 1e9),))
        server_id = random.randint(1 << 30, (1 << 32) - 1)
        request = struct.pack("<IHI", position, 0, server_id) + file.encode()
        self.conn._execute_command(COMMAND.COM_BINLOG_DUMP, request)

    def events(self) -> Iterator[Event]:
        """The events, as they come; raises when the connection fails."""
        read = self.conn._read_packet
        while True:
            data = read().get_all_data()
            if data[0] == 0xFE and len(data) < 9:
                return  # end of the log (a non-blocking dump only)
            timestamp, kind, _, _, next_position, _ = struct.unpack_from("<IBIIIH", data, 1)
            body = data[20:]
            if kind == FORMAT_DESCRIPTION:
                self._format(body)
            if self.checksum:
                body = body[:-4]
            if kind == ROTATE:
                self.file = body[8:].decode(errors="replace")
            yield Event(kind, timestamp, next_position, body)

    def _format(self, body: bytes) -> None:
        # Each log file says how its events end: the algorithm byte before
        # the format event's own checksum (the server's setting can change
        # between files, and while it runs).
        self.checksum = body[-5] == 1
        post_headers = body[57:]
        # The table id is 6 bytes but where TABLE_MAP's post-header says 6.
        self.id_bytes = 4 if post_headers[TABLE_MAP - 1] == 6 else 6

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - a broken session
            self.conn._force_close()


def lenenc(data: bytes, at: int) -> tuple[int, int]:
    """A length-encoded integer at ``at``, and where what follows begins."""
    first = data[at]
    if first < 0xFB:
        return first, at + 1
    if first == 0xFC:
        return int.from_bytes(data[at + 1 : at + 3], "little"), at + 3
    if first == 0xFD:
        return int.from_bytes(data[at + 1 : at + 4], "little"), at + 4
    return int.from_bytes(data[at + 1 : at + 9], "little"), at + 9


def table_map(body: bytes, id_bytes: int) -> TableMap:
    """A TABLE_MAP event; column names, signedness, character sets and
    ENUM/SET values come from its optional metadata
    (``binlog_row_metadata = FULL``)."""
    table_id = int.from_bytes(body[:id_bytes], "little")
    at = id_bytes + 2
    schema = body[at + 1 : at + 1 + body[at]].decode(errors="replace")
    at += 1 + body[at] + 1
    table = body[at + 1 : at + 1 + body[at]].decode(errors="replace")
    at += 1 + body[at] + 1
    count, at = lenenc(body, at)
    types = list(body[at : at + count])
    at += count
    size, at = lenenc(body, at)
    metas = _metas(types, body[at : at + size])
    at += size + (count + 7) // 8  # the nullability bitmap
    extra = _optional(body[at:])
    names = extra.get(4) or [f"@{i + 1}" for i in range(count)]
    real = [m[0] if t == STRING else t for t, m in zip(types, metas, strict=True)]
    numeric = [i for i, t in enumerate(types) if t in NUMERIC]
    unsigned = set(_bits(extra.get(1, b""), numeric))
    character = [i for i, t in enumerate(real) if t in CHARACTER]
    collations = _collations(extra, character)
    # ENUM and SET columns' character sets: types 10 and 11, as 2 and 3.
    choices = [i for i, t in enumerate(real) if t in (ENUM, SET)]
    collations.update(_collations({k - 8: v for k, v in extra.items() if k in (10, 11)}, choices))
    enums = iter(extra.get(6, []))
    sets = iter(extra.get(5, []))
    columns = []
    for i, kind in enumerate(types):
        meta = metas[i]
        values: tuple[bytes, ...] | None = None
        if real[i] == ENUM:
            values = tuple(next(enums, []))
        elif real[i] == SET:
            values = tuple(next(sets, []))
        if kind == STRING:
            kind, meta = meta
        columns.append(Column(names[i], kind, meta, i in unsigned, collations.get(i), values))
    return TableMap(table_id, schema, table, columns)


def _metas(types: list[int], data: bytes) -> list[Any]:
    metas: list[Any] = []
    at = 0
    for kind in types:
        size = _META_BYTES.get(kind, 0)
        raw = data[at : at + size]
        at += size
        if kind in (VARCHAR, VAR_STRING):
            metas.append(int.from_bytes(raw, "little"))
        elif kind == STRING:
            real, length = raw[0], raw[1]
            if real & 0x30 != 0x30:  # a CHAR longer than 255 bytes
                length |= ((real & 0x30) ^ 0x30) << 4
                real |= 0x30
            metas.append((real, length))
        elif kind == BIT:
            metas.append(raw[1] * 8 + raw[0])
        elif kind == NEWDECIMAL:
            metas.append((raw[0], raw[1]))
        elif kind in (ENUM, SET):
            metas.append(raw[1])
        else:
            metas.append(raw[0] if size == 1 else None)
    return metas


def _optional(data: bytes) -> dict[int, Any]:
    """The table map's optional metadata: type -> value."""
    found: dict[int, Any] = {}
    at = 0
    while at < len(data):
        kind = data[at]
        size, at = lenenc(data, at + 1)
        value = data[at : at + size]
        at += size
        if kind == 4:  # column names
            found[kind] = _strings(value)
        elif kind in (5, 6):  # SET, ENUM values: per column, a count and strings
            lists, pos = [], 0
            while pos < len(value):
                n, pos = lenenc(value, pos)
                names = []
                for _ in range(n):
                    length, pos = lenenc(value, pos)
                    names.append(value[pos : pos + length])  # in the column's character set
                    pos += length
                lists.append(names)
            found[kind] = lists
        else:
            found[kind] = value
    return found


def _strings(value: bytes) -> list[str]:
    strings, pos = [], 0
    while pos < len(value):
        length, pos = lenenc(value, pos)
        strings.append(value[pos : pos + length].decode(errors="replace"))
        pos += length
    return strings


def _bits(bitmap: bytes, positions: list[int]) -> list[int]:
    """The positions whose bit (most significant first) is set."""
    return [
        p
        for n, p in enumerate(positions)
        if n // 8 < len(bitmap) and bitmap[n // 8] & (0x80 >> n % 8)
    ]


def _collations(extra: dict[int, Any], character: list[int]) -> dict[int, int]:
    """Column index -> collation id, from DEFAULT_CHARSET (2) or
    COLUMN_CHARSET (3)."""
    if 3 in extra:
        ids, pos = [], 0
        while pos < len(extra[3]):
            value, pos = lenenc(extra[3], pos)
            ids.append(value)
        return dict(zip(character, ids, strict=False))
    if 2 not in extra:
        return {}
    data = extra[2]
    default, pos = lenenc(data, 0)
    found = dict.fromkeys(character, default)
    while pos < len(data):
        index, pos = lenenc(data, pos)
        collation, pos = lenenc(data, pos)
        if index < len(character):
            found[character[index]] = collation
    return found


def rows(
    body: bytes, kind: int, id_bytes: int
) -> tuple[int, list[int], list[int] | None, bytes, int]:
    """A rows event's table id, the columns present in its images (before;
    after, for an UPDATE), its bytes and where the first image begins."""
    table_id = int.from_bytes(body[:id_bytes], "little")
    at = id_bytes + 2
    if kind >= 30:  # version 2: extra data
        at += int.from_bytes(body[at : at + 2], "little")
    count, at = lenenc(body, at)
    size = (count + 7) // 8
    present = [i for i in range(count) if body[at + i // 8] & (1 << i % 8)]
    at += size
    after = None
    if kind in UPDATE_ROWS:
        after = [i for i in range(count) if body[at + i // 8] & (1 << i % 8)]
        at += size
    return table_id, present, after, body, at
