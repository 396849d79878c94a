"""What the database holds: our objects (read once per install, uninstall
or status), and each watched table matched against the catalog."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..._watch import Watch
from ...errors import TABLE_MISSING_TODO, DBNotifyError, WatchError
from ..common import check_table

_KINDS = {
    "r": "a table",
    "p": "a table",
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "S": "a sequence",
    "c": "a composite type",
    "i": "an index",
    "I": "an index",
    "t": "a TOAST table",
}
#: Our tables, and the columns by which an unmarked one made by an earlier
#: version is recognised.
_TABLES = {
    "dbnotify_journal": {"id", "xid", "created_at", "body"},
    "dbnotify_receivers": {"receiver", "xid", "id"},
    "dbnotify_claims": {"receiver", "event_id", "state", "attempts"},
    # WAL capture: where the relay stands, and what each watch captures.
    "dbnotify_wal": {"slot", "lsn", "relayed_at"},
    "dbnotify_wal_watches": {"slot", "watch", "head", "ops"},
    "dbnotify_wal_messages": {"id", "body"},
}
#: Tables of earlier versions that are no longer used.
_LEGACY_TABLES = {"dbnotify_payload": {"id", "created_at", "body"}}
#: The names of every table of ours, in use or left by an earlier version.
TABLE_NAMES = frozenset(_TABLES) | frozenset(_LEGACY_TABLES)


@dataclass(frozen=True)
class Resolved:
    """A watch matched against the catalog."""

    watch: Watch
    oid: int
    schema: str
    table: str
    columns: tuple[str, ...]
    pk: tuple[str, ...]
    #: (oid, schema, name) of the table and of every partition and
    #: inheritance child below it, the table first.
    tree: tuple[tuple[int, str, str], ...] = ()
    #: Children that cannot carry triggers (foreign tables), as "schema.name".
    uncovered: tuple[str, ...] = ()


@dataclass(frozen=True)
class Installed:
    """One of our triggers, as the catalog has it."""

    trigger: str
    table_oid: int
    schema: str
    table: str
    function: str


@dataclass(frozen=True)
class Function:
    """A function of ours in the schema (marked, or made by an earlier version)."""

    name: str
    args: str
    marked: bool


@dataclass(frozen=True)
class Catalog:
    """What of ours the database holds, read once per install, uninstall or status."""

    schema_exists: bool
    functions: dict[str, Function]
    triggers: list[Installed]
    #: Our tables present: name -> marked.
    tables: dict[str, bool]
    #: Our functions that a role other than their owner may execute.
    exposed: list[str]


_FIND_RELATION = """
SELECT c.oid, n.nspname, c.relname, c.relkind,
       (SELECT pn.nspname || '.' || p.relname FROM pg_catalog.pg_inherits i
        JOIN pg_catalog.pg_class p ON p.oid = i.inhparent
        JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
        WHERE i.inhrelid = c.oid LIMIT 1)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = %(table)s
  AND CASE WHEN %(schema)s::text IS NULL THEN pg_catalog.pg_table_is_visible(c.oid)
           ELSE n.nspname = %(schema)s END
"""
_TREE = """
WITH RECURSIVE tree(oid) AS (
  SELECT %(oid)s::oid
  UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.oid)
SELECT c.oid, n.nspname, c.relname, c.relkind
FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.oid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
ORDER BY c.oid <> %(oid)s::oid, n.nspname, c.relname
"""
_COLUMNS = """
SELECT a.attname
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_PRIMARY_KEY = """
SELECT a.attname
FROM pg_catalog.pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisprimary
ORDER BY k.ord
"""
# Ours: in our schema, named dbnotify_*, and either marked by our comment
# (only a function's owner can comment on it) or, for installs made before
# the marks, a trigger function of exactly the shape those versions made.
_OUR_FUNCTIONS = """
SELECT p.oid, p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid),
       d.description IS NOT NULL,
       p.proacl IS NULL  -- the default: PUBLIC may execute
       OR EXISTS (SELECT FROM pg_catalog.aclexplode(p.proacl) AS a WHERE a.grantee <> p.proowner)
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
LEFT JOIN pg_catalog.pg_description d ON d.objoid = p.oid AND d.objsubid = 0
  AND d.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass
  AND left(d.description, 15) = 'flask-dbnotify '
WHERE n.nspname = %(schema)s AND left(p.proname, 9) = 'dbnotify_'
  AND (d.description IS NOT NULL
       OR (p.prosecdef AND p.proconfig = ARRAY['search_path=pg_catalog, pg_temp']
           AND ((p.prorettype = 'pg_catalog.trigger'::pg_catalog.regtype AND p.pronargs = 0
                 AND p.proname ~ '^dbnotify_[a-z0-9_]+_[iud]_[0-9a-f]{10}$'
                 AND p.prosrc LIKE '%%pg_notify(''dbnotify''%%')
                OR (p.proname = 'dbnotify_spill' AND p.pronargs = 1
                    AND p.prosrc LIKE 'INSERT INTO %%dbnotify_payload%%'))))
"""
_OUR_TRIGGERS = """
SELECT t.tgname, c.oid, n.nspname, c.relname, p.proname
FROM pg_catalog.pg_trigger t
JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
WHERE NOT t.tgisinternal AND t.tgname = p.proname AND p.oid = ANY(%(functions)s)
ORDER BY n.nspname, c.relname, t.tgname
"""
_OUR_TABLES = """
SELECT c.relname, d.description IS NOT NULL,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_description d ON d.objoid = c.oid AND d.objsubid = 0
  AND d.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass
  AND left(d.description, 15) = 'flask-dbnotify '
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(names)s) AND c.relkind = 'r'
"""


def describe(watch: Watch) -> str:
    return f"{watch.schema}.{watch.table}" if watch.schema else watch.table


def read_catalog(cur: Any, schema: str) -> Catalog:
    """Read what of ours the database holds. Raises :class:`DBNotifyError`
    if a table has one of our names but is not ours."""
    cur.execute("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (schema,))
    schema_exists = cur.fetchone() is not None
    cur.execute(_OUR_FUNCTIONS, {"schema": schema})
    rows = cur.fetchall()
    functions = {name: Function(name, args, marked) for _, name, args, marked, _ in rows}
    exposed = [name for _, name, _, _, shared in rows if shared]
    cur.execute(_OUR_TRIGGERS, {"functions": [row[0] for row in rows]})
    triggers = [Installed(*row) for row in cur.fetchall()]
    known = {**_TABLES, **_LEGACY_TABLES}
    cur.execute(_OUR_TABLES, {"schema": schema, "names": list(known)})
    tables: dict[str, bool] = {}
    for name, marked, columns in cur.fetchall():
        if not marked and not known[name] <= set(columns):
            raise DBNotifyError(
                f"table {schema}.{name} exists but was not made by Flask-DBNotify: "
                "rename it, or set DBNOTIFY_SCHEMA to another schema"
            )
        tables[name] = marked
    return Catalog(schema_exists, functions, triggers, tables, exposed)


def resolve(cur: Any, watch: Watch) -> Resolved:
    """Match ``watch`` against the catalog; raise :class:`WatchError` if the
    table, a column or the primary key is missing."""
    cur.execute(_FIND_RELATION, {"table": watch.table, "schema": watch.schema})
    row = cur.fetchone()
    if row is None:
        where = f"schema {watch.schema!r}" if watch.schema else "the search_path"
        raise WatchError(
            f"table {describe(watch)!r} does not exist (looked in {where}): " + TABLE_MISSING_TODO
        )
    oid, schema, table, kind, parent = row
    if parent is not None:
        # A statement on the parent fires only the parent's statement
        # triggers: writes made through it would be missed.
        raise WatchError(
            f"{describe(watch)!r} is a partition or child of {parent!r}: writes made "
            f"through {parent!r} would be missed, so watch {parent!r} (its partitions "
            "and children are covered)"
        )
    if kind not in ("r", "p"):
        what = _KINDS.get(kind, f"a relation of kind {kind!r}")
        raise WatchError(
            f"{describe(watch)!r} is {what}, not a table: watch the tables it reads"
            if kind in ("v", "m")
            else f"{describe(watch)!r} is {what}, not a table"
        )
    cur.execute(_COLUMNS, (oid,))
    columns = tuple(name for (name,) in cur.fetchall())
    cur.execute(_PRIMARY_KEY, (oid,))
    pk = tuple(name for (name,) in cur.fetchall())
    check_table(describe(watch), watch, columns, pk)
    cur.execute(_TREE, {"oid": oid})
    tree, uncovered = [], []
    for child_oid, child_schema, child_name, child_kind in cur.fetchall():
        if child_kind in ("r", "p"):
            tree.append((child_oid, child_schema, child_name))
        else:
            uncovered.append(f"{child_schema}.{child_name}")
    return Resolved(watch, oid, schema, table, columns, pk, tuple(tree), tuple(uncovered))


def resolve_all(cur: Any, watches: Sequence[Watch]) -> list[Resolved]:
    """:func:`resolve` every watch; two watches may not cover one table."""
    resolved = [resolve(cur, w) for w in watches]
    seen: dict[int, str] = {}
    for r in resolved:
        for oid, schema, table in r.tree:
            if oid in seen:
                raise WatchError(
                    f"{seen[oid]!r} and {r.watch.name!r} cover the same table "
                    f"{schema}.{table}: watch it once"
                )
            seen[oid] = r.watch.name
    return resolved
