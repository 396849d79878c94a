"""A decoder of the ``pgoutput`` logical replication protocol, version 1
(PostgreSQL's "Logical Replication Message Formats"): one message in,
one record out. Pure: no I/O, no state (a Relation record says what the
columns of later Inserts, Updates and Deletes of its oid are; keeping it
is the caller's business).

Tuple values are as the server's output functions wrote them in the
decoding session (text of ``timestamptz`` follows its TimeZone, of
``bytea`` its bytea_output, and so on), decoded from UTF-8; ``None`` is
SQL NULL and :data:`UNCHANGED` a TOASTed value that the change did not
touch and the server did not send.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, TypeAlias

#: Timestamps count microseconds from this instant.
PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)


class ProtocolError(ValueError):
    """A message that is not valid pgoutput (version 1): says which field
    or byte was wrong."""


class Unchanged:
    """The type of :data:`UNCHANGED`, of which it is the only instance."""

    _instance: Unchanged | None = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"  # pickled and copied as the singleton


#: A TOASTed value the change left as it was, not sent (tuple kind 'u').
UNCHANGED: Final = Unchanged()

#: One value per column of the relation: text, bytes (binary format),
#: None (NULL) or UNCHANGED.
Values: TypeAlias = tuple[str | bytes | None | Unchanged, ...]


@dataclass(frozen=True)
class Column:
    """One column of a :class:`Relation`."""

    key: bool  # part of the replica identity key
    name: str
    type_oid: int
    typmod: int


@dataclass(frozen=True)
class Relation:
    """``R``: a table's description, before its first change and after it changes."""

    oid: int
    schema: str  # '' for pg_catalog
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class Begin:
    """``B``: a transaction's start; its changes follow, then its :class:`Commit`."""

    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    """``C``: the end of a committed transaction; ``end_lsn`` is where to resume after it."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True)
class Insert:
    """``I``: a row inserted."""

    relation_oid: int
    new: Values


@dataclass(frozen=True)
class Update:
    """``U``: a row updated."""

    relation_oid: int
    old: Values | None  # the whole old row ('O': REPLICA IDENTITY FULL)
    key: Values | None  # the old key ('K': only when the key changed)
    new: Values


@dataclass(frozen=True)
class Delete:
    """``D``: a row deleted; the old row or its key, as the replica identity gives."""

    relation_oid: int
    old: Values | None
    key: Values | None


@dataclass(frozen=True)
class Truncate:
    """``T``: tables emptied."""

    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True)
class Message:
    """``M``: a logical message (``pg_logical_emit_message``)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True)
class Origin:
    """``O``: the origin of a transaction replicated from elsewhere."""

    commit_lsn: int
    name: str


@dataclass(frozen=True)
class Type:
    """``Y``: a data type that is not built in."""

    oid: int
    schema: str
    name: str


Record: TypeAlias = (
    Begin | Commit | Relation | Insert | Update | Delete | Truncate | Message | Origin | Type
)

_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_OID_KIND = struct.Struct("!IB")
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_COLUMN_TAIL = struct.Struct("!Ii")
_MESSAGE_HEAD = struct.Struct("!BQ")
_TRUNCATE_HEAD = struct.Struct("!IB")
_REPLICA_IDENTITIES = frozenset("dnfi")
_STREAMED = frozenset(b"SEcA")
_TWO_PHASE = frozenset(b"bPKrp")


def _time(micros: int, what: str) -> datetime:
    try:
        return PG_EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise ProtocolError(f"{what}: timestamp {micros} is out of range") from None


def _unpack(st: struct.Struct, data: bytes, pos: int, field: str, what: str) -> tuple[int, ...]:
    if pos + st.size > len(data):
        raise ProtocolError(
            f"{what} message truncated: {field} needs {st.size} bytes at offset {pos}, "
            f"the message has {len(data)}"
        )
    return st.unpack_from(data, pos)


def _string(data: bytes, pos: int, field: str, what: str) -> tuple[str, int]:
    """The NUL-terminated string at ``pos``, and the offset past its NUL."""
    end = data.find(b"\0", pos)
    if end < 0:
        raise ProtocolError(f"{what} message truncated: {field} at offset {pos} has no ending NUL")
    try:
        return data[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what}: {field} at offset {pos} is not UTF-8: {exc}") from None


def _done(data: bytes, pos: int, what: str) -> None:
    if pos != len(data):
        raise ProtocolError(f"{what} message has {len(data) - pos} bytes too many at offset {pos}")


def _tuple(data: bytes, pos: int, what: str) -> tuple[Values, int]:
    """TupleData at ``pos``, and the offset past it. The hot path: one
    iteration per column, with bounds checked by hand."""
    size = len(data)
    if pos + 2 > size:
        raise ProtocolError(f"{what} message truncated: no column count at offset {pos}")
    (count,) = _U16.unpack_from(data, pos)
    pos += 2
    values: list[str | bytes | None | Unchanged] = []
    append = values.append
    unpack_u32 = _U32.unpack_from
    for i in range(count):
        if pos >= size:
            raise ProtocolError(
                f"{what} message truncated: column {i + 1} of {count} missing at offset {pos}"
            )
        kind = data[pos]
        if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
            if pos + 5 > size:
                raise ProtocolError(
                    f"{what} message truncated: column {i + 1} of {count} has no length "
                    f"at offset {pos + 1}"
                )
            start = pos + 5
            pos = start + unpack_u32(data, pos + 1)[0]
            if pos > size:
                raise ProtocolError(
                    f"{what} message truncated: column {i + 1} of {count} is "
                    f"{pos - start} bytes at offset {start}, the message has {size}"
                )
            if kind == 0x62:
                append(data[start:pos])
                continue
            try:
                append(data[start:pos].decode())
            except UnicodeDecodeError as exc:
                raise ProtocolError(
                    f"{what}: column {i + 1} of {count} at offset {start} is not UTF-8: {exc}"
                ) from None
        elif kind == 0x6E:  # 'n'
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u'
            append(UNCHANGED)
            pos += 1
        else:
            raise ProtocolError(
                f"{what}: column {i + 1} of {count} has unknown kind {chr(kind)!r} "
                f"(byte 0x{kind:02x} at offset {pos}; expected 'n', 'u', 't' or 'b')"
            )
    return tuple(values), pos


def _begin(data: bytes) -> Begin:
    if len(data) != 1 + _BEGIN.size:
        raise ProtocolError(f"Begin message must be {1 + _BEGIN.size} bytes, got {len(data)}")
    lsn, micros, xid = _BEGIN.unpack_from(data, 1)
    return Begin(lsn, _time(micros, "Begin"), xid)


def _commit(data: bytes) -> Commit:
    if len(data) != 1 + _COMMIT.size:
        raise ProtocolError(f"Commit message must be {1 + _COMMIT.size} bytes, got {len(data)}")
    flags, lsn, end, micros = _COMMIT.unpack_from(data, 1)
    return Commit(flags, lsn, end, _time(micros, "Commit"))


def _relation(data: bytes) -> Relation:
    w = "Relation"
    (oid,) = _unpack(_U32, data, 1, "relation oid", w)
    schema, pos = _string(data, 5, "schema", w)
    name, pos = _string(data, pos, "relation name", w)
    (identity,) = _unpack(_U8, data, pos, "replica identity", w)
    if chr(identity) not in _REPLICA_IDENTITIES:
        raise ProtocolError(f"{w}: unknown replica identity {chr(identity)!r} at offset {pos}")
    (count,) = _unpack(_U16, data, pos + 1, "column count", w)
    pos += 3
    columns = []
    for i in range(count):
        field = f"column {i + 1} of {count}"
        (flags,) = _unpack(_U8, data, pos, f"{field}: flags", w)
        column, pos = _string(data, pos + 1, f"{field}: name", w)
        type_oid, typmod = _unpack(_COLUMN_TAIL, data, pos, f"{field}: type and typmod", w)
        columns.append(Column(bool(flags & 1), column, type_oid, typmod))
        pos += _COLUMN_TAIL.size
    _done(data, pos, w)
    return Relation(oid, schema, name, chr(identity), tuple(columns))


def _insert(data: bytes) -> Insert:
    oid, kind = _unpack(_OID_KIND, data, 1, "relation oid and 'N'", "Insert")
    if kind != 0x4E:
        raise ProtocolError(f"Insert: expected 'N' at offset 5, got {chr(kind)!r}")
    new, pos = _tuple(data, 6, "Insert")
    _done(data, pos, "Insert")
    return Insert(oid, new)


def _update(data: bytes) -> Update:
    oid, kind = _unpack(_OID_KIND, data, 1, "relation oid and tuple kind", "Update")
    old = key = None
    pos = 6
    if kind == 0x4F or kind == 0x4B:  # 'O', 'K'
        first, pos = _tuple(data, pos, "Update")
        if kind == 0x4F:
            old = first
        else:
            key = first
        (kind,) = _unpack(_U8, data, pos, "'N'", "Update")
        pos += 1
    if kind != 0x4E:
        expected = "'N'" if pos > 6 else "'K', 'O' or 'N'"
        raise ProtocolError(f"Update: expected {expected} at offset {pos - 1}, got {chr(kind)!r}")
    new, pos = _tuple(data, pos, "Update")
    _done(data, pos, "Update")
    return Update(oid, old, key, new)


def _delete(data: bytes) -> Delete:
    oid, kind = _unpack(_OID_KIND, data, 1, "relation oid and tuple kind", "Delete")
    if kind != 0x4F and kind != 0x4B:
        raise ProtocolError(f"Delete: expected 'K' or 'O' at offset 5, got {chr(kind)!r}")
    values, pos = _tuple(data, 6, "Delete")
    _done(data, pos, "Delete")
    return Delete(oid, values, None) if kind == 0x4F else Delete(oid, None, values)


def _truncate(data: bytes) -> Truncate:
    count, options = _unpack(_TRUNCATE_HEAD, data, 1, "relation count and options", "Truncate")
    if len(data) != 6 + 4 * count:
        raise ProtocolError(
            f"Truncate message of {count} relations must be {6 + 4 * count} bytes, got {len(data)}"
        )
    oids = struct.unpack_from(f"!{count}I", data, 6)
    return Truncate(oids, bool(options & 1), bool(options & 2))


def _message(data: bytes) -> Message:
    w = "Message"
    flags, lsn = _unpack(_MESSAGE_HEAD, data, 1, "flags and lsn", w)
    prefix, pos = _string(data, 1 + _MESSAGE_HEAD.size, "prefix", w)
    (size,) = _unpack(_U32, data, pos, "content length", w)
    pos += 4
    if pos + size != len(data):
        raise ProtocolError(
            f"Message: content of {size} bytes at offset {pos} does not end the message "
            f"of {len(data)} bytes"
        )
    return Message(bool(flags & 1), lsn, prefix, data[pos:])


def _origin(data: bytes) -> Origin:
    (lsn,) = _unpack(_U64, data, 1, "commit lsn", "Origin")
    name, pos = _string(data, 9, "name", "Origin")
    _done(data, pos, "Origin")
    return Origin(lsn, name)


def _type(data: bytes) -> Type:
    (oid,) = _unpack(_U32, data, 1, "type oid", "Type")
    schema, pos = _string(data, 5, "schema", "Type")
    name, pos = _string(data, pos, "type name", "Type")
    _done(data, pos, "Type")
    return Type(oid, schema, name)


_PARSERS: dict[int, Callable[[bytes], Record]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("R"): _relation,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
    ord("O"): _origin,
    ord("Y"): _type,
}


def parse(data: bytes) -> Record:
    """The record of one pgoutput message: a whole payload as the slot's
    SQL interface or a walsender (psycopg2's ``ReplicationMessage.payload``
    with ``decode=False``) gives it. Raises :class:`ProtocolError` for
    anything else."""
    if type(data) is not bytes:
        data = bytes(data)
    if not data:
        raise ProtocolError("empty message")
    parser = _PARSERS.get(data[0])
    if parser is None:
        tag = data[0]
        if tag in _STREAMED:
            raise ProtocolError("streamed transactions are not supported (proto_version 1)")
        if tag in _TWO_PHASE:
            raise ProtocolError(
                f"two-phase commit messages are not supported (tag {chr(tag)!r}, proto_version 1)"
            )
        raise ProtocolError(f"unknown message tag {chr(tag)!r} (byte 0x{tag:02x} at offset 0)")
    return parser(data)
