"""Install, uninstall and status in WAL capture mode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...._watch import Watch
from ....errors import DBNotifyError
from ...base import Revision, Status
from ...common import Inspection, compare_watches
from ..admin import PostgreSQLAdmin
from ..catalog import read_catalog, resolve, resolve_all
from ..common import INSTALL_LOCK, ident
from ..connection import Database
from ..ddl import uninstall_plan as trigger_uninstall_plan
from . import ddl

WAL_LEVEL = (
    "DBNOTIFY_CAPTURE = 'wal' needs wal_level = logical; the server has {level}. Set "
    "wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and "
    "restart the server; on Amazon RDS set rds.logical_replication = 1 in the parameter "
    "group, on Cloud SQL the flag cloudsql.logical_decoding = on, on Azure the server "
    "parameter wal_level = LOGICAL, then reboot"
)
REPLICATION = (
    "DBNOTIFY_CAPTURE = 'wal' needs a role with the REPLICATION attribute, to make the "
    "replication slot and to stream it; {role} has not: run ALTER ROLE {role} REPLICATION "
    "as a superuser (on Amazon RDS: GRANT rds_replication TO {role}; on Cloud SQL: ALTER "
    "USER {role} WITH REPLICATION), for the role of DBNOTIFY_DATABASE_URI too"
)
NO_SLOT = (
    "DBNOTIFY_CAPTURE = 'wal' needs a replication slot, and all {most} the server allows "
    "(max_replication_slots) are taken: drop one no longer used (SELECT slot_name, active "
    "FROM pg_replication_slots; SELECT pg_drop_replication_slot(name)), or raise "
    "max_replication_slots and restart the server"
)
#: Retained WAL past which ``status`` warns (the slot holds it on disk).
RETAINED_WARNING = 1024**3


class WalAdmin(PostgreSQLAdmin):
    """What WAL capture creates: a publication and a slot, named ``slot``."""

    def __init__(
        self, db: Database, schema: str, listen_where: str, connect: dict[str, Any], slot: str
    ) -> None:
        super().__init__(db, schema, listen_where, connect)
        self.slot = slot

    def _plan(self, cur: Any, watches: Sequence[Watch]) -> list[str]:
        _require_logical(cur)
        catalog = read_catalog(cur, self.schema)
        cur.execute("SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s", (self.slot,))
        exists = cur.fetchone() is not None
        return ddl.install_plan(catalog, resolve_all(cur, watches), self.schema, self.slot, exists)

    def install(self, watches: Sequence[Watch]) -> None:
        def work(cur: Any) -> str:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (INSTALL_LOCK,))
            *statements, slot = self._plan(cur, watches)
            _require_slot(cur, self.slot)
            for statement in statements:
                cur.execute(statement)
            return slot

        slot = self.db.cursor(work, transaction=True)
        # A slot cannot be made in a transaction that wrote anything.
        self.db.cursor(lambda cur: cur.execute(slot))

    def revision(self, watches: Sequence[Watch]) -> Revision | None:
        raise DBNotifyError(
            "DBNOTIFY_CAPTURE = 'wal' is not written into migrations: its replication "
            "slot cannot be made in a transaction that changed anything, as a migration's "
            "has; run `flask dbnotify install-triggers` after `flask db upgrade`"
        )

    def uninstall_sql(self, watches: Sequence[Watch], everything: bool) -> list[str]:
        def work(cur: Any) -> list[str]:
            catalog = read_catalog(cur, self.schema)
            statements = ddl.uninstall_plan(catalog, self.schema, self.slot, everything)
            if everything:
                statements += trigger_uninstall_plan(catalog, None, self.schema)
            return list(dict.fromkeys(statements))

        return self.db.cursor(work)

    def execute_all(self, statements: Sequence[str]) -> None:
        # One at a time: dropping a slot cannot share a transaction.
        def work(cur: Any) -> None:
            for statement in statements:
                cur.execute(statement)

        self.db.cursor(work)

    def _more_health(self, cur: Any, status: Status) -> None:
        cur.execute(
            "SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables "
            "WHERE pubname = %s ORDER BY 1, 2",
            (self.slot,),
        )
        tables = [f"{s}.{t}" for s, t in cur.fetchall()]
        status.health["publication"] = f"{self.slot}: " + (", ".join(tables) or "MISSING")
        _slot_health(cur, self.schema, self.slot, status)

    def _compare(self, cur: Any, watches: Sequence[Watch]) -> Status:
        status = Status()
        cur.execute(
            "SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables WHERE pubname = %s",
            (self.slot,),
        )
        published = {tuple(row) for row in cur.fetchall()}
        defs = ident(self.schema, ddl.DEFINITIONS)
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (defs,))
        have_defs = cur.fetchone()[0]

        def inspect(watch: Watch) -> Inspection:
            r = resolve(cur, watch)
            cur.execute(
                "SELECT c.oid FROM pg_catalog.pg_class c WHERE c.oid = ANY(%s) "
                "AND c.relreplident = 'f'",
                ([oid for oid, _, _ in r.tree],),
            )
            full = {row[0] for row in cur.fetchall()}
            present: set[tuple[Any, ...]] = {("full", oid) for oid in full}
            if (r.schema, r.table) in published:
                present.add(("published", r.oid))
            if have_defs:
                cur.execute(
                    f"SELECT head, ops, columns, when_changed FROM {defs} "
                    "WHERE slot = %s AND watch = %s AND table_schema = %s AND table_name = %s",
                    (self.slot, watch.name, r.schema, r.table),
                )
                present |= {("captures", *row[:2], *map(_listed, row[2:])) for row in cur}
            if not present - {("full", oid) for oid in full}:
                present = set()  # REPLICA IDENTITY FULL alone: another's, or left by uninstall
            head, ops, columns, changed = ddl.definition(r)
            captures = ("captures", head, ops, _listed(columns), _listed(changed))
            wanted = {("published", r.oid), captures}
            wanted |= {("full", oid) for oid, _, _ in r.tree}
            return present, wanted, []

        compare_watches(status, watches, inspect)
        return status


def _listed(values: Any) -> tuple[str, ...] | None:
    return None if values is None else tuple(values)


def _require_logical(cur: Any) -> None:
    cur.execute("SHOW wal_level")
    level = cur.fetchone()[0]
    if level != "logical":
        raise DBNotifyError(WAL_LEVEL.format(level=level))


def _require_slot(cur: Any, slot: str) -> None:
    """Before anything is made: that the slot can be made (the installer
    has REPLICATION, and a slot is free), unless it exists and is usable."""
    cur.execute(
        "SELECT wal_status IS DISTINCT FROM 'lost' FROM pg_catalog.pg_replication_slots "
        "WHERE slot_name = %s",
        (slot,),
    )
    found = cur.fetchone()
    if found is not None and found[0]:
        return
    cur.execute(
        "SELECT current_user, rolsuper OR rolreplication FROM pg_catalog.pg_roles "
        "WHERE rolname = current_user"
    )
    role, allowed = cur.fetchone()
    if not allowed:
        raise DBNotifyError(REPLICATION.format(role=ident(role)))
    cur.execute(
        "SELECT current_setting('max_replication_slots')::int, count(*) "
        "FROM pg_catalog.pg_replication_slots"
    )
    most, used = cur.fetchone()
    if used >= most and found is None:
        raise DBNotifyError(NO_SLOT.format(most=most))


def _slot_health(cur: Any, schema: str, slot: str, status: Status) -> None:
    health = status.health
    cur.execute(
        "SELECT s.active, s.active_pid, s.wal_status, "
        "pg_current_wal_lsn() - s.confirmed_flush_lsn, pg_current_wal_lsn() - s.restart_lsn, "
        "r.client_addr::text, extract(epoch FROM r.flush_lag) "
        "FROM pg_catalog.pg_replication_slots s "
        "LEFT JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid "
        "WHERE s.slot_name = %s",
        (slot,),
    )
    row = cur.fetchone()
    if row is None:
        health["slot"] = f"{slot}: MISSING"
        status.warnings.append(
            f"the replication slot {slot} does not exist: run `flask dbnotify install-triggers`"
            " (changes made while it was missing are not delivered; every process then "
            "hears gap=True)"
        )
        return
    active, pid, wal_status, lag, retained, client, seconds = row
    leader = f"leader pid {pid} from {client or 'local'}" if active else "no leader"
    health["slot"] = f"{slot}: {leader}, WAL {wal_status}"
    # The WAL sender's measure, from the leader's confirmations (none while
    # no process leads, and once the leader has caught up and rests).
    behind = "" if seconds is None else f", {float(seconds):.3f} s"
    health["slot lag"] = f"{int(lag or 0)} bytes{behind}"
    health["slot retains"] = f"{int(retained or 0)} bytes of WAL"
    if wal_status == "lost":
        status.warnings.append(
            f"the replication slot {slot} was invalidated (its WAL was removed): changes "
            "were lost; run `flask dbnotify install-triggers` to replace it (every process "
            "then hears gap=True)"
        )
    elif retained and retained > RETAINED_WARNING:
        status.warnings.append(
            f"the replication slot {slot} retains {int(retained)} bytes of WAL: is a "
            "process of the app running?"
        )
    table = ident(schema, "dbnotify_wal")
    cur.execute("SELECT to_regclass(%s)", (table,))
    if cur.fetchone()[0] is not None:
        cur.execute(
            f"SELECT extract(epoch FROM now() - relayed_at), gap FROM {table} WHERE slot = %s",
            (slot,),
        )
        relayed = cur.fetchone()
        if relayed is not None:
            ago, gap = relayed
            health["slot relayed"] = "never" if ago is None else f"{float(ago):.1f} s ago"
            if gap is not None:
                status.warnings.append(f"{gap}; the next leader reports it (gap=True)")
