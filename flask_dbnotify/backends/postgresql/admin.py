"""Install, uninstall and status: rare tasks, each on a connection of its
own. The statements come from :mod:`.ddl`; this module reads the catalog
and the database's health."""

from __future__ import annotations

import secrets
import select
import time
from collections.abc import Sequence
from typing import Any

import psycopg2

from ..._watch import Watch
from ..base import DEAF, Admin, Revision, Status
from ..common import Inspection, add_once_health, compare_watches, once_health_queries, reason
from .catalog import TABLE_NAMES, read_catalog, resolve, resolve_all
from .common import (
    CHECK_NAME,
    IDENTITY,
    INSTALL_LOCK,
    LISTENER_NAME,
    check_channel,
    ident,
    identity_text,
)
from .connection import Database, cannot_connect
from .ddl import (
    LEGACY_FUNCTION,
    LEGACY_TABLE,
    install_plan,
    uninstall_plan,
    unused,
    watch_functions,
)
from .revision import plan, why_foreign

#: How long ``status`` waits for its check notification to arrive.
STATUS_CHECK_WAIT = 3.0


class PostgreSQLAdmin(Admin):
    """Install, uninstall and status for one database and schema."""

    def __init__(self, db: Database, schema: str, listen_where: str, connect: dict[str, Any]):
        self.db = db
        self.schema = schema
        self.listen_where = listen_where
        #: psycopg2.connect() arguments for the listener's URL.
        self.connect = connect

    def _plan(self, cur: Any, watches: Sequence[Watch]) -> list[str]:
        catalog = read_catalog(cur, self.schema)
        return install_plan(catalog, resolve_all(cur, watches), self.schema)

    def install_sql(self, watches: Sequence[Watch]) -> list[str]:
        return self.db.cursor(lambda cur: self._plan(cur, watches))

    def install(self, watches: Sequence[Watch]) -> None:
        def work(cur: Any) -> None:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (INSTALL_LOCK,))
            for statement in self._plan(cur, watches):
                cur.execute(statement)

        self.db.cursor(work, transaction=True)

    def uninstall_sql(self, watches: Sequence[Watch], everything: bool) -> list[str]:
        def work(cur: Any) -> list[str]:
            catalog = read_catalog(cur, self.schema)
            resolved = None if everything else resolve_all(cur, watches)
            return uninstall_plan(catalog, resolved, self.schema)

        return self.db.cursor(work)

    def execute_all(self, statements: Sequence[str]) -> None:
        # As one query, which PostgreSQL runs in one (implicit) transaction
        # and a pooler in statement mode lets through. Each statement ends
        # on a line of its own, in case it ends in a comment.
        if statements:
            self.db.cursor(lambda cur: cur.execute("\n;\n".join(statements)))

    def revision(self, watches: Sequence[Watch]) -> Revision | None:
        # One transaction: one snapshot of the catalog.
        return self.db.cursor(lambda cur: plan(cur, watches, self.schema), transaction=True)

    def kept_tables(self) -> tuple[str | None, frozenset[str]]:
        return self.schema, TABLE_NAMES

    def foreign(self, connection: Any) -> str | None:
        def identity(cur: Any) -> Any:
            cur.execute("SELECT " + IDENTITY)
            return cur.fetchone()

        return why_foreign(connection, lambda: self.db.cursor(identity))

    def status(self, watches: Sequence[Watch], health: bool = True) -> Status:
        def work(cur: Any) -> Status:
            status = self._compare(cur, watches)
            if health:
                report_health(cur, self.schema, status)
                check_listen_url(cur, self.listen_where, self.connect, status)
                self._more_health(cur, status)
            return status

        return self.db.cursor(work)

    def _more_health(self, cur: Any, status: Status) -> None:
        """What a capture mode adds to the health figures."""

    def _compare(self, cur: Any, watches: Sequence[Watch]) -> Status:
        status, schema = Status(), self.schema
        catalog = read_catalog(cur, schema)
        covered: set[int] = set()
        expected: set[str] = set()

        def inspect(watch: Watch) -> Inspection:
            r = resolve(cur, watch)
            wanted = set(watch_functions(r, schema))
            expected.update(wanted)
            tree = {oid: f"{s}.{table}" for oid, s, table in r.tree}
            covered.update(tree)
            present = {(o.table_oid, o.trigger) for o in catalog.triggers if o.table_oid in tree}
            lacking = [
                label
                for oid, label in tree.items()
                if oid != r.oid and {(oid, n) for n in wanted} - present
            ]
            problems = []
            if lacking and present:
                problems.append("triggers missing on " + ", ".join(lacking[:5]))
            if r.uncovered:
                problems.append("foreign tables cannot be watched: " + ", ".join(r.uncovered[:5]))
            return present, {(oid, name) for oid in tree for name in wanted}, problems

        compare_watches(status, watches, inspect)
        for obj in catalog.triggers:
            if obj.table_oid not in covered:
                status.orphaned.append(f"trigger {obj.trigger} on {obj.schema}.{obj.table}")
        for f in unused(catalog, expected, []):
            status.orphaned.append(f"function {schema}.{f.name}({f.args})")
        for name in catalog.exposed:
            status.warnings.append(
                f"function {schema}.{name}() may be executed by roles other than its "
                "owner: run `flask dbnotify install-triggers` or REVOKE the grant"
            )
        if LEGACY_FUNCTION in catalog.functions or LEGACY_TABLE in catalog.tables:
            status.warnings.append(
                f"objects of an earlier version are installed ({LEGACY_FUNCTION}, "
                f"{LEGACY_TABLE}): run `flask dbnotify install-triggers`"
            )
        return status


def report_health(cur: Any, schema: str, status: Status) -> None:
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
    cur.execute("SELECT to_regclass(%s)", (ident(schema, "dbnotify_claims"),))
    if cur.fetchone()[0] is None:
        return
    journal = ident(schema, "dbnotify_journal")
    cur.execute(f"SELECT count(*), min(id), max(id) FROM {journal}")
    count, first, last = cur.fetchone()
    health["journal"] = f"{count} rows" + (f", ids {first}..{last}" if count else "")

    backlog, failures = once_health_queries(
        ident(schema, "dbnotify_claims"), ident(schema, "dbnotify_receivers")
    )
    cur.execute(backlog)
    rows = cur.fetchall()
    cur.execute(failures)
    add_once_health(health, rows, cur.fetchall())


def check_listen_url(cur: Any, listen_where: str, connect: dict[str, Any], status: Status) -> None:
    """Whether a session at the listener's URL is in our database and
    receives a notification sent from this one (``cur``'s session), as
    the listener's must: a pooler in transaction or statement mode
    lets LISTEN run, then passes nothing on."""
    label, where = "listener URL", listen_where
    channel, token = check_channel(secrets.token_hex(8)), secrets.token_hex(8)
    try:
        conn = psycopg2.connect(**{"connect_timeout": 5, **connect, "application_name": CHECK_NAME})
    except psycopg2.Error as exc:
        status.health[label] = f"cannot connect: {reason(exc)}"
        status.warnings.append(f"the listener {cannot_connect(where, exc)}")
        return
    try:
        conn.autocommit = True
        with conn.cursor() as theirs:
            theirs.execute(f"LISTEN {ident(channel)}; SELECT {IDENTITY}")
            identity = tuple(theirs.fetchone() or ())
        cur.execute("SELECT " + IDENTITY)
        ours = tuple(cur.fetchone())
        if identity != ours:
            status.health[label] = f"{where}: another database"
            status.warnings.append(
                f"DBNOTIFY_LISTEN_URI ({where}) leads to {identity_text(identity)}, "
                f"DBNOTIFY_DATABASE_URI to {identity_text(ours)}: the listener refuses "
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
