"""PostgreSQL: statement-level triggers that NOTIFY, and a LISTENing socket.

Each watched operation gets ``AFTER ... FOR EACH STATEMENT`` triggers with a
transition table, on the watched table and on each of its partitions and
inheritance children (a statement on a child fires only the child's
statement triggers). What runs in a writer's transaction is split by the
rights it needs (see docs/security.rst):

- A *fast* watch has one trigger function per operation, ``SECURITY
  INVOKER``: it turns the rows into JSON with the writer's own rights and
  sends them with ``pg_notify``; a message longer than a notification is
  sent in pieces.
- A *durable* watch has two per operation, fired one after the other. The
  first (invoker) turns the rows into JSON and leaves them in
  transaction-local settings; the second (``SECURITY DEFINER``, no user
  value ever passes through a function of the user's in it) moves them into
  the journal, which only it and the app's role may write.

Every function is executable by its owner only, and is marked with a
comment so that we drop only what we created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import select
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import sqlalchemy as sa
from psycopg2 import sql

from .. import _payload
from .._items import Item, Lost
from .._log import RateLimited
from .._watch import Watch
from ..errors import TABLE_MISSING_TODO, DBNotifyError, WatchError
from ..events import ChangeEvent, Operation
from . import DEAF, Backend, Status, Stream, execute_on, parse_url, reason

log = logging.getLogger(__name__)
_skipped = RateLimited(log)

CHANNEL = "dbnotify"
#: application_name of listener sessions, as pg_stat_activity shows them.
LISTENER_NAME = "flask-dbnotify listener"
#: application_name of the session ``status`` opens to check the listener's URL.
CHECK_NAME = "flask-dbnotify check"
#: How long ``status`` waits for its check notification to arrive.
STATUS_CHECK_WAIT = 3.0
#: What identifies a database, as the server says it (not as a URL or a
#: pooler's alias names it): the same in two sessions if and only if both
#: are in the same database of the same running server.
_IDENTITY = "current_database(), pg_postmaster_start_time()"
#: Bumped whenever the generated SQL changes shape; part of every hash.
DDL_VERSION = 6
#: PostgreSQL rejects a NOTIFY payload of 8000 bytes or more.
NOTIFY_LIMIT = 8000
#: A row whose JSON (for an UPDATE, new and old together) is longer than
#: this is delivered cut: its primary key only, with ``event.cut`` set.
MAX_ROW_BYTES = 16 * 1024 * 1024
#: Bytes of a long message per notification, when it is sent in pieces.
PIECE_BYTES = 7900
#: The longest message a listener puts together from pieces.
MAX_MESSAGE_BYTES = MAX_ROW_BYTES + 64 * 1024
#: Comments on our functions and tables start with this.
MARKER = "flask-dbnotify"
#: Durable triggers hand rows over in settings of at most this many bytes.
_SLOT_BYTES = 64 * 1024 * 1024
_OP_CODE = {
    Operation.INSERT: "i",
    Operation.UPDATE: "u",
    Operation.DELETE: "d",
    Operation.TRUNCATE: "t",
}
_TRANSITIONS = {
    Operation.INSERT: "REFERENCING NEW TABLE AS dbnotify_new",
    Operation.UPDATE: "REFERENCING OLD TABLE AS dbnotify_old NEW TABLE AS dbnotify_new",
    Operation.DELETE: "REFERENCING OLD TABLE AS dbnotify_old",
    Operation.TRUNCATE: "",
}
_CATCH_UP_BATCH = 5000
_LOCK_KEY = 0x64626E74  # "dbnt": serialises concurrent installs
_PINNED = "SET search_path = pg_catalog, pg_temp"
#: Errors that mean "this row is too large to turn into JSON".
_TOO_LARGE = "program_limit_exceeded OR out_of_memory"
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
}
#: Tables of earlier versions that are no longer used.
_LEGACY_TABLES = {"dbnotify_payload": {"id", "created_at", "body"}}


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


@dataclass(frozen=True)
class TriggerFunction:
    """One trigger function a watch needs, and its trigger."""

    op: Operation
    body: str
    #: The function runs with its owner's rights (only ever on values that
    #: no function of a user touches).
    definer: bool
    #: The search_path is pinned; an invoker function whose output another
    #: function trusts must not depend on the writer's search_path.
    pinned: bool
    #: With the transition tables.
    transitions: bool


# -- catalog ----------------------------------------------------------------

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


def _describe(watch: Watch) -> str:
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
            f"table {_describe(watch)!r} does not exist (looked in {where}): " + TABLE_MISSING_TODO
        )
    oid, schema, table, kind, parent = row
    if parent is not None:
        # A statement on the parent fires only the parent's statement
        # triggers: writes made through it would be missed.
        raise WatchError(
            f"{_describe(watch)!r} is a partition or child of {parent!r}: writes made "
            f"through {parent!r} would be missed, so watch {parent!r} (its partitions "
            "and children are covered)"
        )
    if kind not in ("r", "p"):
        what = _KINDS.get(kind, f"a relation of kind {kind!r}")
        raise WatchError(
            f"{_describe(watch)!r} is {what}, not a table: watch the tables it reads"
            if kind in ("v", "m")
            else f"{_describe(watch)!r} is {what}, not a table"
        )
    cur.execute(_COLUMNS, (oid,))
    columns = tuple(name for (name,) in cur.fetchall())
    for col in (watch.columns or ()) + (watch.when_changed or ()):
        if col not in columns:
            raise WatchError(
                f"table {_describe(watch)!r} has no column {col!r} (columns: {', '.join(columns)})"
            )
    cur.execute(_PRIMARY_KEY, (oid,))
    pk = tuple(name for (name,) in cur.fetchall())
    if not pk:
        raise WatchError(
            f"table {_describe(watch)!r} has no primary key: events are identified "
            "by it, so add one"
        )
    cur.execute(_TREE, {"oid": oid})
    tree, uncovered = [], []
    for child_oid, child_schema, child_name, child_kind in cur.fetchall():
        if child_kind in ("r", "p"):
            tree.append((child_oid, child_schema, child_name))
        else:
            uncovered.append(f"{child_schema}.{child_name}")
    return Resolved(watch, oid, schema, table, columns, pk, tuple(tree), tuple(uncovered))


# -- quoting ----------------------------------------------------------------
#
# The DDL is rendered without a connection. A name or value holding what
# SQLAlchemy's text() (which Alembic's op.execute() uses) would take for a
# bind parameter, ':name', is written in escape form (``U&"..."`` with ':'
# as \003A, ``E'...'`` with ':' as \x3a).

_BIND = re.compile(r"(?<![:\w\\]):\w")


def ident(*parts: str) -> str:
    """A quoted (possibly qualified) identifier."""
    out = []
    for part in parts:
        if _BIND.search(part):
            escaped = part.replace("\\", "\\\\").replace('"', '""').replace(":", "\\003A")
            out.append(f'U&"{escaped}"')
        else:
            out.append('"' + part.replace('"', '""') + '"')
    return ".".join(out)


def literal(value: str) -> str:
    """A string literal, right whatever standard_conforming_strings is in
    the session that runs it (triggers run in writers' sessions)."""
    if _BIND.search(value) or "\\" in value:
        escaped = value.replace("\\", "\\\\").replace("'", "''").replace(":", "\\x3a")
        return f"E'{escaped}'"
    return "'" + value.replace("'", "''") + "'"


def _body(text: str) -> str:
    """A function body, dollar-quoted (readable in ``--sql`` output)."""
    return f"$dbnotify${text}$dbnotify$" if "$dbnotify$" not in text else literal(text)


def text_array(values: Sequence[str]) -> str:
    return "ARRAY[" + ", ".join(literal(v) for v in values) + "]::text[]"


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return slug[:36] or "t"


# -- the SQL a trigger runs ------------------------------------------------


def _row_json(r: Resolved, ref: str) -> str:
    """JSON text of the row ``ref`` (a composite value), limited to the
    carried columns. Columns are picked by name at run time, so dropping or
    renaming one never makes a write fail."""
    if r.watch.columns is None:
        return f"row_to_json({ref})::text"
    carried = [c for c in r.columns if c in r.watch.columns or c in r.pk]
    return _pick(f"row_to_json({ref})", carried)


def _pick(json_expr: str, names: Sequence[str]) -> str:
    """JSON text of the object ``json_expr`` with only the keys ``names``."""
    return (
        f"(SELECT json_object_agg(e.key, e.value) FROM json_each({json_expr}) AS e "
        f"WHERE e.key = ANY({text_array(names)}))::text"
    )


def _changed_json(new: str, old: str) -> str:
    """``|| ',' || [names of the columns whose JSON differs]``."""
    return (
        "|| ',' || (SELECT coalesce(json_agg(a.key), '[]') "
        f"FROM json_each(row_to_json({new})) AS a JOIN json_each(row_to_json({old})) AS b "
        "USING (key) WHERE a.value::text IS DISTINCT FROM b.value::text)::text "
    )


def _when_changed(r: Resolved, new: str, old: str) -> str:
    cols = text_array(list(r.watch.when_changed or ()))
    return (
        f"EXISTS (SELECT FROM unnest({cols}) AS w(k) "
        f"WHERE to_jsonb({new}) -> w.k IS DISTINCT FROM to_jsonb({old}) -> w.k)"
    )


def _rows(r: Resolved, op: Operation, one: bool = False) -> str:
    """A query yielding ``(i, j)``: row order and the row's JSON. With
    ``one``, only ``j``, in the transition table's order; for an UPDATE
    that pairs rows only when the statement changed one row."""
    # The whole-row alias must not be the name of one of the columns.
    alias = "dbnotify_row"
    while alias in r.columns:
        alias += "_"
    row = ident(alias)
    number = "" if one else "row_number() OVER () AS i, "
    if op is not Operation.UPDATE:
        table = "dbnotify_new" if op is Operation.INSERT else "dbnotify_old"
        return f"SELECT {number}{_row_json(r, row)} AS j FROM {table} AS {row}"
    # Transition tables hold old and new rows in the same order, so pair
    # them by position; joining on the key would lose rows whose key
    # changed. `*<>` compares binary images: it needs no `=` operator for
    # any column type, and filters UPDATEs that change nothing.
    condition = "nn.r *<> oo.r"
    if r.watch.when_changed:
        condition += " AND " + _when_changed(r, "nn.r", "oo.r")
    # With every column carried, the listener works out `changed` from new
    # and old; otherwise the trigger must.
    changed = _changed_json("nn.r", "oo.r") if r.watch.columns is not None else ""
    j = f"'[' || {_row_json(r, 'nn.r')} || ',' || {_row_json(r, 'oo.r')} {changed}|| ']' AS j"
    if one:
        return (
            f"SELECT {j} FROM (SELECT {row} AS r FROM dbnotify_new AS {row}) AS nn, "
            f"(SELECT {row} AS r FROM dbnotify_old AS {row}) AS oo WHERE {condition}"
        )
    return (
        f"SELECT nn.i, {j} "
        f"FROM (SELECT row_number() OVER () AS i, {row} AS r FROM dbnotify_new AS {row}) AS nn "
        f"JOIN (SELECT row_number() OVER () AS i, {row} AS r FROM dbnotify_old AS {row}) AS oo "
        f"USING (i) WHERE {condition}"
    )


def _key_of(r: Resolved, json_expr: str) -> str:
    """The primary key columns of a row's JSON, as a JSON object."""
    return f"coalesce({_pick(json_expr, r.pk)}, '{{}}')"


def _cut(r: Resolved, op: Operation, j: str) -> str:
    """The cut form of the row JSON ``j``: ``["cut", key]`` (UPDATE:
    ``["cut", new key, old key]``)."""
    if op is Operation.UPDATE:
        keys = f"{_key_of(r, f'({j})::json -> 0')} || ',' || {_key_of(r, f'({j})::json -> 1')}"
    else:
        keys = _key_of(r, f"({j})::json")
    return f"""'["cut",' || {keys} || ']'"""


def _cut_rows(r: Resolved, op: Operation) -> str:
    """``(i, j)`` with rows over MAX_ROW_BYTES in their cut form. OFFSET 0
    keeps the planner from inlining the JSON, which would build it twice."""
    return (
        f"SELECT i, CASE WHEN octet_length(j) > {MAX_ROW_BYTES} THEN {_cut(r, op, 'j')} "
        f"ELSE j END AS j FROM ({_rows(r, op)} OFFSET 0) AS r"
    )


def _one(r: Resolved, op: Operation, target: str, emit: str, fallback: str) -> str:
    """A statement's only row into ``target``, then ``emit`` (unless an
    UPDATE changed nothing); ``fallback`` if it cannot become JSON. Only
    the conversion is guarded: a block around a query is cheap, one around
    set_config() and pg_notify() is not. The size is checked here rather
    than in the query: a plan's parts are set up on every run, used or not."""
    return f"""
      BEGIN
        SELECT r.j INTO {target} FROM ({_rows(r, op, one=True)}) AS r;
      EXCEPTION WHEN {_TOO_LARGE} THEN
        failed := true;
      END;
      IF failed THEN
        {fallback}
      ELSIF {target} IS NOT NULL THEN
        IF octet_length({target}) > {MAX_ROW_BYTES} THEN
          {target} := {_cut(r, op, target)};
        END IF;
        {emit}
      END IF;"""


def _groups(r: Resolved, op: Operation, size: int) -> str:
    """The rows' JSON joined by ',' into groups of about ``size`` bytes."""
    return (
        f"SELECT string_agg(j, ',' ORDER BY i) FROM ("
        f"SELECT i, j, sum(octet_length(j) + 1) OVER (ORDER BY i ROWS UNBOUNDED PRECEDING) "
        f"/ {size} AS b FROM ({_cut_rows(r, op)}) AS r) AS r GROUP BY b ORDER BY b"
    )


def _each_row(r: Resolved, op: Operation, target: str, emit: str) -> str:
    """The slow path, after a statement's rows could not all be turned into
    JSON: one row at a time, a row that still fails delivered cut (a
    single-row statement's row is known to fail). Runs ``emit`` with the
    row's JSON in ``target``. Should even that fail (a key column renamed
    since install), every row goes out cut with an empty key."""

    def key(alias: str) -> str:
        pairs = ", ".join(f"{literal(k)}, {alias}.{ident(k)}" for k in r.pk)
        return f"json_build_object({pairs})::text"

    new, old = "pair.n", "pair.o"
    if op is Operation.INSERT:
        query = f"SELECT r AS n, {key('r')} AS nk FROM dbnotify_new AS r"
        cut_keys, empty = "pair.nk", "{}"
    elif op is Operation.DELETE:
        query = f"SELECT r AS o, {key('r')} AS ok FROM dbnotify_old AS r"
        cut_keys, empty = "pair.ok", "{}"
    else:
        query = (
            "SELECT nn.r AS n, oo.r AS o, nn.k AS nk, oo.k AS ok "
            f"FROM (SELECT row_number() OVER () AS i, r, {key('r')} AS k "
            "FROM dbnotify_new AS r) AS nn "
            f"JOIN (SELECT row_number() OVER () AS i, r, {key('r')} AS k "
            "FROM dbnotify_old AS r) AS oo "
            "USING (i) WHERE nn.r *<> oo.r"
        )
        cut_keys, empty = "pair.nk || ',' || pair.ok", "{},{}"
    if op is Operation.UPDATE:
        changed = _changed_json(new, old) if r.watch.columns is not None else ""
        json_of = f"'[' || {_row_json(r, new)} || ',' || {_row_json(r, old)} {changed}|| ']'"
        skip = (
            f"IF NOT {_when_changed(r, new, old)} THEN CONTINUE; END IF;"
            if r.watch.when_changed
            else ""
        )
    else:
        json_of, skip = _row_json(r, new if op is Operation.INSERT else old), ""
    return f"""
    BEGIN
      FOR pair IN {query} LOOP
        BEGIN
          IF rows_in = 1 THEN
            RAISE SQLSTATE '54000';
          END IF;
          {skip}
          {target} := {json_of};
          IF octet_length({target}) > {MAX_ROW_BYTES} THEN
            {target} := {_cut(r, op, target)};
          END IF;
        EXCEPTION WHEN {_TOO_LARGE} THEN
          {target} := '["cut",' || {cut_keys} || ']';
        END;
        {emit}
      END LOOP;
    EXCEPTION WHEN OTHERS THEN
      FOR pair IN SELECT FROM generate_series(1, rows_in) LOOP
        {target} := '["cut",{empty}]';
        {emit}
      END LOOP;
    END;"""


def _send(channel: str) -> str:
    """Notify ``head || seq || ',"r": [' || batch || ']}'``, in pieces when
    it does not fit in one notification. A piece is ``~SEQ K BYTES LAST``,
    a newline, then the next stretch of the message's UTF-8 bytes, cut at
    a character boundary."""
    counter = (
        "seq := coalesce(current_setting('dbnotify.batch', true), ''); "
        "seq := set_config('dbnotify.batch', "
        "(CASE WHEN seq ~ '^[0-9]{1,15}$' THEN seq::bigint ELSE 0 END + 1)::text, true);"
    )
    return f"""
      {counter}
      msg := head || seq || ',"r": [' || batch || ']}}';
      IF octet_length(msg) < {NOTIFY_LIMIT} THEN
        PERFORM pg_notify({channel}, msg);
      ELSE
        bytes := convert_to(msg, 'UTF8');
        total := octet_length(bytes);
        pos := 0;
        k := 0;
        WHILE pos < total LOOP
          len := least({PIECE_BYTES}, total - pos);
          WHILE pos + len < total AND get_byte(bytes, pos + len) & 192 = 128 LOOP
            len := len - 1;
          END LOOP;
          k := k + 1;
          PERFORM pg_notify({channel}, '~' || seq || ' ' || k || ' ' || total || ' '
            || (pos + len = total)::int || chr(10)
            || convert_from(substring(bytes FROM pos + 1 FOR len), 'UTF8'));
          pos := pos + len;
        END LOOP;
      END IF;"""


def _head(r: Resolved, op: Operation) -> str:
    # ": " rather than ":" keeps the DDL free of ":name" sequences, which
    # sqlalchemy.text() (Alembic's op.execute) would take for parameters.
    return json.dumps(
        {"v": _payload.VERSION, "t": r.watch.name, "o": op.value[0], "k": list(r.pk)},
        ensure_ascii=False,
        separators=(",", ": "),
    )[:-1]


def _changed_table(op: Operation) -> str:
    return "dbnotify_old" if op is Operation.DELETE else "dbnotify_new"


def fast_body(r: Resolved, op: Operation) -> str:
    """Invoker rights: the rows become JSON as the writer, and go out by NOTIFY."""
    channel = literal(CHANNEL)
    head = literal(_head(r, op) + ',"ts": ')
    budget = (NOTIFY_LIMIT - len(_head(r, op).encode()) - 120) // 2
    if budget < 500:
        raise WatchError(f"names of {r.watch.name!r} are too long for a notification")
    send = _send(channel)
    slow = _each_row(r, op, "batch", send)
    return f"""
DECLARE
  head text := {head} || extract(epoch FROM clock_timestamp())::text || ',"s": ';
  failed boolean := false;
  rows_in bigint;
  batch text;
  seq text;
  msg text;
  bytes bytea;
  total int;
  pos int;
  len int;
  k int;
  pair record;
BEGIN
  SELECT count(*) INTO rows_in FROM {_changed_table(op)};
  IF rows_in = 0 THEN
    RETURN NULL;
  END IF;
  IF rows_in = 1 THEN
    -- Most writes touch one row: skip the batching machinery.
    {_one(r, op, "batch", send, slow)}
  ELSE
    BEGIN
      FOR batch IN {_groups(r, op, budget)} LOOP
        {send}
      END LOOP;
    EXCEPTION WHEN {_TOO_LARGE} THEN
      -- Nothing was sent (the block's notifications are rolled back).
      {slow}
    END;
  END IF;
  RETURN NULL;
END
"""


def stash_body(r: Resolved, op: Operation) -> str:
    """Durable, first half (invoker rights, pinned search_path): the rows
    become JSON as the writer and are left, separated by chr(30) (which
    JSON text never holds), in the transaction-local setting
    ``dbnotify.s<depth>_1``. It always sets it, to nothing when there are no
    rows, so what the second half reads was written here, for this
    statement. Over 1 GB of rows (the slow path) go in ``_2``, ``_3``...
    and ``_1`` holds ``#`` and their number."""
    # In the slow path a value's own code (a cast, as the writer) runs
    # after earlier slots are set, and could change them: their digests
    # are checked before the hand-over. (Otherwise every row is converted
    # before the only slot is set.)
    flush = (
        "k := k + 1; part := array_to_string(parts, chr(30)); sums := sums || md5(part); "
        "PERFORM set_config('dbnotify.s' || d || '_' || (k + 1), part, true); "
        "parts := '{}'; size := 0;"
    )
    emit = f"""
      IF one IS NOT NULL THEN
        IF size > 0 AND size + octet_length(one) > {_SLOT_BYTES} THEN {flush} END IF;
        parts := parts || one;
        size := size + octet_length(one) + 1;
      END IF;"""
    # INSERT and DELETE rows are aggregated in the order of the transition
    # table (the order row_number() OVER () numbers them in); UPDATE pairs
    # come out of a join, so they are put back in order.
    one_table = op is not Operation.UPDATE
    rows = _rows(r, op, one=True) if one_table else _rows(r, op)
    order = "" if one_table else " ORDER BY r.i"
    return f"""
DECLARE
  d text := pg_trigger_depth()::text;
  failed boolean := false;
  rows_in bigint;
  biggest int;
  part text;
  one text;
  parts text[] := '{{}}';
  sums text[] := '{{}}';
  size bigint := 0;
  k int := 0;
  pair record;
BEGIN
  BEGIN
    -- One query, one text for the whole statement (a writer's statement
    -- mostly touches one row, and two queries cost more than one). Only a
    -- statement with a row over MAX_ROW_BYTES runs the query that cuts.
    SELECT string_agg(r.j, chr(30){order}), max(octet_length(r.j))
      INTO part, biggest FROM ({rows}) AS r;
    IF biggest > {MAX_ROW_BYTES} THEN
      SELECT string_agg(r.j, chr(30) ORDER BY r.i) INTO part FROM ({_cut_rows(r, op)}) AS r;
    END IF;
  EXCEPTION WHEN {_TOO_LARGE} THEN
    -- Over 1 GB in all, or a row that cannot become JSON.
    failed := true;
  END;
  IF failed THEN
    SELECT count(*) INTO rows_in FROM {_changed_table(op)};
    {_each_row(r, op, "one", emit)}
    IF size > 0 THEN {flush} END IF;
    FOR n IN 1..k LOOP
      IF md5(current_setting('dbnotify.s' || d || '_' || (n + 1))) <> sums[n] THEN
        RAISE EXCEPTION 'Flask-DBNotify: rows changed while being journaled';
      END IF;
    END LOOP;
    part := '#' || k;
  END IF;
  PERFORM set_config('dbnotify.s' || d || '_1', coalesce(part, ''), true);
  RETURN NULL;
END
"""


def _notify_journal(lo: str, hi: str) -> str:
    """NOTIFY the journal ids ``lo``..``hi`` of transaction ``x`` (variables)."""
    return (
        f"""PERFORM pg_notify({literal(CHANNEL)}, '{{"v": 1, "J": [' || {lo} || ', ' """
        f"""|| {hi} || '], "x": ' || x || '}}');"""
    )


def journal_body(r: Resolved, op: Operation, schema: str) -> str:
    """Durable, second half (owner's rights): move what the first half left
    into the journal, one row per event, and NOTIFY only the range of ids
    and the transaction id. It reads text and writes our table; no value
    of the user's, and so no function of the user's, is involved."""
    journal, watch = ident(schema, "dbnotify_journal"), literal(r.watch.name)
    head = literal(_head(r, op) + ',"ts": ')
    return f"""
DECLARE
  d text := pg_trigger_depth()::text;
  one text := current_setting('dbnotify.s' || d || '_1', true);
  x xid8;
  lo bigint;
  hi bigint;
  head text;
BEGIN
  IF one IS NULL OR one = '' OR one = '#0' THEN
    RETURN NULL;
  END IF;
  x := pg_current_xact_id();
  head := {head} || extract(epoch FROM clock_timestamp())::text || ',"r": [';
  IF left(one, 1) <> '#' THEN
    IF strpos(one, chr(30)) = 0 THEN
      -- Most writes touch one row.
      INSERT INTO {journal} (xid, watch, body)
      VALUES (x, {watch}, head || one || ']}}') RETURNING id INTO lo;
      hi := lo;
    ELSE
      WITH ins AS (
        INSERT INTO {journal} (xid, watch, body)
        SELECT x, {watch}, head || e.j || ']}}' FROM string_to_table(one, chr(30)) AS e(j)
        RETURNING id)
      SELECT min(id), max(id) INTO lo, hi FROM ins;
      IF octet_length(one) > 1048576 THEN
        -- Free a large text now rather than at commit.
        PERFORM set_config('dbnotify.s' || d || '_1', '', true);
      END IF;
    END IF;
  ELSE
    -- Over 1 GB of rows, in slots 2 and up.
    WITH ins AS (
      INSERT INTO {journal} (xid, watch, body)
      SELECT x, {watch}, head || e.j || ']}}'
      FROM generate_series(2, substr(one, 2)::int + 1) AS s(k)
      CROSS JOIN LATERAL string_to_table(
        current_setting('dbnotify.s' || d || '_' || s.k), chr(30)) WITH ORDINALITY AS e(j, o)
      ORDER BY s.k, e.o
      RETURNING id)
    SELECT min(id), max(id) INTO lo, hi FROM ins;
    PERFORM set_config('dbnotify.s' || d || '_' || s.k, '', true)
      FROM generate_series(2, substr(one, 2)::int + 1) AS s(k);
  END IF;
  IF lo IS NOT NULL THEN
    {_notify_journal("lo", "hi")}
  END IF;
  RETURN NULL;
END
"""


def truncate_body(r: Resolved, schema: str) -> str:
    """TRUNCATE carries no row. One TRUNCATE of a partitioned table fires
    the trigger of every table it empties; those calls must make one
    event, but two TRUNCATEs with a change of the table between them must
    make two. So a TRUNCATE is dropped only when nothing of this watch
    happened since the last one in the transaction (which changes nothing):
    fast, the notification carries the transaction's counter of row
    notifications, unchanged if none was sent, and PostgreSQL folds equal
    notifications; durable, it is not journaled when the transaction's
    latest journal row is already a TRUNCATE of this watch."""
    head = _head(r, Operation.TRUNCATE) + ',"ts": '
    ts = "extract(epoch FROM statement_timestamp())::text"
    if not r.watch.durable:
        return f"""
DECLARE
  seq text := coalesce(current_setting('dbnotify.batch', true), '');
BEGIN
  PERFORM pg_notify({literal(CHANNEL)}, {literal(head)} || {ts} || ',"s": '
    || CASE WHEN seq ~ '^[0-9]{{1,15}}$' THEN seq ELSE '0' END || '}}');
  RETURN NULL;
END
"""
    journal = ident(schema, "dbnotify_journal")
    return f"""
DECLARE
  x xid8 := pg_current_xact_id();
  jid bigint;
BEGIN
  INSERT INTO {journal} (xid, watch, body)
  SELECT x, {literal(r.watch.name)}, {literal(head)} || {ts} || '}}'
  WHERE NOT EXISTS (
    SELECT FROM (SELECT j.watch, j.body FROM {journal} AS j
                 WHERE j.xid = x ORDER BY j.id DESC LIMIT 1) AS latest
    WHERE latest.watch = {literal(r.watch.name)}
      AND left(latest.body, {len(head)}) = {literal(head)})
  RETURNING id INTO jid;
  IF jid IS NOT NULL THEN
    {_notify_journal("jid", "jid")}
  END IF;
  RETURN NULL;
END
"""


def watch_functions(r: Resolved, schema: str) -> dict[str, TriggerFunction]:
    """Function (and trigger) name -> what it is. The names carry a hash of
    everything the triggers do, so drift is visible. A durable watch's
    second function is named after the first with ``_j``, so it fires
    right after it (triggers fire in name order)."""
    parts: list[tuple[str, TriggerFunction]] = []
    ops = [op for op in r.watch.operations if op is not Operation.TRUNCATE]
    for op in ops:
        if r.watch.durable:
            parts.append(("", TriggerFunction(op, stash_body(r, op), False, True, True)))
            parts.append(
                ("_j", TriggerFunction(op, journal_body(r, op, schema), True, True, False))
            )
        else:
            parts.append(("", TriggerFunction(op, fast_body(r, op), False, False, True)))
    durable = r.watch.durable
    truncate = TriggerFunction(
        Operation.TRUNCATE, truncate_body(r, schema), durable, durable, False
    )
    parts.append(("", truncate))
    digest = hashlib.sha256(
        json.dumps(
            [DDL_VERSION, schema, r.schema, r.table]
            + [[suffix, f.op.value, f.body, f.definer, f.pinned] for suffix, f in parts]
        ).encode()
    ).hexdigest()[:10]
    slug = _slug(r.table)
    return {f"dbnotify_{slug}_{_OP_CODE[f.op]}_{digest}{suffix}": f for suffix, f in parts}


def create_function(schema: str, name: str, f: TriggerFunction, watch: str) -> list[str]:
    fn = ident(schema, name)
    options = ("SECURITY DEFINER " if f.definer else "") + (_PINNED + " " if f.pinned else "")
    return [
        f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql {options}"
        f"AS {_body(f.body)}",
        # Triggers fire whatever the writer's rights on the function;
        # EXECUTE is only needed to attach it to a table.
        f"REVOKE ALL ON FUNCTION {fn}() FROM PUBLIC",
        f"COMMENT ON FUNCTION {fn}() IS "
        + literal(f"{MARKER} trigger function of watch {watch!r} ({f.op.value.lower()})"),
    ]


def create_trigger(schema: str, table: str, name: str, f: TriggerFunction, fn_schema: str) -> str:
    transitions = _TRANSITIONS[f.op] + " " if f.transitions else ""
    return (
        f"CREATE TRIGGER {ident(name)} AFTER {f.op.value} ON {ident(schema, table)} "
        f"{transitions}FOR EACH STATEMENT EXECUTE FUNCTION {ident(fn_schema, name)}()"
    )


def drop_trigger(obj: Installed) -> str:
    return f"DROP TRIGGER IF EXISTS {ident(obj.trigger)} ON {ident(obj.schema, obj.table)}"


def drop_function(schema: str, f: Function) -> str:
    return f"DROP FUNCTION IF EXISTS {ident(schema, f.name)}({f.args})"


def shared_sql(catalog: Catalog, schema: str) -> list[str]:
    """Our schema and tables, made and marked where missing or unmarked;
    what earlier versions made and no longer need, dropped."""
    statements = []
    if not catalog.schema_exists:
        # Only when missing: CREATE SCHEMA IF NOT EXISTS still demands the
        # CREATE right on the database.
        statements.append(f"CREATE SCHEMA {ident(schema)}")
    journal = ident(schema, "dbnotify_journal")
    creates = {
        "dbnotify_journal": (
            f"CREATE TABLE IF NOT EXISTS {journal} ("
            "id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
            "xid xid8 NOT NULL DEFAULT pg_current_xact_id(), "
            "created_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
            "watch text, body text NOT NULL)"
        ),
        # Exactly-once receivers: how far each has claimed, and claims.
        "dbnotify_receivers": (
            f"CREATE TABLE IF NOT EXISTS {ident(schema, 'dbnotify_receivers')} ("
            "receiver text PRIMARY KEY, xid xid8 NOT NULL, id bigint NOT NULL)"
        ),
        "dbnotify_claims": (
            f"CREATE TABLE IF NOT EXISTS {ident(schema, 'dbnotify_claims')} ("
            "receiver text NOT NULL, event_id bigint NOT NULL, "
            "state text NOT NULL DEFAULT 'running', attempts int NOT NULL DEFAULT 1, "
            "claimed_by text, claimed_at timestamptz NOT NULL DEFAULT now(), "
            "next_attempt_at timestamptz, last_error text, "
            "PRIMARY KEY (receiver, event_id))"
        ),
    }
    for name, create in creates.items():
        statements.append(create)
        if not catalog.tables.get(name, False):
            table = ident(schema, name)
            statements += [
                f"REVOKE ALL ON TABLE {table} FROM PUBLIC",
                f"COMMENT ON TABLE {table} IS " + literal(f"{MARKER} {name[9:]}"),
            ]
    statements += [
        # Added before the first release; keeps earlier installs working.
        f"ALTER TABLE {journal} ADD COLUMN IF NOT EXISTS watch text",
        # Replay reads in transaction-id order past a cursor.
        f"CREATE INDEX IF NOT EXISTS dbnotify_journal_xid ON {journal} (xid, id)",
        f"CREATE INDEX IF NOT EXISTS dbnotify_journal_created_at ON {journal} (created_at)",
    ]
    # Before version 0.2, large rows were stored through dbnotify_spill(),
    # which any role could call.
    spill = catalog.functions.get("dbnotify_spill")
    if spill is not None:
        statements.append(drop_function(schema, spill))
    if "dbnotify_payload" in catalog.tables:
        statements.append(f"DROP TABLE IF EXISTS {ident(schema, 'dbnotify_payload')}")
    return statements


def install_plan(catalog: Catalog, resolved: Sequence[Resolved], schema: str) -> list[str]:
    """The statements that make a database holding ``catalog`` match the
    ``resolved`` watches, our objects in ``schema``. Pure: the catalog and
    the tables come from the caller (the database, or a test)."""
    statements = shared_sql(catalog, schema)
    drops: list[str] = []
    wanted_functions: set[str] = set()
    for r in resolved:
        functions = watch_functions(r, schema)
        wanted_functions |= set(functions)
        for name, f in functions.items():
            statements += create_function(schema, name, f, r.watch.name)
        # A table detached from the tree keeps our triggers, and would go
        # on sending events under the watch's name.
        tree = {oid for oid, _, _ in r.tree}
        drops += [
            drop_trigger(o)
            for o in catalog.triggers
            if o.function in functions and o.table_oid not in tree
        ]
        for oid, table_schema, table in r.tree:
            present = {o.trigger for o in catalog.triggers if o.table_oid == oid}
            drops += [
                drop_trigger(o)
                for o in catalog.triggers
                if o.table_oid == oid and o.trigger not in functions
            ]
            statements += [
                create_trigger(table_schema, table, name, f, schema)
                for name, f in functions.items()
                if name not in present
            ]
    # The new triggers are in place before the old ones go, in one
    # transaction: a table is never without triggers.
    statements += drops
    statements += drop_unused(catalog, wanted_functions, drops, schema)
    return statements


def drop_unused(
    catalog: Catalog, keep: set[str], dropped_triggers: Sequence[str], schema: str
) -> list[str]:
    """Drop statements for our trigger functions no trigger will use."""
    return [drop_function(schema, f) for f in unused(catalog, keep, dropped_triggers)]


def unused(catalog: Catalog, keep: set[str], dropped_triggers: Sequence[str]) -> list[Function]:
    """Our trigger functions that no trigger uses once ``dropped_triggers``
    (drop statements) have run, other than ``keep``."""
    dropped = set(dropped_triggers)
    in_use = {o.function for o in catalog.triggers if drop_trigger(o) not in dropped} | keep
    return [
        f
        for name, f in catalog.functions.items()
        if name not in in_use and name != "dbnotify_spill"
    ]


# -- the backend -------------------------------------------------------------


class PostgreSQLBackend(Backend):
    """LISTEN/NOTIFY with statement-level triggers."""

    def __init__(
        self,
        uri: str,
        listen_uri: str,
        schema: str,
        engine: sa.Engine,
        connect_kwargs: dict[str, Any],
    ) -> None:
        super().__init__(uri, listen_uri, schema, engine)
        self.connect_kwargs = connect_kwargs
        # When a pooled connection was last given back (see release_idle()).
        self._returned = time.monotonic()
        self._pool_lock = threading.Lock()
        self._checkouts = 0  # under way, in _connect()
        sa.event.listen(engine, "checkin", self._checked_in)
        # For what runs rarely (trigger checks, status, DDL, pruning, the
        # listener's hearing checks): a connection that is closed at once,
        # so that none is held for it in an idle process, nor by the many
        # processes of a fleet that start together.
        self.rare = sa.create_engine(
            engine.url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT"
        )
        sa.event.listen(self.rare, "connect", _autocommit, insert=True)
        # Durable delivery: where replay resumes, and journal ids delivered
        # past it (id -> transaction id).
        self._cursor: tuple[int, int] | None = None
        self._seen: dict[int, int] = {}
        # (xmax, running xids) of the first snapshot: older transactions
        # not running then had committed before we listened.
        self._before: tuple[int, set[int]] | None = None
        # The first catch-up after a connect replays only transactions that
        # had ended when LISTEN took effect: younger ones notify us, and are
        # delivered in their turn among the queued notifications.
        self._bound: int | None = None
        self._pieces = _new_pieces()

    @classmethod
    def from_url(cls, url: sa.URL, listen_uri: str | None, schema: str) -> PostgreSQLBackend:
        # Our own small engine for DDL and notify(); always psycopg2. Its
        # connections are in autocommit: all we run on them is single
        # statements, which then also work through a pooler in statement
        # mode (it refuses BEGIN); install() begins its transaction itself.
        engine = sa.create_engine(
            url.set(drivername="postgresql+psycopg2"),
            pool_size=2,
            max_overflow=4,
            pool_pre_ping=True,
            isolation_level="AUTOCOMMIT",
        )
        # First, before SQLAlchemy's own first queries on a new connection.
        sa.event.listen(engine, "connect", _autocommit, insert=True)
        listen_url = parse_url(listen_uri) if listen_uri else url
        if listen_url.get_backend_name() != "postgresql":
            raise ValueError("DBNOTIFY_LISTEN_URI must be a postgresql:// URL")
        return cls(
            url.render_as_string(hide_password=False),
            listen_url.render_as_string(hide_password=False),
            schema,
            engine,
            _connect_kwargs(listen_url),
        )

    # -- DDL ----------------------------------------------------------------

    def _engine(self, rare: bool) -> sa.Engine:
        """The pool, or for a rare task the engine without one, unless the
        pool holds a connection that nobody uses right now."""
        pool = self.engine.pool
        if rare and not (isinstance(pool, sa.pool.QueuePool) and pool.checkedin()):
            return self.rare
        return self.engine

    def _connect(self, rare: bool = False) -> sa.Connection:
        engine = self._engine(rare)
        try:
            if engine is self.rare:
                return engine.connect()
            # While a checkout is under way, release_idle() leaves the pool.
            with self._pool_lock:
                self._checkouts += 1
            try:
                return engine.connect()
            finally:
                with self._pool_lock:
                    self._checkouts -= 1
        except sa.exc.DBAPIError as exc:
            raise cannot_connect(self.where, exc) from exc

    def _cursor_do(self, work: Any, transaction: bool = False) -> Any:
        """Run ``work(cursor)`` on a raw DB-API cursor (no parameter parsing
        of our statements): each statement on its own, or with
        ``transaction`` all in one transaction, committed when ``work``
        returns. Database errors become :class:`DBNotifyError`. On a
        connection of its own, closed after (these are rare tasks)."""
        try:
            conn = self.rare.raw_connection()  # DDL, status: rare, and maybe long
        except (psycopg2.Error, sa.exc.DBAPIError) as exc:
            raise cannot_connect(self.where, exc) from exc
        dbapi: Any = conn.driver_connection
        lost = False  # whether the server side closed the connection
        try:
            try:
                dbapi.autocommit = not transaction
                cur: Any = conn.cursor()
                try:
                    result = work(cur)
                finally:
                    cur.close()
                if transaction:
                    conn.commit()
                return result
            finally:
                lost = bool(dbapi.closed)  # before close() closes it for good
                try:
                    if not dbapi.closed:
                        conn.rollback()
                        dbapi.autocommit = True
                finally:
                    if dbapi.closed:
                        conn.invalidate()
                    conn.close()
        except (psycopg2.Error, sa.exc.DBAPIError) as exc:
            # pgbouncer 1.18 closes the connection without a word; others
            # may say why.
            if transaction and (
                "statement pooling" in reason(exc) or lost and self._statement_pooling()
            ):
                raise DBNotifyError(
                    f"installing triggers needs a transaction, and {self.where} closed "
                    "the connection as one began while single statements work: a pooler "
                    "in statement pooling mode (pgbouncer pool_mode = statement)? Run "
                    "install-triggers with DBNOTIFY_DATABASE_URI set to the server "
                    "directly or to a session-pooled address (or run the output of "
                    "`flask dbnotify install-triggers --sql` there, in one transaction)"
                ) from exc
            raise DBNotifyError(f"the database refused: {reason(exc)}") from exc

    def _statement_pooling(self) -> bool:
        """Whether a single statement works where beginning a transaction
        just lost the connection: what a pooler in statement mode does."""
        try:
            with self._connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except (DBNotifyError, sa.exc.SQLAlchemyError):
            return False
        return True

    def execute_all(self, statements: Sequence[str]) -> None:
        # As one query, which PostgreSQL runs in one (implicit) transaction
        # and a pooler in statement mode lets through. Each statement ends
        # on a line of its own, in case it ends in a comment.
        if statements:
            self._cursor_do(lambda cur: cur.execute("\n;\n".join(statements)))

    def _resolve_all(self, cur: Any, watches: Sequence[Watch]) -> list[Resolved]:
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

    def _install_sql(self, cur: Any, watches: Sequence[Watch]) -> list[str]:
        catalog = read_catalog(cur, self.schema)
        return install_plan(catalog, self._resolve_all(cur, watches), self.schema)

    def install_sql(self, watches: Sequence[Watch]) -> list[str]:
        return self._cursor_do(lambda cur: self._install_sql(cur, watches))  # type: ignore[no-any-return]

    def install(self, watches: Sequence[Watch]) -> None:
        def work(cur: Any) -> None:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            for statement in self._install_sql(cur, watches):
                cur.execute(statement)

        self._cursor_do(work, transaction=True)

    def uninstall_sql(self, watches: Sequence[Watch], everything: bool) -> list[str]:
        def work(cur: Any) -> list[str]:
            catalog = read_catalog(cur, self.schema)
            if everything:
                drops = [drop_trigger(o) for o in catalog.triggers]
                statements = drops + drop_unused(catalog, set(), drops, self.schema)
                spill = catalog.functions.get("dbnotify_spill")
                if spill is not None:
                    statements.append(drop_function(self.schema, spill))
                statements += [
                    f"DROP TABLE IF EXISTS {ident(self.schema, name)}" for name in catalog.tables
                ]
                return statements
            oids = {oid for r in self._resolve_all(cur, watches) for oid, _, _ in r.tree}
            drops = [drop_trigger(o) for o in catalog.triggers if o.table_oid in oids]
            gone = {o.function for o in catalog.triggers if o.table_oid in oids}
            still = {o.function for o in catalog.triggers if o.table_oid not in oids}
            return drops + [
                drop_function(self.schema, catalog.functions[name]) for name in sorted(gone - still)
            ]

        return self._cursor_do(work)  # type: ignore[no-any-return]

    def status(self, watches: Sequence[Watch], health: bool = True) -> Status:
        def work(cur: Any) -> Status:
            status = Status()
            catalog = read_catalog(cur, self.schema)
            covered: set[int] = set()
            expected: set[str] = set()
            for watch in watches:
                try:
                    r = resolve(cur, watch)
                    wanted = set(watch_functions(r, self.schema))
                except WatchError as exc:
                    status.error(watch.name, exc)
                    continue
                expected |= wanted
                tree = {oid: f"{schema}.{table}" for oid, schema, table in r.tree}
                covered |= set(tree)
                present = {
                    (o.table_oid, o.trigger) for o in catalog.triggers if o.table_oid in tree
                }
                status.compare(
                    watch.name, present, {(oid, name) for oid in tree for name in wanted}
                )
                lacking = [
                    label
                    for oid, label in tree.items()
                    if oid != r.oid and {(oid, n) for n in wanted} - present
                ]
                problems = []
                if lacking and status.watches[watch.name] != "missing":
                    problems.append("triggers missing on " + ", ".join(lacking[:5]))
                if r.uncovered:
                    problems.append(
                        "foreign tables cannot be watched: " + ", ".join(r.uncovered[:5])
                    )
                if problems:
                    status.details[watch.name] = "; ".join(problems)
            for obj in catalog.triggers:
                if obj.table_oid not in covered:
                    status.orphaned.append(f"trigger {obj.trigger} on {obj.schema}.{obj.table}")
            for f in unused(catalog, expected, []):
                status.orphaned.append(f"function {self.schema}.{f.name}({f.args})")
            for name in catalog.exposed:
                status.warnings.append(
                    f"function {self.schema}.{name}() may be executed by roles other than its "
                    "owner: run `flask dbnotify install-triggers` or REVOKE the grant"
                )
            if "dbnotify_spill" in catalog.functions or "dbnotify_payload" in catalog.tables:
                status.warnings.append(
                    "objects of an earlier version are installed (dbnotify_spill, "
                    "dbnotify_payload): run `flask dbnotify install-triggers`"
                )
            if health:
                self._health(cur, status)
                self._check_listen_url(cur, status)
            return status

        return self._cursor_do(work)  # type: ignore[no-any-return]

    def _health(self, cur: Any, status: Status) -> None:
        health = status.health
        cur.execute("SELECT pg_notification_queue_usage()")
        health["notification queue"] = f"{cur.fetchone()[0]:.2%} used"
        cur.execute(
            "SELECT pid, coalesce(host(client_addr), 'local'), backend_start, state "
            "FROM pg_stat_activity WHERE application_name = %s "
            "AND datname = current_database() ORDER BY backend_start",
            (LISTENER_NAME,),
        )
        rows = cur.fetchall()
        health["listeners"] = str(len(rows))
        for pid, client, since, state in rows:
            # Without pg_read_all_stats, other roles' sessions show NULLs.
            started = f"{since:%Y-%m-%d %H:%M:%S%z}" if since else "unknown"
            health[f"listener {pid}"] = f"from {client}, since {started}, {state or 'unknown'}"
        cur.execute("SELECT to_regclass(%s)", (ident(self.schema, "dbnotify_claims"),))
        if cur.fetchone()[0] is None:
            return
        journal = ident(self.schema, "dbnotify_journal")
        cur.execute(f"SELECT count(*), min(id), max(id) FROM {journal}")
        count, first, last = cur.fetchone()
        health["journal"] = f"{count} rows" + (f", ids {first}..{last}" if count else "")

        def query(statement: str) -> list[Any]:
            cur.execute(statement)
            return cur.fetchall()  # type: ignore[no-any-return]

        status.once_health(
            query,
            ident(self.schema, "dbnotify_claims"),
            ident(self.schema, "dbnotify_receivers"),
        )

    def _check_listen_url(self, cur: Any, status: Status) -> None:
        """Whether a session at the listener's URL is in our database and
        receives a notification sent from this one (``cur``'s session), as
        the listener's must: a pooler in transaction or statement mode
        lets LISTEN run, then passes nothing on."""
        label, where = "listener URL", self.listen_where
        channel, token = f"{CHANNEL}_check_{secrets.token_hex(8)}", secrets.token_hex(8)
        try:
            conn = psycopg2.connect(
                **{"connect_timeout": 5, **self.connect_kwargs, "application_name": CHECK_NAME}
            )
        except psycopg2.Error as exc:
            status.health[label] = f"cannot connect: {reason(exc)}"
            status.warnings.append(f"the listener {cannot_connect(where, exc)}")
            return
        try:
            conn.autocommit = True
            with conn.cursor() as theirs:
                theirs.execute(
                    sql.SQL("LISTEN {}; SELECT " + _IDENTITY).format(sql.Identifier(channel))
                )
                identity = tuple(theirs.fetchone() or ())
            cur.execute("SELECT " + _IDENTITY)
            ours = tuple(cur.fetchone())
            if identity != ours:
                status.health[label] = f"{where}: another database"
                status.warnings.append(
                    f"DBNOTIFY_LISTEN_URI ({where}) leads to {_identity_text(identity)}, "
                    f"DBNOTIFY_DATABASE_URI to {_identity_text(ours)}: the listener refuses "
                    "to start; point both at the same database"
                )
                return
            cur.execute("SELECT pg_notify(%s, %s)", (channel, token))
            deadline = time.monotonic() + STATUS_CHECK_WAIT
            while not any(n.channel == channel and n.payload == token for n in conn.notifies):
                left = deadline - time.monotonic()
                if left <= 0:
                    status.health[label] = f"{where}: receives NO notifications"
                    status.warnings.append(f"the listener's connection to {where} {DEAF}")
                    return
                select.select([conn], [], [], left)
                conn.poll()
            status.health[label] = f"{where}: receives notifications"
        except psycopg2.Error as exc:
            status.health[label] = f"{where}: {reason(exc)}"
        finally:
            conn.close()

    def prune(self, retention: float) -> None:
        self._once(
            "DELETE FROM {claims} WHERE state = 'done' "
            "AND claimed_at < now() - make_interval(secs => %(age)s)",
            {"age": retention},
            rare=True,
        )
        # Old rows that no once receiver still has to claim and no claim
        # still needs (failed ones are kept for inspection).
        self._once(
            "DELETE FROM {journal} AS j WHERE created_at < now() - make_interval(secs => %(age)s) "
            "AND NOT EXISTS (SELECT 1 FROM {receivers} AS r WHERE (j.xid, j.id) > (r.xid, r.id)) "
            "AND NOT EXISTS (SELECT 1 FROM {claims} AS c "
            "  WHERE c.event_id = j.id AND c.state <> 'done')",
            {"age": retention},
            rare=True,
        )

    # -- messages ----------------------------------------------------------

    def notify(self, connection: Any, channel: str, payload: str, durable: bool = False) -> None:
        params: dict[str, Any] = {"channel": CHANNEL}
        if durable:
            # Journaled like a durable row event; listeners read it back.
            statement = (
                "WITH ins AS (INSERT INTO {} (body) VALUES (%(payload)s) RETURNING id, xid) "
                "SELECT pg_notify(%(channel)s, '{{\"v\": 1, \"J\": [' || id || ', ' || id "
                "|| '], \"x\": ' || xid || '}}') FROM ins"
            ).format(ident(self.schema, "dbnotify_journal"))
            params["payload"] = payload
        else:
            size = len(payload.encode())
            if size > MAX_MESSAGE_BYTES:
                raise ValueError(
                    f"the message is {size} bytes as JSON; listeners take at most "
                    f"{MAX_MESSAGE_BYTES}: send it with durable=True, or send less"
                )
            # Pieces are sent in order within one statement; each is unique
            # (PostgreSQL folds equal notifications of a transaction).
            statement = (
                "SELECT pg_notify(%(channel)s, p) "
                "FROM unnest(%(pieces)s::text[]) WITH ORDINALITY AS t(p, o) ORDER BY o"
            )
            params["pieces"] = _payload.pieces(payload, NOTIFY_LIMIT, PIECE_BYTES)
        if connection is None:
            try:
                with self._connect() as conn, conn.begin():
                    conn.exec_driver_sql(statement, params)
            except sa.exc.DBAPIError as exc:
                raise DBNotifyError(f"notify() failed: {reason(exc)}") from exc
            return
        execute_on(connection, statement, params)

    def open_stream(self, settings: Any) -> Stream:
        stream = PostgreSQLStream(self, settings)
        # What had committed once we listen is not ours to replay: the
        # listener's session says, in the query that ran LISTEN.
        snapshot = stream.snapshot
        try:
            # Which database the application's URL leads to, as the server
            # says (asked only where the URLs differ: no second connection).
            identity = stream.identity
            if self.listen_uri != self.uri:
                try:
                    with self._connect(rare=True) as conn:
                        identity = tuple(conn.exec_driver_sql("SELECT " + _IDENTITY).one())
                except sa.exc.SQLAlchemyError as exc:
                    raise DBNotifyError(f"cannot query {self.where}: {reason(exc)}") from exc
            if tuple(identity) != stream.identity:
                raise DBNotifyError(
                    f"cannot listen at {self.listen_where}: it leads to "
                    f"{_identity_text(stream.identity)}, but DBNOTIFY_DATABASE_URI "
                    f"({self.where}) to {_identity_text(identity)}; point "
                    "DBNOTIFY_LISTEN_URI at the same database as DBNOTIFY_DATABASE_URI"
                )
        except BaseException:
            stream.close()
            raise
        self._pieces = _new_pieces()
        if self._cursor is None:
            self.started(snapshot)
        self._bound = stream.listening_from
        return stream

    def close(self) -> None:
        super().close()
        self.rare.dispose()

    def _checked_in(self, *args: Any) -> None:
        self._returned = time.monotonic()

    def release_idle(self, idle: float) -> None:
        pool = self.engine.pool
        if not isinstance(pool, sa.pool.QueuePool) or not pool.checkedin():
            return
        if time.monotonic() - self._returned < idle or not self._pool_lock.acquire(False):
            return
        try:
            # No checkout can start meanwhile: none is left in the old pool
            # when the engine gets a new, empty one (with the same hooks).
            if not self._checkouts and not pool.checkedout():
                self.engine.dispose()
        finally:
            self._pool_lock.release()

    def send_check(self, channel: str, token: str) -> None:
        self._once("SELECT pg_notify(%(c)s, %(t)s)", {"c": channel, "t": token}, rare=True)

    def decode(self, raw: Any) -> list[Item]:
        pid, text = raw
        if text[:1] == "~":
            whole, gone = self._pieces.add(pid, text)
        else:
            whole, gone = text, self._pieces.interrupt()
        lost: list[Item] = []
        if gone:
            _skipped.warning(
                "skipped %d long message(s) on %r: a piece missing, or over the limit",
                gone,
                CHANNEL,
            )
            lost.append(Lost(gone))
        if whole is None:
            return lost
        try:
            return lost + _payload.decode(whole, read_journal=self._read_journal)
        except _payload.PayloadError as exc:
            _skipped.warning("skipped a notification on %r: %s", CHANNEL, exc)
            return lost

    def replaying(self) -> bool:
        # Journal ids delivered live are remembered until a catch-up passes
        # them; catching up is what bounds that memory.
        return bool(self._seen)

    def _query(self, statement: str, params: Any) -> list[Any]:
        try:
            with self._connect() as conn:
                return list(conn.exec_driver_sql(statement, params).all())
        except (sa.exc.SQLAlchemyError, DBNotifyError) as exc:
            raise _payload.PayloadError(f"cannot read the journal: {reason(exc)}") from exc

    def _read_journal(self, lo: int, hi: int, xid: int) -> list[tuple[int, str]]:
        """Journal rows ``lo..hi`` of transaction ``xid`` not delivered yet.
        Anyone may send a notification, so one naming rows delivered
        before (a replay) or rows of another transaction reads nothing."""
        if not (isinstance(lo, int) and isinstance(hi, int) and isinstance(xid, int)):
            raise _payload.PayloadError("a journal reference that is not numbers")
        cursor = self._cursor
        if cursor is not None and (xid, hi) <= cursor or self._committed_before(xid):
            return []  # Replayed already by catch_up(), or before our time.
        rows = self._query(
            "SELECT id, body FROM {} WHERE id BETWEEN %(lo)s AND %(hi)s "
            "AND xid = %(x)s::text::xid8 ORDER BY id".format(
                ident(self.schema, "dbnotify_journal")
            ),
            {"lo": lo, "hi": hi, "x": str(xid)},
        )
        fresh = [
            (row_id, body)
            for row_id, body in rows
            if row_id not in self._seen and (cursor is None or (xid, row_id) > cursor)
        ]
        for row_id, _ in fresh:
            self._seen[row_id] = xid
        return fresh

    def started(self, snapshot: str) -> None:
        """Called with the listener's first snapshot, taken right after
        LISTEN: what had committed by then is not ours to replay."""
        if self._cursor is not None:
            return
        xmin, xmax, xip = snapshot.split(":")
        self._cursor = (int(xmin), 0)
        self._before = (int(xmax), {int(x) for x in xip.split(",") if x})

    def catch_up(self) -> list[Item]:
        """Replay journal rows past the cursor that no notification brought.

        Rows are read in (transaction id, id) order and only from
        transactions older than every one still running, so a transaction
        that commits later can never land behind the cursor; rows of
        transactions that had committed before the first LISTEN are skipped."""
        if self._cursor is None:
            return []
        journal = ident(self.schema, "dbnotify_journal")
        items: list[Item] = []
        bound = self._bound
        while True:
            rows = self._query(
                f"SELECT xid::text AS xid_text, id, body FROM {journal} "
                "WHERE (xid, id) > (%(x)s::xid8, %(id)s) "
                "AND xid < pg_snapshot_xmin(pg_current_snapshot()) "
                "AND (%(bound)s::xid8 IS NULL OR xid < %(bound)s::xid8) "
                "ORDER BY xid, id LIMIT %(n)s",
                {
                    "x": str(self._cursor[0]),
                    "id": self._cursor[1],
                    "bound": None if bound is None else str(bound),
                    "n": _CATCH_UP_BATCH,
                },
            )
            for xid_text, row_id, body in rows:
                xid = int(xid_text)
                if self._seen.pop(row_id, None) is None and not self._committed_before(xid):
                    try:
                        items += _payload.decode(body, row_id)
                    except _payload.PayloadError as exc:
                        log.warning("skipped journal row %s: %s", row_id, exc)
                self._cursor = (xid, row_id)
            if len(rows) < _CATCH_UP_BATCH:
                break
        # Anything seen below the cursor was journaled and is accounted for.
        floor = self._cursor[0]
        self._seen = {k: v for k, v in self._seen.items() if v >= floor}
        if self._before is not None and floor >= self._before[0]:
            self._before = None
        # Right after a connect, only what had ended when LISTEN took
        # effect; the rest comes as notifications (or at the next catch-up).
        self._bound = None
        return items

    def _committed_before(self, xid: int) -> bool:
        if self._before is None:
            return False
        xmax, running = self._before
        return xid < xmax and xid not in running

    def count(self, raw: Any) -> int:
        return _payload.count(raw[1])

    # -- exactly-once receivers ------------------------------------------------

    def _once(self, statement: str, params: dict[str, Any], rare: bool = False) -> list[Any]:
        """Run one statement of ours, in its own transaction (on a
        connection of its own, closed after, if ``rare``)."""
        names = {n: ident(self.schema, f"dbnotify_{n}") for n in ("journal", "receivers", "claims")}
        try:
            with self._connect(rare) as conn, conn.begin():
                result = conn.exec_driver_sql(statement.format(**names), params)
                return list(result.all()) if result.returns_rows else []
        except sa.exc.SQLAlchemyError as exc:
            raise DBNotifyError(f"the database refused: {reason(exc)}") from exc

    def journal(self, since: int, limit: int) -> tuple[list[Item], int | None]:
        rows = self._once(
            "SELECT id, body FROM {journal} WHERE id >= %(since)s ORDER BY id LIMIT %(n)s",
            {"since": since, "n": limit},
        )
        items: list[Item] = []
        for row_id, body in rows:
            try:
                items += _payload.decode(body, row_id)
            except _payload.PayloadError as exc:
                log.warning("skipped journal row %s: %s", row_id, exc)
        return items, (rows[-1][0] if rows else None)

    def once_register(self, receivers: Sequence[str]) -> None:
        self._once(
            "INSERT INTO {receivers} (receiver, xid, id) "
            "SELECT r, pg_snapshot_xmin(pg_current_snapshot()), 0 "
            "FROM unnest(%(r)s::text[]) AS r ON CONFLICT DO NOTHING",
            {"r": list(receivers)},
        )

    def _journal_event(self, row_id: int, body: str | None) -> ChangeEvent | None:
        if body is None:
            return None
        try:
            items = _payload.decode(body, row_id)
        except _payload.PayloadError as exc:
            log.warning("skipped journal row %s: %s", row_id, exc)
            return None
        return items[0] if items and isinstance(items[0], ChangeEvent) else None

    def once_scan(
        self, receiver: str, watches: Sequence[str], limit: int
    ) -> tuple[list[ChangeEvent], Any]:
        # Only transactions older than every running one: a later commit
        # can never land behind the watermark.
        rows = self._once(
            "WITH s AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) "
            "SELECT j.xid::text, j.id, j.body, s.xmin::text FROM s "
            "CROSS JOIN {receivers} AS r "
            "LEFT JOIN LATERAL (SELECT xid, id, body FROM {journal} "
            "  WHERE (xid, id) > (r.xid, r.id) AND xid < s.xmin AND watch = ANY(%(w)s) "
            "  ORDER BY xid, id LIMIT %(n)s) AS j ON true "
            "WHERE r.receiver = %(r)s",
            {"r": receiver, "w": list(watches), "n": limit},
        )
        found = [(row_id, body) for _, row_id, body, _ in rows if row_id is not None]
        if not rows:
            return [], None
        events = [e for e in (self._journal_event(i, b) for i, b in found) if e is not None]
        if len(found) == limit:
            cursor = (int(rows[-1][0]), rows[-1][1])
        else:
            # Everything of these watches below xmin is in hand.
            cursor = (int(rows[-1][3]), 0)
        return events, cursor

    def once_claim(self, receiver: str, ids: Sequence[int], worker: str) -> set[int]:
        if not ids:
            return set()
        rows = self._once(
            "INSERT INTO {claims} (receiver, event_id, claimed_by) "
            "SELECT %(r)s, unnest(%(ids)s::bigint[]), %(w)s "
            "ON CONFLICT DO NOTHING RETURNING event_id",
            {"r": receiver, "ids": list(ids), "w": worker},
        )
        return {row[0] for row in rows}

    def once_advance(self, receiver: str, cursor: Any) -> None:
        if cursor is None:
            return
        self._once(
            "UPDATE {receivers} SET xid = %(x)s::text::xid8, id = %(id)s "
            "WHERE receiver = %(r)s AND (xid, id) < (%(x)s::text::xid8, %(id)s)",
            {"r": receiver, "x": str(cursor[0]), "id": cursor[1]},
        )

    def once_finish(
        self, receiver: str, event_id: int, error: str | None, retry_in: float | None
    ) -> None:
        state = "done" if error is None else ("retry" if retry_in is not None else "failed")
        self._once(
            "UPDATE {claims} SET state = %(s)s, last_error = %(e)s, claimed_by = NULL, "
            "next_attempt_at = now() + make_interval(secs => %(d)s) "
            "WHERE receiver = %(r)s AND event_id = %(id)s",
            {"s": state, "e": error, "d": retry_in or 0, "r": receiver, "id": event_id},
        )

    def once_release(self, receiver: str, ids: Sequence[int]) -> None:
        if ids:
            self._once(
                "UPDATE {claims} SET state = 'retry', attempts = attempts - 1, "
                "claimed_by = NULL, next_attempt_at = now() "
                "WHERE receiver = %(r)s AND event_id = ANY(%(ids)s) AND state = 'running'",
                {"r": receiver, "ids": list(ids)},
            )

    def once_reset(self, receiver: str, event_id: int, worker: str) -> None:
        self._once(
            "INSERT INTO {claims} (receiver, event_id, claimed_by) VALUES (%(r)s, %(id)s, %(w)s) "
            "ON CONFLICT (receiver, event_id) DO UPDATE SET state = 'running', attempts = 1, "
            "claimed_by = excluded.claimed_by, claimed_at = now(), last_error = NULL",
            {"r": receiver, "id": event_id, "w": worker},
        )

    def once_forget(self, receiver: str) -> None:
        self._once("DELETE FROM {claims} WHERE receiver = %(r)s", {"r": receiver})
        self._once("DELETE FROM {receivers} WHERE receiver = %(r)s", {"r": receiver})

    def once_due(
        self, receiver: str, worker: str, lease: float, limit: int
    ) -> list[tuple[int, int, ChangeEvent | None]]:
        rows = self._once(
            "UPDATE {claims} AS c SET state = 'running', attempts = c.attempts + 1, "
            "claimed_by = %(w)s, claimed_at = now() "
            "FROM (SELECT receiver, event_id FROM {claims} WHERE receiver = %(r)s AND ("
            "  (state = 'retry' AND next_attempt_at <= now()) OR "
            "  (state = 'running' AND claimed_at < now() - make_interval(secs => %(l)s))) "
            "  ORDER BY event_id LIMIT %(n)s FOR UPDATE SKIP LOCKED) AS d "
            "WHERE c.receiver = d.receiver AND c.event_id = d.event_id "
            "RETURNING c.event_id, c.attempts, "
            "(SELECT body FROM {journal} AS j WHERE j.id = c.event_id)",
            {"w": worker, "r": receiver, "l": lease, "n": limit},
        )
        return sorted((row[0], row[1], self._journal_event(row[0], row[2])) for row in rows)

    def after_fork(self) -> None:
        super().after_fork()
        self._cursor, self._seen, self._before, self._bound = None, {}, None, None
        self._pieces = _new_pieces()


def _new_pieces() -> _payload.Pieces:
    return _payload.Pieces(MAX_MESSAGE_BYTES)


# What libpq says when no server answers at the address.
_UNREACHABLE = (
    "Connection refused",
    "No such file or directory",
    "could not translate host name",
    "server closed the connection",
    "timeout expired",
    "no answer from the server",
    "No route to host",
    "Network is unreachable",
)


def cannot_connect(where: str, exc: BaseException) -> DBNotifyError:
    """The error for a connection that failed, naming where and what to do."""
    why = reason(exc)
    if why.startswith("database ") and why.endswith(" does not exist"):
        todo = "create the database, or fix the database name in the URL"
    elif (
        why.startswith("role ")
        and why.endswith(" does not exist")
        or any(s in why for s in ("password", "pg_hba.conf", "authentication failed"))
    ):
        todo = "check the user and password in the URL, and the server's pg_hba.conf"
    elif "too many connections" in why or "remaining connection slots" in why:
        todo = "the server has no connection free: close idle ones, or raise its limits"
    elif any(s in why for s in _UNREACHABLE):
        todo = "is the server running there? Check the host and port in the URL"
    else:
        todo = "check the URL and the server"
    return DBNotifyError(f"cannot connect to {where}: {why}; {todo}")


def _autocommit(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.autocommit = True


def _identity_text(identity: Sequence[Any]) -> str:
    database, started = identity
    return f"database {database!r} of the server started at {started:%Y-%m-%d %H:%M:%S.%f%z}"


def _connect_kwargs(url: sa.URL) -> dict[str, Any]:
    kwargs: dict[str, Any] = url.translate_connect_args(username="user", database="dbname")
    for key, value in url.query.items():
        kwargs[key] = value if isinstance(value, str) else value[-1]
    return kwargs


# -- the stream ----------------------------------------------------------------


class PostgreSQLStream(Stream):
    """A dedicated connection that LISTENs and runs nothing else but a
    liveness probe.

    It is an asynchronous psycopg2 connection (always autocommit), so every
    query waits in ``select()`` with a deadline: a peer that stops answering
    without closing (a stalled proxy or load balancer) is noticed by the
    probe's timeout, not only by TCP keepalives.

    With our channel it listens on a channel of its own, where the listener
    sends itself hearing checks from another session: a connection that
    answers queries can still receive nothing (a pooler in transaction or
    statement mode hands the LISTENing server session to other clients).
    """

    def __init__(self, backend: PostgreSQLBackend, settings: Any) -> None:
        self.schema = backend.schema
        self.timeout = settings.connect_timeout
        kwargs = {
            "application_name": LISTENER_NAME,
            "connect_timeout": max(1, int(settings.connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": settings.keepalive_idle,
            "keepalives_interval": max(1, settings.keepalive_idle // 3),
            "keepalives_count": 3,
            # Abort sends that go unacknowledged (a vanished peer).
            "tcp_user_timeout": int(settings.keepalive_idle * 2000),
            **backend.connect_kwargs,
            # Pieces of long messages are cut at UTF-8 character boundaries.
            "client_encoding": "UTF8",
        }
        #: Hearing checks come on a channel of this connection's own, so
        #: no other process handles them (the server still signals every
        #: listening session), and they never reach decode().
        self.check_channel = f"{CHANNEL}_check_{secrets.token_hex(8)}"
        self._expected: str | None = None
        self._arrived = False
        try:
            self.conn = psycopg2.connect(**kwargs, async_=True)
        except psycopg2.Error as exc:
            raise cannot_connect(backend.listen_where, exc) from exc
        try:
            try:
                self._wait("connecting")
            except psycopg2.Error as exc:
                raise cannot_connect(backend.listen_where, exc) from exc
            self.cur = self.conn.cursor()
            try:
                # One query, so one server session even through a pooler;
                # the result is the last statement's.
                # The snapshot is taken before LISTEN is in effect (at the
                # COMMIT), the bound after: kept in a setting of this session
                # across the COMMIT, as only the last result comes back.
                self._run(
                    sql.SQL(
                        "LISTEN {}; LISTEN {}; "
                        "SELECT set_config('dbnotify.listen_snapshot', "
                        "pg_current_snapshot()::text, false); COMMIT; "
                        "SELECT current_setting('dbnotify.listen_snapshot'), "
                        "pg_snapshot_xmin(pg_current_snapshot())::text, " + _IDENTITY
                    ).format(sql.Identifier(CHANNEL), sql.Identifier(self.check_channel))
                )
                snapshot, bound, *identity = self.cur.fetchone()
                #: Every transaction older than this had ended by the time
                #: LISTEN was in effect; a younger one may notify us.
                self.listening_from = int(bound)
                #: What had committed when LISTEN took effect.
                self.snapshot: str = snapshot
                #: Which database of which server this session is in.
                self.identity: tuple[Any, ...] = tuple(identity)
            except psycopg2.Error as exc:
                where = backend.listen_where
                raise DBNotifyError(f"cannot LISTEN at {where}: {reason(exc)}") from exc
        except BaseException:
            self.conn.close()
            raise

    def _wait(self, what: str) -> None:
        """Drive the connection until its current operation is done."""
        deadline = time.monotonic() + self.timeout
        while True:
            state = self.conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise psycopg2.OperationalError(
                    f"no answer from the server within {self.timeout:g}s while {what}"
                )
            if state == psycopg2.extensions.POLL_READ:
                select.select([self.conn], [], [], left)
            else:
                select.select([], [self.conn], [], left)

    def _run(self, statement: Any, params: Any = None) -> None:
        self.cur.execute(statement, params)
        self._wait("running a query")

    def fileno(self) -> int:
        return self.conn.fileno()  # type: ignore[no-any-return]

    def wait(self, timeout: float, wake_fd: int) -> None:
        if self.conn.notifies:
            return
        select.select([self.conn, wake_fd], [], [], timeout)

    def read(self) -> list[Any]:
        self.conn.poll()
        notes = self.conn.notifies
        if not notes:
            return []
        self.conn.notifies = []
        raw = [(note.pid, note.payload) for note in notes if note.channel == CHANNEL]
        if len(raw) != len(notes):
            # Anyone may send to the check channel; only the token we wait
            # for counts, so a forger can at worst make a check pass.
            expected = self._expected
            for note in notes:
                if note.channel == self.check_channel and note.payload == expected:
                    self._arrived = True
        return raw

    def expect(self, token: str | None) -> None:
        self._expected, self._arrived = token, False

    def heard(self) -> bool:
        return self._arrived

    def probe(self) -> None:
        self._run("SELECT 1")
        self.cur.fetchall()

    def close(self) -> None:
        self.conn.close()

    def discard(self) -> None:
        # The socket is shared with the parent: closing it would send a
        # Terminate message and end the parent's session. Point the fd at
        # /dev/null first, so whatever psycopg2 sends on free goes nowhere.
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(devnull, self.conn.fileno())
            finally:
                os.close(devnull)
        except (OSError, psycopg2.Error):
            pass
        try:
            self.conn.close()
        except psycopg2.Error:
            pass
