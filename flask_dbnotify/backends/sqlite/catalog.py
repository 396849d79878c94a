"""What the database holds: our triggers and tables, and each watched
table as ``(name, [(column, declared type)], primary key, rowid alias)``."""

from __future__ import annotations

import sqlite3

from ..._watch import Watch
from ...errors import TABLE_MISSING_TODO, WatchError
from ..common import check_table

#: In every trigger and table we create: we drop only what carries it.
MARKER = "/* flask-dbnotify */"
#: What identifies the triggers of versions before the marker.
LEGACY_TRIGGER = "INSERT INTO dbnotify_journal (created_at, shape, body)"
#: Our tables, and the columns by which one made before the marker is known.
TABLES = {
    "dbnotify_journal": {"id", "created_at", "shape", "body"},
    "dbnotify_shapes": {"key", "header"},
    "dbnotify_listeners": {"name", "position", "seen_at"},
    "dbnotify_receivers": {"receiver", "id"},
    "dbnotify_claims": {"receiver", "event_id", "state", "attempts"},
}
#: A watched table: its name, columns with declared types, primary key,
#: and the column that is an alias of the rowid (None if none is).
Table = tuple[str, list[tuple[str, str]], list[str], str | None]


def resolve(conn: sqlite3.Connection, path: str, watch: Watch) -> Table:
    """``(table, [(column, declared type)], primary key, rowid alias)`` as
    the database has them."""
    if watch.schema not in (None, "main"):
        raise WatchError(
            f"{watch.name!r}: only tables of the main database can be watched in SQLite"
        )
    row = conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name = ? COLLATE NOCASE",
        (watch.table,),
    ).fetchone()
    if row is None:
        raise WatchError(f"table {watch.table!r} does not exist in {path}: " + TABLE_MISSING_TODO)
    table = row[0]
    info = conn.execute("SELECT name, type, pk FROM pragma_table_info(?)", (table,)).fetchall()
    columns = [(name, declared) for name, declared, _ in info]
    names = [name for name, _ in columns]
    pk = [name for name, _, position in sorted(info, key=lambda r: r[2]) if position]
    check_table(watch.table, watch, names, pk)
    return table, columns, pk, _rowid_alias(conn, table, columns, pk)


def _rowid_alias(
    conn: sqlite3.Connection, table: str, columns: list[tuple[str, str]], pk: list[str]
) -> str | None:
    """The primary key column that is the rowid itself: its values are
    integers, never NULL, whatever is written. That is a lone key declared
    exactly ``INTEGER`` with no index of its own (``WITHOUT ROWID`` tables
    and ``INTEGER PRIMARY KEY DESC`` columns have one, and hold anything
    of INTEGER affinity)."""
    if len(pk) != 1 or dict(columns)[pk[0]].upper() != "INTEGER":
        return None
    own_index = conn.execute(
        "SELECT 1 FROM pragma_index_list(?) WHERE origin = 'pk'", (table,)
    ).fetchone()
    return None if own_index else pk[0]


def our_triggers(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """Triggers we made: named dbnotify_*, and marked (or, made before
    the mark, appending to our journal as those versions did)."""
    return conn.execute(
        "SELECT name, tbl_name FROM sqlite_schema WHERE type = 'trigger' "
        "AND substr(name, 1, 9) = 'dbnotify_' AND (instr(sql, ?) > 0 OR instr(sql, ?) > 0) "
        "ORDER BY tbl_name, name",
        (MARKER, LEGACY_TRIGGER),
    ).fetchall()


def our_tables(conn: sqlite3.Connection) -> list[str]:
    """Our tables present: marked, or with the columns we gave them."""
    ours = []
    for name, sql in conn.execute(
        "SELECT name, sql FROM sqlite_schema WHERE type = 'table' "
        f"AND name IN ({', '.join('?' * len(TABLES))})",
        list(TABLES),
    ).fetchall():
        columns = {row[0] for row in conn.execute("SELECT name FROM pragma_table_info(?)", (name,))}
        if MARKER in (sql or "") or TABLES[name] <= columns:
            ours.append(name)
    return ours
