"""PostgreSQL: statement-level triggers that NOTIFY, and a LISTENing socket.

Each watched operation gets one ``AFTER ... FOR EACH STATEMENT`` trigger with
a transition table. Its function turns the statement's rows into JSON, packs
them into notifications under PostgreSQL's 8000-byte payload limit, and
stores any row too large to fit in ``dbnotify_payload`` (the notification
then carries its id), so a write never fails because of its size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import select
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import sqlalchemy as sa
from psycopg2 import sql

from .. import _payload
from .._watch import Watch
from ..errors import DBNotifyError, WatchError
from ..events import ChangeEvent, Operation
from . import Backend, Item, Status, Stream, execute_on

log = logging.getLogger(__name__)

CHANNEL = "dbnotify"
#: application_name of listener sessions, as pg_stat_activity shows them.
LISTENER_NAME = "flask-dbnotify listener"
#: Bumped whenever the generated SQL changes shape; part of every hash.
DDL_VERSION = 5
#: PostgreSQL rejects a NOTIFY payload of 8000 bytes or more.
NOTIFY_LIMIT = 8000
_OP_CODE = {Operation.INSERT: "i", Operation.UPDATE: "u", Operation.DELETE: "d"}
_TRANSITIONS = {
    Operation.INSERT: "REFERENCING NEW TABLE AS dbnotify_new",
    Operation.UPDATE: "REFERENCING OLD TABLE AS dbnotify_old NEW TABLE AS dbnotify_new",
    Operation.DELETE: "REFERENCING OLD TABLE AS dbnotify_old",
}
_CATCH_UP_BATCH = 5000
_LOCK_KEY = 0x64626E74  # "dbnt": serialises concurrent installs


@dataclass(frozen=True)
class Resolved:
    """A watch matched against the catalog."""

    watch: Watch
    oid: int
    schema: str
    table: str
    columns: tuple[str, ...]
    pk: tuple[str, ...]


@dataclass(frozen=True)
class Installed:
    trigger: str
    table_oid: int
    schema: str
    table: str
    function_schema: str
    function: str


# -- catalog ----------------------------------------------------------------

_FIND_TABLE = """
SELECT c.oid, n.nspname, c.relname
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = %(table)s AND c.relkind IN ('r', 'p')
  AND CASE WHEN %(schema)s::text IS NULL THEN pg_catalog.pg_table_is_visible(c.oid)
           ELSE n.nspname = %(schema)s END
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
_OUR_TRIGGERS = """
SELECT t.tgname, c.oid, n.nspname, c.relname, pn.nspname, p.proname
FROM pg_catalog.pg_trigger t
JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace
WHERE NOT t.tgisinternal AND left(t.tgname, 9) = 'dbnotify_'
ORDER BY n.nspname, c.relname, t.tgname
"""
_OUR_FUNCTIONS = """
SELECT p.proname FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = %s AND left(p.proname, 9) = 'dbnotify_'
"""
_SHARED_FUNCTIONS = ("dbnotify_spill",)


def _describe(watch: Watch) -> str:
    return f"{watch.schema}.{watch.table}" if watch.schema else watch.table


def resolve(cur: Any, watch: Watch) -> Resolved:
    """Match ``watch`` against the catalog; raise :class:`WatchError` if the
    table, a column or the primary key is missing."""
    cur.execute(_FIND_TABLE, {"table": watch.table, "schema": watch.schema})
    row = cur.fetchone()
    if row is None:
        where = f"schema {watch.schema!r}" if watch.schema else "the search_path"
        raise WatchError(f"table {_describe(watch)!r} does not exist (looked in {where})")
    oid, schema, table = row
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
    return Resolved(watch, oid, schema, table, columns, pk)


# -- DDL --------------------------------------------------------------------


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return slug[:36] or "t"


class _Builder:
    """Renders DDL for one schema of ours, with a cursor to quote against."""

    def __init__(self, cur: Any, schema: str) -> None:
        self.cur = cur
        self.schema = schema

    def render(self, composed: sql.Composable) -> str:
        return composed.as_string(self.cur)

    def ours(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    def shared(self) -> list[str]:
        statements = []
        self.cur.execute("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (self.schema,))
        if self.cur.fetchone() is None:
            # Only when missing: CREATE SCHEMA IF NOT EXISTS still demands
            # the CREATE right on the database.
            statements.append(
                self.render(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
            )
        # SECURITY DEFINER: any role that writes a watched table may need to
        # store a large row, without being granted rights on our table.
        spill = sql.SQL(
            "CREATE OR REPLACE FUNCTION {spill}(body text) RETURNS text "
            "LANGUAGE sql VOLATILE SECURITY DEFINER "
            "SET search_path = pg_catalog, pg_temp AS {body}"
        ).format(
            spill=self.ours("dbnotify_spill"),
            body=sql.Literal(
                self.render(
                    sql.SQL("INSERT INTO {t} (body) VALUES ($1) RETURNING id::text").format(
                        t=self.ours("dbnotify_payload")
                    )
                )
            ),
        )
        journal = [
            self.render(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    "id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
                    "xid xid8 NOT NULL DEFAULT pg_current_xact_id(), "
                    "created_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
                    "watch text, body text NOT NULL)"
                ).format(self.ours("dbnotify_journal"))
            ),
            # Exactly-once receivers: how far each has claimed, and claims.
            self.render(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (receiver text PRIMARY KEY, "
                    "xid xid8 NOT NULL, id bigint NOT NULL)"
                ).format(self.ours("dbnotify_receivers"))
            ),
            self.render(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    "receiver text NOT NULL, event_id bigint NOT NULL, "
                    "state text NOT NULL DEFAULT 'running', attempts int NOT NULL DEFAULT 1, "
                    "claimed_by text, claimed_at timestamptz NOT NULL DEFAULT now(), "
                    "next_attempt_at timestamptz, last_error text, "
                    "PRIMARY KEY (receiver, event_id))"
                ).format(self.ours("dbnotify_claims"))
            ),
            # Added before the first release; keeps earlier installs working.
            self.render(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS watch text").format(
                    self.ours("dbnotify_journal")
                )
            ),
            # Replay reads in transaction-id order past a cursor.
            self.render(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (xid, id)").format(
                    sql.Identifier("dbnotify_journal_xid"), self.ours("dbnotify_journal")
                )
            ),
            self.render(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (created_at)").format(
                    sql.Identifier("dbnotify_journal_created_at"), self.ours("dbnotify_journal")
                )
            ),
        ]
        return (
            statements
            + journal
            + [
                self.render(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} ("
                        "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                        "created_at timestamptz NOT NULL DEFAULT now(), "
                        "body text NOT NULL)"
                    ).format(self.ours("dbnotify_payload"))
                ),
                self.render(
                    sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (created_at)").format(
                        sql.Identifier("dbnotify_payload_created_at"),
                        self.ours("dbnotify_payload"),
                    )
                ),
                self.render(spill),
            ]
        )

    def row_json(self, r: Resolved, ref: sql.Composable) -> sql.Composable:
        """JSON text of the row ``ref`` (a composite value), limited to the
        carried columns. Columns are picked by name at run time, so dropping
        or renaming one never makes a write fail."""
        if r.watch.columns is None:
            return sql.SQL("row_to_json({})::text").format(ref)
        carried = [c for c in r.columns if c in r.watch.columns or c in r.pk]
        return sql.SQL(
            "(SELECT json_object_agg(e.key, e.value) FROM json_each(row_to_json({ref})) AS e "
            "WHERE e.key = ANY({carried}::text[]))::text"
        ).format(ref=ref, carried=sql.Literal(carried))

    def rows_query(self, r: Resolved, op: Operation) -> sql.Composable:
        """A query yielding ``(i, j)``: row order and the row's JSON."""
        # The whole-row alias must not be the name of one of the columns.
        alias = "dbnotify_row"
        while alias in r.columns:
            alias += "_"
        row = sql.Identifier(alias)
        if op is not Operation.UPDATE:
            table = "dbnotify_new" if op is Operation.INSERT else "dbnotify_old"
            return sql.SQL("SELECT row_number() OVER () AS i, {j} AS j FROM {t} AS {row}").format(
                j=self.row_json(r, row), t=sql.Identifier(table), row=row
            )
        # Transition tables hold old and new rows in the same order, so pair
        # them by position; joining on the key would lose rows whose key
        # changed. `*<>` compares binary images: it needs no `=` operator
        # for any column type, and filters UPDATEs that change nothing.
        new, old = sql.SQL("nn.r"), sql.SQL("oo.r")
        condition: sql.Composable = sql.SQL("nn.r *<> oo.r")
        if r.watch.when_changed:
            condition = sql.SQL(
                "{c} AND EXISTS (SELECT FROM unnest({cols}::text[]) AS w(k) "
                "WHERE to_jsonb(nn.r) -> w.k IS DISTINCT FROM to_jsonb(oo.r) -> w.k)"
            ).format(c=condition, cols=sql.Literal(list(r.watch.when_changed)))
        # With every column carried, the listener works out `changed` from
        # new and old; otherwise the trigger must.
        changed: sql.Composable = sql.SQL("")
        if r.watch.columns is not None:
            changed = sql.SQL(
                "|| ',' || (SELECT coalesce(json_agg(a.key), '[]') "
                "FROM json_each(row_to_json(nn.r)) AS a JOIN json_each(row_to_json(oo.r)) AS b "
                "USING (key) WHERE a.value::text IS DISTINCT FROM b.value::text)::text "
            )
        return sql.SQL(
            "SELECT nn.i, '[' || {jn} || ',' || {jo} {changed}|| ']' AS j "
            "FROM (SELECT row_number() OVER () AS i, {row} AS r FROM dbnotify_new AS {row}) AS nn "
            "JOIN (SELECT row_number() OVER () AS i, {row} AS r FROM dbnotify_old AS {row}) AS oo "
            "USING (i) WHERE {condition}"
        ).format(
            jn=self.row_json(r, new),
            jo=self.row_json(r, old),
            changed=changed,
            row=row,
            condition=condition,
        )

    def durable_body(self, r: Resolved, op: Operation, head: str) -> str:
        """Journal each row (one event per row) in the writer's transaction,
        then NOTIFY the range of journal ids, with the transaction id, so
        listeners read the rows from the journal."""
        body = sql.SQL(
            """
DECLARE
  head text := {head} || extract(epoch FROM clock_timestamp())::text || ',"r": [';
  x xid8 := pg_current_xact_id();
  lo bigint;
  hi bigint;
BEGIN
  WITH ins AS (
    INSERT INTO {journal} (xid, watch, body)
    SELECT x, {name}, head || j || ']}}' FROM ({rows}) AS r ORDER BY i
    RETURNING id)
  SELECT min(id), max(id) INTO lo, hi FROM ins;
  IF lo IS NOT NULL THEN
    PERFORM pg_notify({channel}, '{{"v": 1, "J": [' || lo || ', ' || hi || '], "x": ' || x || '}}');
  END IF;
  RETURN NULL;
END
"""
        ).format(
            head=sql.Literal(head),
            name=sql.Literal(r.watch.name),
            journal=self.ours("dbnotify_journal"),
            rows=self.rows_query(r, op),
            channel=sql.Literal(CHANNEL),
        )
        return self.render(body)

    def function_body(self, r: Resolved, op: Operation) -> str:
        # ": " rather than ":" keeps the DDL free of ":name" sequences, which
        # sqlalchemy.text() (Alembic's op.execute) would take for parameters.
        head = json.dumps(
            {"v": _payload.VERSION, "t": r.watch.name, "o": op.value[0], "k": list(r.pk)},
            ensure_ascii=False,
            separators=(",", ": "),
        )[:-1]
        head += ',"ts": '
        if r.watch.durable:
            return self.durable_body(r, op, head)
        # Rows are packed until a batch holds `budget` bytes; a row is at
        # most `budget` bytes inline (else stored), so a batch plus its
        # header stays under NOTIFY_LIMIT.
        budget = (NOTIFY_LIMIT - len(head.encode()) - 120) // 2
        if budget < 500:
            raise WatchError(f"names of {r.watch.name!r} are too long for a notification")
        body = sql.SQL(
            """
DECLARE
  head text := {head} || extract(epoch FROM clock_timestamp())::text || ',"s": ';
  batch text;
  rows_in bigint;
BEGIN
  SELECT count(*) INTO rows_in FROM {changed};
  IF rows_in = 0 THEN
    RETURN NULL;
  ELSIF rows_in = 1 THEN
    -- Most writes touch one row: skip the batching machinery.
    SELECT j INTO batch FROM ({rows}) AS r;
    IF batch IS NULL THEN
      RETURN NULL;
    ELSIF octet_length(batch) > {budget} THEN
      batch := {spill}(batch);
    END IF;
    PERFORM pg_notify({channel}, head || set_config('dbnotify.batch',
      (coalesce(nullif(current_setting('dbnotify.batch', true), ''), '0')::bigint + 1)::text,
      true) || ',"r": [' || batch || ']}}');
    RETURN NULL;
  END IF;
  FOR batch IN
    SELECT string_agg(CASE WHEN octet_length(j) > {budget} THEN {spill}(j) ELSE j END, ','
                      ORDER BY i)
    FROM (SELECT i, j, sum(CASE WHEN octet_length(j) > {budget} THEN 24
                                ELSE octet_length(j) + 1 END)
                       OVER (ORDER BY i ROWS UNBOUNDED PRECEDING) / {budget} AS b
          FROM ({rows}) AS r) AS r
    GROUP BY b ORDER BY b
  LOOP
    -- A counter local to the transaction keeps equal batches from being
    -- folded into one, and needs no privilege on any object.
    PERFORM pg_notify({channel}, head || set_config('dbnotify.batch',
      (coalesce(nullif(current_setting('dbnotify.batch', true), ''), '0')::bigint + 1)::text,
      true) || ',"r": [' || batch || ']}}');
  END LOOP;
  RETURN NULL;
END
"""
        ).format(
            head=sql.Literal(head),
            budget=sql.Literal(budget),
            spill=self.ours("dbnotify_spill"),
            rows=self.rows_query(r, op),
            channel=sql.Literal(CHANNEL),
            changed=sql.Identifier("dbnotify_old" if op is Operation.DELETE else "dbnotify_new"),
        )
        return self.render(body)

    def watch_objects(self, r: Resolved) -> dict[str, tuple[Operation, str]]:
        """Trigger name -> (operation, function body). The name carries a
        hash of everything the trigger does, so drift is visible."""
        bodies = {op: self.function_body(r, op) for op in r.watch.operations}
        digest = hashlib.sha256(
            json.dumps(
                [DDL_VERSION, self.schema, r.schema, r.table]
                + [[op.value, bodies[op]] for op in r.watch.operations]
            ).encode()
        ).hexdigest()[:10]
        slug = _slug(r.table)
        return {
            f"dbnotify_{slug}_{_OP_CODE[op]}_{digest}": (op, body) for op, body in bodies.items()
        }

    def create(self, r: Resolved, name: str, op: Operation, body: str) -> list[str]:
        table = sql.Identifier(r.schema, r.table)
        return [
            self.render(
                # SECURITY DEFINER: writers need no rights on our schema.
                sql.SQL(
                    "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql "
                    "SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {b}"
                ).format(f=self.ours(name), b=sql.Literal(body))
            ),
            self.render(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), table)
            ),
            self.render(
                sql.SQL(
                    "CREATE TRIGGER {t} AFTER {op} ON {table} {transitions} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION {f}()"
                ).format(
                    t=sql.Identifier(name),
                    op=sql.SQL(op.value),
                    table=table,
                    transitions=sql.SQL(_TRANSITIONS[op]),
                    f=self.ours(name),
                )
            ),
        ]

    def drop(self, obj: Installed) -> list[str]:
        return [
            self.render(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(obj.trigger), sql.Identifier(obj.schema, obj.table)
                )
            ),
            *self.drop_function(obj.function_schema, obj.function),
        ]

    def drop_function(self, schema: str, name: str) -> list[str]:
        return [
            self.render(
                sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(schema, name))
            )
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
        # Durable delivery: where replay resumes, and journal ids delivered
        # past it (id -> transaction id).
        self._cursor: tuple[int, int] | None = None
        self._seen: dict[int, int] = {}
        # (xmax, running xids) of the first snapshot: older transactions
        # not running then had committed before we listened.
        self._before: tuple[int, set[int]] | None = None

    @classmethod
    def from_url(cls, url: sa.URL, listen_uri: str | None, schema: str) -> PostgreSQLBackend:
        # Our own small engine for DDL and notify(); always psycopg2.
        engine = sa.create_engine(
            url.set(drivername="postgresql+psycopg2"),
            pool_size=2,
            max_overflow=4,
            pool_pre_ping=True,
        )
        listen_url = sa.make_url(listen_uri) if listen_uri else url
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

    def _cursor_do(self, work: Any, commit: bool = False) -> Any:
        """Run ``work(cursor)`` in one transaction on a raw DB-API cursor
        (no parameter parsing of our statements), rolled back unless
        ``commit``. Database errors become :class:`DBNotifyError`."""
        try:
            conn = self.engine.raw_connection()
            try:
                cur: Any = conn.cursor()
                try:
                    result = work(cur)
                finally:
                    cur.close()
                if commit:
                    conn.commit()
                return result
            finally:
                conn.rollback()
                conn.close()
        except (psycopg2.Error, sa.exc.DBAPIError) as exc:
            raise DBNotifyError(f"the database refused: {exc}".strip()) from exc

    def execute_all(self, statements: Sequence[str]) -> None:
        def work(cur: Any) -> None:
            for statement in statements:
                cur.execute(statement)

        self._cursor_do(work, commit=True)

    def _installed(self, cur: Any) -> list[Installed]:
        cur.execute(_OUR_TRIGGERS)
        return [Installed(*row) for row in cur.fetchall()]

    def _resolve_all(self, cur: Any, watches: Sequence[Watch]) -> list[Resolved]:
        resolved = [resolve(cur, w) for w in watches]
        seen: dict[int, str] = {}
        for r in resolved:
            if r.oid in seen:
                raise WatchError(
                    f"{seen[r.oid]!r} and {r.watch.name!r} are the same table: watch it once"
                )
            seen[r.oid] = r.watch.name
        return resolved

    def _install_sql(self, cur: Any, watches: Sequence[Watch]) -> list[str]:
        b = _Builder(cur, self.schema)
        statements = b.shared()
        installed = self._installed(cur)
        created: set[str] = set()
        for r in self._resolve_all(cur, watches):
            wanted = b.watch_objects(r)
            for obj in installed:
                if obj.table_oid == r.oid and obj.trigger not in wanted:
                    statements += b.drop(obj)
            for name, (op, body) in wanted.items():
                statements += b.create(r, name, op, body)
            created |= set(wanted)
        # Trigger functions whose table was dropped are of no use to anyone.
        for name in self._unused_functions(cur, installed, created):
            statements += b.drop_function(self.schema, name)
        return statements

    def _unused_functions(self, cur: Any, installed: list[Installed], keep: set[str]) -> list[str]:
        in_use = {o.function for o in installed if o.function_schema == self.schema} | keep
        cur.execute(_OUR_FUNCTIONS, (self.schema,))
        return [
            name
            for (name,) in cur.fetchall()
            if name not in in_use and name not in _SHARED_FUNCTIONS
        ]

    def install_sql(self, watches: Sequence[Watch]) -> list[str]:
        return self._cursor_do(lambda cur: self._install_sql(cur, watches))  # type: ignore[no-any-return]

    def install(self, watches: Sequence[Watch]) -> None:
        def work(cur: Any) -> None:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            for statement in self._install_sql(cur, watches):
                cur.execute(statement)

        self._cursor_do(work, commit=True)

    def uninstall_sql(self, watches: Sequence[Watch], everything: bool) -> list[str]:
        def work(cur: Any) -> list[str]:
            b = _Builder(cur, self.schema)
            installed = self._installed(cur)
            if everything:
                statements: list[str] = []
                for obj in installed:
                    statements += b.drop(obj)
                for name in self._unused_functions(cur, installed, set()):
                    statements += b.drop_function(self.schema, name)
                for kind, name, args in (
                    ("FUNCTION", "dbnotify_spill", "(text)"),
                    ("TABLE", "dbnotify_payload", ""),
                    ("TABLE", "dbnotify_journal", ""),
                    ("TABLE", "dbnotify_receivers", ""),
                    ("TABLE", "dbnotify_claims", ""),
                ):
                    statements.append(f"DROP {kind} IF EXISTS {_quoted(self.schema, name)}{args}")
                return statements
            oids = {r.oid for r in self._resolve_all(cur, watches)}
            statements = []
            for obj in installed:
                if obj.table_oid in oids:
                    statements += b.drop(obj)
            return statements

        return self._cursor_do(work)  # type: ignore[no-any-return]

    def status(self, watches: Sequence[Watch], health: bool = True) -> Status:
        def work(cur: Any) -> Status:
            b = _Builder(cur, self.schema)
            status = Status()
            installed = self._installed(cur)
            covered: set[int] = set()
            expected_functions: set[str] = set()
            for watch in watches:
                try:
                    r = resolve(cur, watch)
                    wanted = set(b.watch_objects(r))
                except WatchError as exc:
                    status.error(watch.name, exc)
                    continue
                covered.add(r.oid)
                expected_functions |= wanted
                status.compare(
                    watch.name, {o.trigger for o in installed if o.table_oid == r.oid}, wanted
                )
            for obj in installed:
                if obj.table_oid not in covered:
                    status.orphaned.append(f"trigger {obj.trigger} on {obj.schema}.{obj.table}")
            for name in self._unused_functions(cur, installed, expected_functions):
                status.orphaned.append(f"function {self.schema}.{name}()")
            if health:
                self._health(cur, status)
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
        cur.execute("SELECT to_regclass(%s)", (_quoted(self.schema, "dbnotify_payload"),))
        if cur.fetchone()[0] is not None:
            cur.execute(
                "SELECT count(*), min(created_at) FROM {}".format(
                    _quoted(self.schema, "dbnotify_payload")
                )
            )
            count, oldest = cur.fetchone()
            health["stored payloads"] = str(count) + (
                f", oldest {oldest:%Y-%m-%d %H:%M:%S%z}" if oldest else ""
            )
        cur.execute("SELECT to_regclass(%s)", (_quoted(self.schema, "dbnotify_claims"),))
        if cur.fetchone()[0] is None:
            return
        journal = _quoted(self.schema, "dbnotify_journal")
        cur.execute(f"SELECT count(*), min(id), max(id) FROM {journal}")
        count, first, last = cur.fetchone()
        health["journal"] = f"{count} rows" + (f", ids {first}..{last}" if count else "")

        def query(statement: str) -> list[Any]:
            cur.execute(statement)
            return cur.fetchall()  # type: ignore[no-any-return]

        status.once_health(
            query,
            _quoted(self.schema, "dbnotify_claims"),
            _quoted(self.schema, "dbnotify_receivers"),
        )

    def prune(self, retention: float) -> None:
        self._once(
            "DELETE FROM {payload} WHERE created_at < now() - make_interval(secs => %(age)s)",
            {"age": retention},
        )
        self._once(
            "DELETE FROM {claims} WHERE state = 'done' "
            "AND claimed_at < now() - make_interval(secs => %(age)s)",
            {"age": retention},
        )
        # Old rows that no once receiver still has to claim and no claim
        # still needs (failed ones are kept for inspection).
        self._once(
            "DELETE FROM {journal} AS j WHERE created_at < now() - make_interval(secs => %(age)s) "
            "AND NOT EXISTS (SELECT 1 FROM {receivers} AS r WHERE (j.xid, j.id) > (r.xid, r.id)) "
            "AND NOT EXISTS (SELECT 1 FROM {claims} AS c "
            "  WHERE c.event_id = j.id AND c.state <> 'done')",
            {"age": retention},
        )

    # -- messages ----------------------------------------------------------

    def notify(self, connection: Any, channel: str, payload: str, durable: bool = False) -> None:
        if durable:
            # Journaled like a durable row event; listeners read it back.
            statement = (
                "WITH ins AS (INSERT INTO {} (body) VALUES (%(payload)s) RETURNING id, xid) "
                "SELECT pg_notify(%(channel)s, '{{\"v\": 1, \"J\": [' || id || ', ' || id "
                "|| '], \"x\": ' || xid || '}}') FROM ins"
            ).format(_quoted(self.schema, "dbnotify_journal"))
        elif len(payload.encode()) < NOTIFY_LIMIT:
            statement = "SELECT pg_notify(%(channel)s, %(payload)s)"
        else:
            statement = (
                'SELECT pg_notify(%(channel)s, \'{"v":1,"ref":\' || '
                + _quoted(self.schema, "dbnotify_spill")
                + "(%(payload)s) || '}')"
            )
        params = {"channel": CHANNEL, "payload": payload}
        if connection is None:
            try:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(statement, params)
            except sa.exc.DBAPIError as exc:
                raise DBNotifyError(f"notify() failed: {exc.orig}") from exc
            return
        execute_on(connection, statement, params)

    def open_stream(self, settings: Any) -> Stream:
        stream = PostgreSQLStream(self, settings)
        if self._cursor is None:
            # What had committed once we listen is not ours to replay. Read
            # on a pooled connection: the listener's runs LISTEN only.
            try:
                ((snapshot,),) = self._query("SELECT pg_current_snapshot()::text", {})
            except BaseException:
                stream.close()
                raise
            self.started(snapshot)
        return stream

    def decode(self, raw: Any) -> list[Item]:
        try:
            return _payload.decode(raw, self._fetch, read_journal=self._read_journal)
        except _payload.PayloadError as exc:
            log.warning("skipped a notification on %r: %s", CHANNEL, exc)
            return []

    def _query(self, statement: str, params: Any) -> list[Any]:
        try:
            with self.engine.connect() as conn:
                return list(conn.exec_driver_sql(statement, params).all())
        except sa.exc.SQLAlchemyError as exc:
            raise _payload.PayloadError(f"cannot read the journal: {exc}") from exc

    def _read_journal(self, lo: int, hi: int, xid: int) -> list[tuple[int, str]]:
        cursor = self._cursor
        if cursor is not None and (xid, hi) <= cursor:
            return []  # Replayed already by catch_up().
        rows = self._query(
            "SELECT id, body FROM {} WHERE id BETWEEN %(lo)s AND %(hi)s "
            "AND xid = %(x)s::text::xid8 ORDER BY id".format(
                _quoted(self.schema, "dbnotify_journal")
            ),
            {"lo": lo, "hi": hi, "x": str(xid)},
        )
        if cursor is not None:
            rows = [row for row in rows if (xid, row[0]) > cursor]
        if self.tracking:
            for row_id, _ in rows:
                self._seen[row_id] = xid
        return [(row_id, body) for row_id, body in rows]

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
        journal = _quoted(self.schema, "dbnotify_journal")
        items: list[Item] = []
        while True:
            rows = self._query(
                f"SELECT xid::text AS xid_text, id, body FROM {journal} "
                "WHERE (xid, id) > (%(x)s::xid8, %(id)s) "
                "AND xid < pg_snapshot_xmin(pg_current_snapshot()) "
                "ORDER BY xid, id LIMIT %(n)s",
                {"x": str(self._cursor[0]), "id": self._cursor[1], "n": _CATCH_UP_BATCH},
            )
            for xid_text, row_id, body in rows:
                xid = int(xid_text)
                if self._seen.pop(row_id, None) is None and not self._committed_before(xid):
                    try:
                        items += _payload.decode(body, self._fetch, row_id)
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
        return items

    def _committed_before(self, xid: int) -> bool:
        if self._before is None:
            return False
        xmax, running = self._before
        return xid < xmax and xid not in running

    def count(self, raw: Any) -> int:
        return _payload.count(raw)

    # -- exactly-once receivers ------------------------------------------------

    def _once(self, statement: str, params: dict[str, Any]) -> list[Any]:
        """Run one statement of ours, in its own transaction."""
        names = {
            n: _quoted(self.schema, f"dbnotify_{n}")
            for n in ("journal", "receivers", "claims", "payload")
        }
        try:
            with self.engine.begin() as conn:
                result = conn.exec_driver_sql(statement.format(**names), params)
                return list(result.all()) if result.returns_rows else []
        except sa.exc.SQLAlchemyError as exc:
            raise DBNotifyError(f"the database refused: {exc}") from exc

    def journal(self, since: int, limit: int) -> tuple[list[Item], int | None]:
        rows = self._once(
            "SELECT id, body FROM {journal} WHERE id >= %(since)s ORDER BY id LIMIT %(n)s",
            {"since": since, "n": limit},
        )
        items: list[Item] = []
        for row_id, body in rows:
            try:
                items += _payload.decode(body, self._fetch, row_id)
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
            items = _payload.decode(body, self._fetch, row_id)
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
        self._cursor, self._seen, self._before = None, {}, None

    def _fetch(self, ids: Iterable[int]) -> dict[int, str]:
        """Stored payloads, read on a pooled connection (not the listener's,
        which belongs to the reader thread)."""
        try:
            with self.engine.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT id, body FROM {} WHERE id = ANY(%(ids)s)".format(
                        _quoted(self.schema, "dbnotify_payload")
                    ),
                    {"ids": list(ids)},
                ).all()
        except sa.exc.SQLAlchemyError as exc:
            raise _payload.PayloadError(f"cannot read stored payloads: {exc}") from exc
        return {row[0]: row[1] for row in rows}


def _quoted(schema: str, name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in (schema, name))


def _connect_kwargs(url: sa.URL) -> dict[str, Any]:
    kwargs: dict[str, Any] = url.translate_connect_args(username="user", database="dbname")
    for key, value in url.query.items():
        kwargs[key] = value if isinstance(value, str) else value[-1]
    return kwargs


# -- the stream ----------------------------------------------------------------


class PostgreSQLStream(Stream):
    """A dedicated connection that LISTENs and runs nothing else but a
    liveness probe and the read of stored payloads.

    It is an asynchronous psycopg2 connection (always autocommit), so every
    query waits in ``select()`` with a deadline: a peer that stops answering
    without closing (a stalled proxy or load balancer) is noticed by the
    probe's timeout, not only by TCP keepalives.
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
        }
        self.conn = psycopg2.connect(**kwargs, async_=True)
        try:
            self._wait("connecting")
            self.cur = self.conn.cursor()
            self._run(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
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
        return [note.payload for note in notes if note.channel == CHANNEL]

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
