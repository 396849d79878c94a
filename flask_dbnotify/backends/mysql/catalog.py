"""What the database holds: our triggers and tables, and each watched
table as :class:`Table`, read from ``information_schema``."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..._watch import Watch
from ...errors import TABLE_MISSING_TODO, WatchError
from ..common import check_table

#: The comment every table of ours carries: we drop only what carries it.
MARKER = "flask-dbnotify"
TABLES = (
    "dbnotify_journal",
    "dbnotify_shapes",
    "dbnotify_listeners",
    "dbnotify_receivers",
    "dbnotify_claims",
    "dbnotify_binlog",
    "dbnotify_relay",
)


class Table(NamedTuple):
    """A watched table: its database and name, columns with their types
    (``DATA_TYPE``, lower case), primary key, and each column's largest
    value in bytes where its type bounds it (``CHARACTER_OCTET_LENGTH``),
    and the character set of each text column."""

    schema: str
    name: str
    columns: list[tuple[str, str]]
    pk: list[str]
    octets: dict[str, int | None]
    charsets: dict[str, str | None]


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def resolve(cur: Any, database: str, watch: Watch) -> Table:
    """The watched table as the database has it; names are matched
    exactly, as the server matches them on Linux."""
    schema = watch.schema or database
    cur.execute(
        "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s "
        "AND TABLE_NAME = %s AND TABLE_TYPE = 'BASE TABLE'",
        (schema, watch.table),
    )
    found = [row[0] for row in cur.fetchall() if row[0] == watch.table]
    if not found:
        raise WatchError(
            f"table {watch.table!r} does not exist in database {schema!r}: " + TABLE_MISSING_TODO
        )
    cur.execute(
        "SELECT COLUMN_NAME, DATA_TYPE, CHARACTER_OCTET_LENGTH, CHARACTER_SET_NAME "
        "FROM information_schema.COLUMNS "
        "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
        (schema, watch.table),
    )
    found = cur.fetchall()
    columns = [(name, kind.lower()) for name, kind, _, _ in found]
    octets = {name: None if size is None else int(size) for name, _, size, _ in found}
    charsets = {name: charset for name, _, _, charset in found}
    names = [name for name, _ in columns]
    cur.execute(
        "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = %s "
        "AND TABLE_NAME = %s AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX",
        (schema, watch.table),
    )
    pk = [row[0] for row in cur.fetchall()]
    check_table(watch.table, watch, names, pk)
    return Table(schema, watch.table, columns, pk, octets, charsets)


def journal_insert(database: str) -> str:
    """How every trigger of ours begins writing to the app's journal."""
    return f"INSERT INTO {qualified(database, 'dbnotify_journal')} (created_at, shape, body) "


def our_triggers(cur: Any, database: str) -> list[tuple[str, str, str]]:
    """``(schema, trigger, table)`` of our triggers: named ``dbnotify_*``,
    writing to this app's journal, and recorded by the install that made
    them in ``dbnotify_shapes``, which no one else may write (a trigger
    of that name and body that anyone else made is not ours)."""
    cur.execute(
        "SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s "
        "AND TABLE_NAME = 'dbnotify_shapes' AND TABLE_COMMENT = %s",
        (database, MARKER),
    )
    if not cur.fetchone()[0]:
        return []
    cur.execute(
        "SELECT t.TRIGGER_SCHEMA, t.TRIGGER_NAME, t.EVENT_OBJECT_TABLE "
        f"FROM information_schema.TRIGGERS AS t JOIN {qualified(database, 'dbnotify_shapes')} AS s "
        "ON BINARY s.trigger_schema = BINARY t.TRIGGER_SCHEMA "
        "AND BINARY s.trigger_name = BINARY t.TRIGGER_NAME "
        "WHERE t.TRIGGER_NAME LIKE 'dbnotify\\_%%' AND INSTR(t.ACTION_STATEMENT, %s) > 0 "
        "ORDER BY t.TRIGGER_SCHEMA, t.EVENT_OBJECT_TABLE, t.TRIGGER_NAME",
        (journal_insert(database),),
    )
    return sorted({tuple(row) for row in cur.fetchall()})


def our_tables(cur: Any, database: str) -> list[str]:
    """Our tables present in ``database``: named as ours and marked."""
    cur.execute(
        "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s "
        f"AND TABLE_NAME IN ({', '.join(['%s'] * len(TABLES))}) AND TABLE_COMMENT = %s",
        (database, *TABLES, MARKER),
    )
    found = {row[0] for row in cur.fetchall()}
    return [name for name in TABLES if name in found]
