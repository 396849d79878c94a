"""The DDL, built from the tables as the catalog describes them (see
:mod:`.catalog`): one ``AFTER ... FOR EACH ROW`` trigger per operation,
appending ``(time, shape key, values)`` to the journal, where the shape
(names, keys) is stored once in ``dbnotify_shapes``. Pure: no connection."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..._watch import Watch
from ...errors import WatchError
from ...events import Operation
from ..common import OP_CODE, digest, trigger_name
from .catalog import MARKER, Table

DDL_VERSION = 4
#: SQLite's clock, in Julian days (what the journal stores): ``'now'``
#: without the text to parse.
NOW = "julianday()"
_UNIX_EPOCH_JD = 2440587.5
#: SQLite functions take at most 127 arguments: rows are arrays of chunks.
_CHUNK = 100
#: A row whose text and blob values take more than this is journaled cut:
#: its primary key only, with ``event.cut`` set (as on PostgreSQL).
MAX_ROW_BYTES = 16 * 1024 * 1024
#: Our tables' columns. AUTOINCREMENT: journal ids are never reused, even
#: after pruning empties the journal, so a listener's position stays
#: meaningful.
TABLES = {
    "dbnotify_journal": "id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL, "
    "shape TEXT, body TEXT NOT NULL",
    "dbnotify_shapes": "key TEXT PRIMARY KEY, header TEXT NOT NULL",
    "dbnotify_listeners": "name TEXT PRIMARY KEY, position INTEGER NOT NULL, seen_at REAL NOT NULL",
    # Exactly-once receivers: how far each has claimed, and claims.
    "dbnotify_receivers": "receiver TEXT PRIMARY KEY, id INTEGER NOT NULL",
    "dbnotify_claims": "receiver TEXT NOT NULL, event_id INTEGER NOT NULL, "
    "state TEXT NOT NULL DEFAULT 'running', attempts INTEGER NOT NULL DEFAULT 1, "
    "claimed_by TEXT, claimed_at REAL NOT NULL, next_attempt_at REAL, last_error TEXT, "
    "PRIMARY KEY (receiver, event_id)",
}


def unix(julian_day: float) -> float:
    """Seconds since the epoch of a time as :data:`NOW` gives it."""
    return (julian_day - _UNIX_EPOCH_JD) * 86400.0


def julian(unix_time: float) -> float:
    """Seconds since the epoch as :data:`NOW` gives them."""
    return unix_time / 86400.0 + _UNIX_EPOCH_JD


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def json_value(ref: str, declared: str) -> str:
    """The JSON form of a column value. BLOBs (any column may hold one)
    become hex; REALs keep all 17 digits (json_array writes 15); text in a
    column declared JSON is embedded as JSON when it is valid."""
    cases = [
        # The shortest of 15, 16 or 17 digits that reads back as the same
        # double (Python's repr does the same).
        f"WHEN 'real' THEN CASE WHEN abs({ref}) > 1.7976931348623157e308 "
        f"THEN CASE WHEN {ref} > 0 THEN 'Infinity' ELSE '-Infinity' END "
        f"WHEN CAST(printf('%!.15g', {ref}) AS REAL) = {ref} THEN json(printf('%!.15g', {ref})) "
        f"WHEN CAST(printf('%!.16g', {ref}) AS REAL) = {ref} THEN json(printf('%!.16g', {ref})) "
        f"ELSE json(printf('%!.17g', {ref})) END",
        f"WHEN 'blob' THEN hex({ref})",
    ]
    if declared.strip().upper() in ("JSON", "JSONB"):
        cases.append(
            f"WHEN 'text' THEN CASE WHEN json_valid({ref}) THEN json({ref}) ELSE {ref} END"
        )
    return f"CASE typeof({ref}) {' '.join(cases)} ELSE {ref} END"


def row_array(ref: str, columns: list[tuple[str, str]], flat: bool = False) -> str:
    """``json_array(json_array(c1..c100), json_array(c101..), ...)``, or
    ``json_array(c1..)`` when ``flat`` (and the columns fit one chunk)."""
    chunks = [
        "json_array("
        + ", ".join(json_value(f"{ref}.{quote_ident(name)}", declared) for name, declared in part)
        + ")"
        for part in (columns[i : i + _CHUNK] for i in range(0, len(columns), _CHUNK))
    ]
    return chunks[0] if flat and len(chunks) == 1 else f"json_array({', '.join(chunks)})"


def size_of(ref: str, columns: list[tuple[str, str]]) -> str:
    """Bytes of the row's values as text and blobs, without copying them
    (CAST to BLOB only relabels text; a number counts its digits).
    ``ifnull`` is compiled inline: one function call per column."""
    return " + ".join(
        f"ifnull(length(CAST({ref}.{quote_ident(name)} AS BLOB)), 0)" for name, _ in columns
    )


def trigger_sql(
    watch: Watch,
    table: str,
    columns: list[tuple[str, str]],
    pk: list[str],
    op: Operation,
    key: str,
) -> str:
    """A row trigger appending ``(time, shape key, values)`` to the
    journal; the shape (names, keys) is stored once in dbnotify_shapes.
    Values are one flat array of up to :data:`_CHUNK` columns (an array of
    chunks beyond, and in the triggers of earlier versions; the shape says
    which); the cut keys are chunked."""
    when = ""
    declared = dict(columns)
    keys = [(k, declared[k]) for k in pk]
    if op is Operation.UPDATE:
        # Row values: one comparison, however many columns.
        watched = watch.when_changed or [name for name, _ in columns]
        new = ", ".join(f"NEW.{quote_ident(c)}" for c in watched)
        old = ", ".join(f"OLD.{quote_ident(c)}" for c in watched)
        when = f" WHEN ({new}) IS NOT ({old})"
        body = f"json_array({row_array('NEW', columns, True)}, {row_array('OLD', columns, True)})"
        size = f"{size_of('NEW', columns)} + {size_of('OLD', columns)}"
        cut = f"json_array({row_array('NEW', keys)}, {row_array('OLD', keys)})"
    else:
        ref = "NEW" if op is Operation.INSERT else "OLD"
        body, size, cut = row_array(ref, columns, True), size_of(ref, columns), row_array(ref, keys)
    # A row too large would make the journal row (or its JSON) exceed
    # SQLite's string limit and fail the write: it is journaled cut.
    body = f"CASE WHEN {size} > {MAX_ROW_BYTES} THEN json_object('cut', {cut}) ELSE {body} END"
    return (
        f"AFTER {op.value} ON {quote_ident(table)} FOR EACH ROW{when} BEGIN {MARKER} "
        f"INSERT INTO dbnotify_journal (created_at, shape, body) "
        f"VALUES ({NOW}, {quote_literal(key)}, {body}); END"
    )


def _header(watch: Watch, op: Operation, pk: list[str], names: list[str]) -> str:
    """The shape of the journal rows of ``op``: what the listener needs to
    turn their values back into an event."""
    keep = None if watch.columns is None else [c for c in names if watch.carries(c, pk)]
    shape: dict[str, Any] = {"t": watch.name, "o": op.value[0], "k": pk, "c": names, "keep": keep}
    if len(names) <= _CHUNK:
        shape["flat"] = True
    return json.dumps(shape, ensure_ascii=False)


def watch_triggers(watch: Watch, table: Table) -> dict[str, tuple[str, str, str]]:
    """``{trigger name: (trigger body, shape key, shape header)}`` for
    ``watch`` on ``table``. The name and the shape key hash everything the
    trigger does; the key, written in every journal row, is short."""
    name, columns, pk = table
    names = [column for column, _ in columns]
    # SQLite has no TRUNCATE: a DELETE without WHERE fires the row triggers.
    ops = [op for op in watch.operations if op is not Operation.TRUNCATE]
    headers = {op: _header(watch, op, pk, names) for op in ops}
    hashed = digest(
        [
            DDL_VERSION,
            [[op.value, headers[op], trigger_sql(watch, name, columns, pk, op, "")] for op in ops],
        ]
    )
    result = {}
    for op in ops:
        key = f"{OP_CODE[op]}{hashed}"
        body = trigger_sql(watch, name, columns, pk, op, key)
        result[trigger_name(name, op, hashed)] = (body, key, headers[op])
    return result


def shared_sql() -> list[str]:
    """Our tables, made where missing."""
    return [
        f"CREATE TABLE IF NOT EXISTS {name} ({MARKER} {columns})"
        for name, columns in TABLES.items()
    ]


def install_plan(
    installed: Sequence[tuple[str, str]], tables: Sequence[tuple[Watch, Table]]
) -> list[str]:
    """The statements that make a database whose triggers of ours are
    ``installed`` (name, table) match the watches, each with its table."""
    statements = shared_sql()
    seen: dict[str, str] = {}
    for watch, table in tables:
        key = table[0].lower()
        if key in seen:
            raise WatchError(f"{seen[key]!r} and {watch.name!r} are the same table: watch it once")
        seen[key] = watch.name
        wanted = watch_triggers(watch, table)
        statements += [
            drop_trigger(name) for name, on in installed if on.lower() == key and name not in wanted
        ]
        for name, (body, key, header) in wanted.items():
            statements.append(
                f"INSERT OR REPLACE INTO dbnotify_shapes (key, header) "
                f"VALUES ({quote_literal(key)}, {quote_literal(header)})"
            )
            statements.append(f"CREATE TRIGGER IF NOT EXISTS {quote_ident(name)} {body}")
    return statements


def drop_trigger(name: str) -> str:
    return f"DROP TRIGGER IF EXISTS {quote_ident(name)}"
