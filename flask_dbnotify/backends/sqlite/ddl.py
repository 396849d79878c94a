"""The DDL, built from the tables as the catalog describes them (see
:mod:`.catalog`): one ``AFTER ... FOR EACH ROW`` trigger per operation,
appending ``(time, shape key, values)`` to the journal, where the shape
(names, keys) is stored once in ``dbnotify_shapes``. Pure: no connection."""

from __future__ import annotations

from collections.abc import Sequence

from ..._watch import Watch
from ...errors import WatchError
from ...events import Operation
from ..common import OP_CODE, digest, trigger_name
from ..shaped import header as shape_header
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


def affinity(declared: str) -> str:
    """The affinity SQLite gives a column of type ``declared``, by its
    rules, in their order."""
    upper = declared.upper()
    if "INT" in upper:
        return "INTEGER"
    if "CHAR" in upper or "CLOB" in upper or "TEXT" in upper:
        return "TEXT"
    if "BLOB" in upper or not upper:
        return "BLOB"
    if "REAL" in upper or "FLOA" in upper or "DOUB" in upper:
        return "REAL"
    return "NUMERIC"


#: A column, as the trigger reads it: its reference (``NEW."c"``), declared
#: type, and whether it is the table's rowid.
Column = tuple[str, str, bool]


def json_value(ref: str, declared: str, rowid: bool) -> str:
    """The JSON form of a column value. BLOBs (any column may hold one)
    become hex; REALs keep all 17 digits (json_array writes 15); text in a
    column declared JSON is embedded as JSON when it is valid. The checks
    a column's values cannot need are left out: a rowid is an integer, and
    a column of TEXT affinity holds no numbers (SQLite stores them as text,
    and AFTER triggers see what is stored). The blob test is a comparison,
    not a call: blobs sort after every other value (a third of the cost)."""
    if rowid:
        return ref
    if affinity(declared) == "TEXT":
        return f"CASE WHEN {ref} COLLATE BINARY >= X'' THEN hex({ref}) ELSE {ref} END"
    binary = f"{ref} COLLATE BINARY"
    cases = [
        # The shortest of 15, 16 or 17 digits that reads back as the same
        # double (Python's repr does the same).
        f"WHEN 'real' THEN CASE WHEN abs({ref}) > 1.7976931348623157e308 "
        f"THEN CASE WHEN {binary} > 0 THEN 'Infinity' ELSE '-Infinity' END "
        f"WHEN CAST(printf('%!.15g', {ref}) AS REAL) = {binary} "
        f"THEN json(printf('%!.15g', {ref})) "
        f"WHEN CAST(printf('%!.16g', {ref}) AS REAL) = {binary} "
        f"THEN json(printf('%!.16g', {ref})) "
        f"ELSE json(printf('%!.17g', {ref})) END",
        f"WHEN 'blob' THEN hex({ref})",
    ]
    if declared.strip().upper() in ("JSON", "JSONB"):
        cases.append(
            f"WHEN 'text' THEN CASE WHEN json_valid({ref}) THEN json({ref}) ELSE {ref} END"
        )
    return f"CASE typeof({ref}) {' '.join(cases)} ELSE {ref} END"


def row_array(columns: list[Column], flat: bool = False) -> str:
    """``json_array(json_array(c1..c100), json_array(c101..), ...)``, or
    ``json_array(c1..)`` when ``flat`` (and the columns fit one chunk)."""
    chunks = [
        "json_array(" + ", ".join(json_value(*column) for column in part) + ")"
        for part in (columns[i : i + _CHUNK] for i in range(0, len(columns), _CHUNK))
    ]
    return chunks[0] if flat and len(chunks) == 1 else f"json_array({', '.join(chunks)})"


def size_of(columns: list[Column]) -> str:
    """Bytes of the row's values as text and blobs, without copying them
    (CAST to BLOB only relabels text; a number counts its digits).
    ``ifnull`` is compiled inline: one function call per column. A column
    of numeric affinity mostly holds numbers, which sort before text: a
    comparison skips them (and NULLs) without a call; a rowid is a number."""
    sizes = []
    for ref, declared, rowid in columns:
        if rowid:
            continue
        if affinity(declared) in ("TEXT", "BLOB"):
            sizes.append(f"ifnull(length(CAST({ref} AS BLOB)), 0)")
        else:
            sizes.append(
                f"CASE WHEN {ref} COLLATE BINARY >= '' THEN length(CAST({ref} AS BLOB)) ELSE 0 END"
            )
    return " + ".join(sizes) or "0"


def trigger_sql(watch: Watch, table: Table, op: Operation, key: str) -> str:
    """A row trigger appending ``(time, shape key, values)`` to the
    journal; the shape (names, keys) is stored once in dbnotify_shapes.
    Values are one flat array of up to :data:`_CHUNK` columns (an array of
    chunks beyond, and in the triggers of earlier versions; the shape says
    which); the cut keys are chunked."""
    name, declared, pk, rowid = table

    def read(ref: str, names: list[str]) -> list[Column]:
        types = dict(declared)
        return [(f"{ref}.{quote_ident(c)}", types[c], c == rowid) for c in names]

    names = [column for column, _ in declared]
    when = ""
    if op is Operation.UPDATE:
        # Row values: one comparison, however many columns. Byte for byte:
        # under a column's NOCASE, 'Bob' to 'bob' would be no change.
        watched = watch.when_changed or names
        new = ", ".join(f"NEW.{quote_ident(c)} COLLATE BINARY" for c in watched)
        old = ", ".join(f"OLD.{quote_ident(c)}" for c in watched)
        when = f" WHEN ({new}) IS NOT ({old})"
        new_row, old_row = read("NEW", names), read("OLD", names)
        body = f"json_array({row_array(new_row, True)}, {row_array(old_row, True)})"
        size = f"{size_of(new_row)} + {size_of(old_row)}"
        cut = f"json_array({row_array(read('NEW', pk))}, {row_array(read('OLD', pk))})"
    else:
        row = read("NEW" if op is Operation.INSERT else "OLD", names)
        body, size = row_array(row, True), size_of(row)
        cut = row_array(read("NEW" if op is Operation.INSERT else "OLD", pk))
    # A row too large would make the journal row (or its JSON) exceed
    # SQLite's string limit and fail the write: it is journaled cut.
    body = f"CASE WHEN {size} > {MAX_ROW_BYTES} THEN json_object('cut', {cut}) ELSE {body} END"
    return (
        f"AFTER {op.value} ON {quote_ident(name)} FOR EACH ROW{when} BEGIN {MARKER} "
        f"INSERT INTO dbnotify_journal (created_at, shape, body) "
        f"VALUES ({NOW}, {quote_literal(key)}, {body}); END"
    )


def watch_triggers(watch: Watch, table: Table) -> dict[str, tuple[str, str, str]]:
    """``{trigger name: (trigger body, shape key, shape header)}`` for
    ``watch`` on ``table``. The name and the shape key hash everything the
    trigger does; the key, written in every journal row, is short."""
    name, columns, pk, _ = table
    names = [column for column, _ in columns]
    # SQLite has no TRUNCATE: a DELETE without WHERE fires the row triggers.
    ops = [op for op in watch.operations if op is not Operation.TRUNCATE]
    headers = {op: shape_header(watch, op, pk, names, len(names) <= _CHUNK) for op in ops}
    hashed = digest(
        [
            DDL_VERSION,
            [[op.value, headers[op], trigger_sql(watch, table, op, "")] for op in ops],
        ]
    )
    result = {}
    for op in ops:
        key = f"{OP_CODE[op]}{hashed}"
        body = trigger_sql(watch, table, op, key)
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
