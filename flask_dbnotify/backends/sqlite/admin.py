"""Install, uninstall and status, each on a connection of its own."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..._watch import Watch
from ..base import Admin, Revision, Status
from ..common import Inspection, add_once_health, compare_watches, once_health_queries
from .catalog import TABLES, our_tables, our_triggers, resolve
from .connection import Database, in_one_snapshot, write_transaction
from .ddl import drop_trigger, install_plan, unix, watch_triggers
from .revision import plan, why_foreign


def iso(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%d %H:%M:%S%z")


class SQLiteAdmin(Admin):
    """Install, uninstall and status for one database file."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _plan(self, conn: sqlite3.Connection, watches: Sequence[Watch]) -> list[str]:
        tables = [(watch, resolve(conn, self.db.path, watch)) for watch in watches]
        return install_plan(our_triggers(conn), tables)

    def install_sql(self, watches: Sequence[Watch]) -> list[str]:
        return self.db.with_connection(lambda conn: self._plan(conn, watches))

    def install(self, watches: Sequence[Watch]) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA journal_mode = WAL")
            with write_transaction(conn):
                for statement in self._plan(conn, watches):
                    conn.execute(statement)

        self.db.with_connection(work, create=True)

    def execute_all(self, statements: Sequence[str]) -> None:
        def work(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                for statement in statements:
                    conn.execute(statement)

        self.db.with_connection(work)

    def uninstall_sql(self, watches: Sequence[Watch], everything: bool) -> list[str]:
        def work(conn: sqlite3.Connection) -> list[str]:
            installed = our_triggers(conn)
            if everything:
                drops = [name for name, _ in installed]
                tables = [f"DROP TABLE IF EXISTS {t}" for t in our_tables(conn)]
            else:
                names = {resolve(conn, self.db.path, watch)[0].lower() for watch in watches}
                drops = [name for name, on in installed if on.lower() in names]
                tables = []
            return [drop_trigger(name) for name in drops] + tables

        return self.db.with_connection(work)

    def revision(self, watches: Sequence[Watch]) -> Revision | None:
        def work(conn: sqlite3.Connection) -> Revision | None:
            return plan(conn, self.db.path, watches, self._plan(conn, watches))

        return self.db.with_connection(in_one_snapshot(work))

    def kept_tables(self) -> tuple[str | None, frozenset[str]]:
        return None, frozenset(TABLES)

    def foreign(self, connection: Any) -> str | None:
        return why_foreign(connection, self.db.path)

    def status(self, watches: Sequence[Watch], health: bool = True) -> Status:
        def work(conn: sqlite3.Connection) -> Status:
            status = Status()
            installed = our_triggers(conn)
            covered: set[str] = set()

            def inspect(watch: Watch) -> Inspection:
                table = resolve(conn, self.db.path, watch)
                key = table[0].lower()
                covered.add(key)
                present = {name for name, on in installed if on.lower() == key}
                return present, set(watch_triggers(watch, table)), []

            compare_watches(status, watches, inspect)
            for name, on in installed:
                if on.lower() not in covered:
                    status.orphaned.append(f"trigger {name} on {on}")
            if health:
                _health(conn, status)
            return status

        return self.db.with_connection(work)


def _health(conn: sqlite3.Connection, status: Status) -> None:
    health = status.health
    health["journal mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
    try:
        count, oldest = conn.execute(
            "SELECT count(*), min(created_at) FROM dbnotify_journal"
        ).fetchone()
        # The last id given out, which pruning does not take back
        # (AUTOINCREMENT); no row here until the first journal row.
        last = conn.execute(
            "SELECT max(seq) FROM sqlite_sequence WHERE name = 'dbnotify_journal'"
        ).fetchone()[0]
        listeners = conn.execute(
            "SELECT name, position, seen_at FROM dbnotify_listeners ORDER BY name"
        ).fetchall()
    except sqlite3.OperationalError:
        return  # Not installed.
    health["journal"] = (
        f"{count} rows"
        + (f", last id {last}" if last else ", none written yet")
        + (f", oldest {iso(unix(oldest))}" if oldest else "")
    )
    health["listeners"] = str(len(listeners))
    for name, position, seen_at in listeners:
        health[f"listener {name}"] = f"read to id {position}, seen {iso(seen_at)}"
    backlog, failures = once_health_queries("dbnotify_claims", "dbnotify_receivers")
    try:
        add_once_health(health, conn.execute(backlog).fetchall(), conn.execute(failures).fetchall())
    except sqlite3.OperationalError:
        return  # Installed by an earlier version.
