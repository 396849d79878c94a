"""The DDL, built from the tables as the catalog describes them: one
``AFTER ... FOR EACH ROW`` trigger per operation, appending ``(time, shape
key, values)`` to the journal, the shape (names, keys) stored once in
``dbnotify_shapes`` (read back by :class:`~..shaped.Rows`). Pure: no
connection.

Triggers run with their definer's rights, so a writer needs no grant on
the journal; what they run is fixed: the row's values and the session's
``@dbnotify_context`` (see :mod:`.context`), never text to execute.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..._watch import Watch
from ...errors import WatchError
from ...events import Operation
from ..common import OP_CODE, digest, trigger_name
from ..shaped import header as shape_header
from .catalog import MARKER, Table, journal_insert, qualified, quote_ident

DDL_VERSION = 1
#: The server's clock, in seconds since the epoch (what the journal
#: stores): UTC_TIMESTAMP is the same whatever a session's time zone.
NOW = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) / 1e6"
#: The session variable a transaction's context travels in (:mod:`.context`).
CONTEXT = "@dbnotify_context"
#: A context longer than this is ignored, as on the other databases.
MAX_CONTEXT_BYTES = 1024
#: A row whose text and blob values take more than this (blobs counted
#: twice: they are journaled in hex) is journaled cut, its primary key
#: only, with ``event.cut`` set: far below the 16 MiB of the server's
#: default max_allowed_packet, which bounds what a function may return.
MAX_ROW_BYTES = 2 * 1024 * 1024
_TEXT = "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
_KEY = "VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin"
_NAME = "VARCHAR(191) " + _TEXT
TABLES = {
    # AUTO_INCREMENT: ids are never reused, even after pruning empties the
    # journal (the counter is kept across restarts since MySQL 8 and
    # MariaDB 10.2.4).
    "dbnotify_journal": f"id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, "
    f"created_at DOUBLE NOT NULL, shape {_KEY} NULL, body LONGTEXT {_TEXT} NOT NULL, "
    "KEY dbnotify_journal_created (created_at)",
    # Also the trigger that writes the shape: what makes a trigger ours (no
    # one else may write this table).
    # Binary-log capture: the shapes it writes have no trigger (''), and
    # name their table.
    "dbnotify_shapes": f"name {_KEY} PRIMARY KEY, watch {_NAME} NOT NULL, "
    f"header LONGTEXT {_TEXT} NOT NULL, trigger_schema VARCHAR(64) {_TEXT} NOT NULL, "
    f"trigger_name VARCHAR(64) {_TEXT} NOT NULL, table_name VARCHAR(64) {_TEXT} NOT NULL, "
    "KEY dbnotify_shapes_watch (watch)",
    "dbnotify_listeners": f"name {_NAME} PRIMARY KEY, position BIGINT UNSIGNED NOT NULL, "
    "seen_at DOUBLE NOT NULL",
    # Exactly-once receivers: how far each has claimed, and claims.
    "dbnotify_receivers": f"receiver {_NAME} PRIMARY KEY, id BIGINT UNSIGNED NOT NULL",
    # Binary-log capture: what writers' transactions hand the relay
    # (kind 'm': a message; 'c': the transaction's context from now on).
    "dbnotify_relay": f"id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, "
    f"kind CHAR(1) CHARACTER SET ascii NOT NULL, body LONGTEXT {_TEXT} NOT NULL",
    # Binary-log capture: where the relay stands in the log.
    "dbnotify_binlog": f"name {_KEY} PRIMARY KEY, file VARCHAR(255) {_TEXT} NOT NULL, "
    "position BIGINT UNSIGNED NOT NULL, updated_at DOUBLE NOT NULL",
    "dbnotify_claims": f"receiver {_NAME} NOT NULL, event_id BIGINT UNSIGNED NOT NULL, "
    "state VARCHAR(8) NOT NULL DEFAULT 'running', attempts INT NOT NULL DEFAULT 1, "
    f"claimed_by {_NAME} NULL, claimed_at DOUBLE NOT NULL, next_attempt_at DOUBLE NULL, "
    f"last_error TEXT {_TEXT} NULL, PRIMARY KEY (receiver, event_id)",
}
_BINARY = {"binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob"}
_GEOMETRY = {
    "geometry",
    "point",
    "linestring",
    "polygon",
    "multipoint",
    "multilinestring",
    "multipolygon",
    "geometrycollection",
}
_TEXTUAL = {"char", "varchar", "tinytext", "text", "mediumtext", "longtext", "json"}


def literal(text: str) -> str:
    """``text`` as a string literal that reads the same whatever the
    session's sql_mode (backslashes, quotes): hex, as utf8mb4."""
    return f"CONVERT(X'{text.encode().hex()}' USING utf8mb4)"


#: Character sets whose text JSON_ARRAY writes into utf8mb4 as it is.
_UTF8 = {None, "utf8mb4", "utf8mb3", "utf8", "ascii", "binary"}


def value(ref: str, kind: str, charset: str | None = None) -> str:
    """The JSON value of a column, as a SELECT through the app's driver
    reads it: bytes in hex (as on SQLite), BIT as its number, text of
    another character set converted (JSON_ARRAY would pass latin1 bytes on
    as they are, and the journal would refuse them: the write would fail);
    the rest as JSON_ARRAY writes it (JSON columns embedded as JSON)."""
    if kind in _BINARY or kind in _GEOMETRY:
        return f"HEX({ref})"
    if kind == "bit":
        return f"{ref} + 0"
    if charset not in _UTF8:
        return f"CONVERT({ref} USING utf8mb4)"
    return ref


#: Bytes a value of a type without CHARACTER_OCTET_LENGTH (a number, a
#: time, BIT) takes in the journal, at most.
_SCALAR_BYTES = 64
#: Columns that hold at most this are never measured (VARCHAR(255) and the
#: like): what they hold together is subtracted from the limit instead.
_SMALL_BYTES = 65535


def largest(kind: str, octets: int | None) -> int | None:
    """The most bytes a column's value takes in the journal (hex doubles
    bytes), or None when its type does not bound it."""
    if kind in _GEOMETRY:
        return None
    if octets is None:
        return _SCALAR_BYTES
    return 2 * octets if kind in _BINARY else octets


def measured(table: Table, names: list[str]) -> tuple[list[str], int]:
    """The columns whose size a trigger must measure, and the bytes the
    others may add at most. A table of small columns measures none: its
    rows cannot reach the limit, and its writers pay nothing for it."""
    bound = {c: largest(kind, table.octets.get(c)) for c, kind in table.columns}
    small = [c for c in names if (bound[c] or _SMALL_BYTES + 1) <= _SMALL_BYTES]
    slack = sum(bound[c] or 0 for c in small)
    if slack > MAX_ROW_BYTES // 4:
        small, slack = [], 0
    return [c for c in names if c not in small], slack


def size(ref: str, kind: str) -> str:
    """The bytes a column's value adds to the journal row."""
    if kind in _BINARY or kind in _GEOMETRY:
        return f"2 * IFNULL(LENGTH({ref}), 0)"
    return f"IFNULL(LENGTH({ref}), 0)"


def same(column: str, kind: str) -> str:
    """Whether a column kept its value in an UPDATE, byte for byte: under
    a case-insensitive collation 'Bob' to 'bob' would be no change."""
    new, old = f"NEW.{quote_ident(column)}", f"OLD.{quote_ident(column)}"
    if kind in _TEXTUAL:
        return f"CAST({new} AS BINARY) <=> CAST({old} AS BINARY)"
    return f"{new} <=> {old}"


def trigger_sql(database: str, watch: Watch, table: Table, op: Operation, key: str) -> str:
    """The trigger's body: append ``(time, shape key, values)`` to the
    journal; for an UPDATE, only when a watched column changed."""
    types = dict(table.columns)
    names = [column for column, _ in table.columns]

    def row(ref: str, columns: list[str]) -> str:
        return (
            "JSON_ARRAY("
            + ", ".join(
                value(f"{ref}.{quote_ident(c)}", types[c], table.charsets[c]) for c in columns
            )
            + ")"
        )

    checked, slack = measured(table, names)

    def sizes(ref: str) -> list[str]:
        return [size(f"{ref}.{quote_ident(c)}", types[c]) for c in checked]

    if op is Operation.UPDATE:
        body = f"JSON_ARRAY({row('NEW', names)}, {row('OLD', names)})"
        # The keys of a cut row are chunked, as the decoder reads them.
        cut = f"JSON_ARRAY(JSON_ARRAY({row('NEW', table.pk)}), JSON_ARRAY({row('OLD', table.pk)}))"
        large = sizes("NEW") + sizes("OLD")
        watched = watch.when_changed or names
        when = "NOT (" + " AND ".join(same(c, types[c]) for c in watched) + ")"
    else:
        ref = "NEW" if op is Operation.INSERT else "OLD"
        cut = f"JSON_ARRAY({row(ref, table.pk)})"
        body, large, when = row(ref, names), sizes(ref), ""
    if large:
        # Both rows of an UPDATE count, each with its unmeasured columns.
        limit = MAX_ROW_BYTES - slack * (2 if op is Operation.UPDATE else 1)
        body = f"IF({' + '.join(large)} > {limit}, JSON_OBJECT('cut', {cut}), {body})"
    # A writer's context wraps the values (see .context).
    body = (
        f"IF(LENGTH({CONTEXT}) <= {MAX_CONTEXT_BYTES}, "
        f"JSON_OBJECT('cx', {CONTEXT}, 'r', {body}), {body})"
    )
    insert = journal_insert(database)
    if when:
        # INSERT ... SELECT would take the journal's table-wide AUTO-INC
        # lock for the statement (innodb_autoinc_lock_mode = 1, MariaDB's
        # default), serialising concurrent writers: a compound statement.
        insert = f"BEGIN IF {when} THEN {insert}VALUES ({NOW}, '{key}', {body}); END IF; END"
    else:
        insert += f"VALUES ({NOW}, '{key}', {body})"
    return f"AFTER {op.value} ON {qualified(table.schema, table.name)} FOR EACH ROW {insert}"


def watch_triggers(database: str, watch: Watch, table: Table) -> dict[str, tuple[str, str, str]]:
    """``{trigger name: (trigger body, shape key, shape header)}`` for
    ``watch`` on ``table``. The name and the shape key hash everything the
    trigger does; the key, written in every journal row, is short."""
    names = [column for column, _ in table.columns]
    # TRUNCATE fires no trigger in MySQL; only the binlog sees it.
    ops = [op for op in watch.operations if op is not Operation.TRUNCATE]
    headers = {op: shape_header(watch, op, table.pk, names, True) for op in ops}
    hashed = digest(
        [
            DDL_VERSION,
            database,
            [[op.value, headers[op], trigger_sql(database, watch, table, op, "")] for op in ops],
        ]
    )
    result = {}
    for op in ops:
        key = f"{OP_CODE[op]}{hashed}"
        result[trigger_name(table.name, op, hashed)] = (
            trigger_sql(database, watch, table, op, key),
            key,
            headers[op],
        )
    return result


def shared_sql(database: str) -> list[str]:
    """Our tables, made where missing."""
    return [
        f"CREATE TABLE IF NOT EXISTS {qualified(database, name)} ({columns}) "
        f"ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin COMMENT='{MARKER}'"
        for name, columns in TABLES.items()
    ]


def install_plan(
    database: str,
    installed: Sequence[tuple[str, str, str]],
    tables: Sequence[tuple[Watch, Table]],
) -> list[str]:
    """The statements that make a database whose triggers of ours are
    ``installed`` (schema, name, table) match the watches, each with its
    table. A trigger is replaced by dropping it: MySQL has no CREATE OR
    REPLACE TRIGGER (MariaDB has), and the names hash what they do."""
    statements = shared_sql(database)
    seen: dict[tuple[str, str], str] = {}
    for watch, table in tables:
        where = (table.schema, table.name)
        if where in seen:
            raise WatchError(
                f"{seen[where]!r} and {watch.name!r} are the same table: watch it once"
            )
        seen[where] = watch.name
        wanted = watch_triggers(database, watch, table)
        present = {name for schema, name, on in installed if (schema, on) == where}
        statements += [drop_trigger(table.schema, name) for name in sorted(present - set(wanted))]
        for name, (body, key, header) in wanted.items():
            statements.append(shape_sql(database, key, watch, header, table, name))
            if name not in present:
                statements.append(f"CREATE TRIGGER {qualified(table.schema, name)} {body}")
    return statements


def shape_sql(
    database: str, key: str, watch: Watch, header: str, table: Table, trigger: str
) -> str:
    """Record a shape: its key, watch, header, table, and the trigger that
    writes it ('' for binary-log capture)."""
    return (
        f"INSERT INTO {qualified(database, 'dbnotify_shapes')} "
        "(name, watch, header, trigger_schema, trigger_name, table_name) "
        f"VALUES ('{key}', {literal(watch.name)}, {literal(header)}, "
        f"{literal(table.schema)}, {literal(trigger)}, {literal(table.name)}) "
        "ON DUPLICATE KEY UPDATE watch = VALUES(watch), header = VALUES(header), "
        "trigger_schema = VALUES(trigger_schema), trigger_name = VALUES(trigger_name), "
        "table_name = VALUES(table_name)"
    )


def drop_trigger(schema: str, name: str) -> str:
    return f"DROP TRIGGER IF EXISTS {qualified(schema, name)}"
