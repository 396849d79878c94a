"""Install, uninstall and status. MySQL commits before and after every
DDL statement, so an install is a sequence, made safe to repeat: the
tables first, then each trigger's shape, then the trigger."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pymysql

from ..._watch import Watch
from ..base import Admin, Revision, Status
from ..common import Inspection, add_once_health, compare_watches, once_health_queries
from .catalog import TABLES, our_tables, our_triggers, qualified, resolve
from .connection import NO_SUCH_TABLE, Database
from .ddl import drop_trigger, install_plan, watch_triggers
from .revision import WHERE, plan, why_foreign


def iso(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%d %H:%M:%S%z")


class MySQLAdmin(Admin):
    """Install, uninstall and status for one database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _plan(self, cur: Any, watches: Sequence[Watch]) -> list[str]:
        database = self.db.database
        tables = [(watch, resolve(cur, database, watch)) for watch in watches]
        return install_plan(database, our_triggers(cur, database), tables)

    def _cursor(self, work: Any) -> Any:
        def run(conn: pymysql.Connection[Any]) -> Any:
            with conn.cursor() as cur:
                return work(cur)

        return self.db.with_connection(run)

    def install_sql(self, watches: Sequence[Watch]) -> list[str]:
        return list(self._cursor(lambda cur: self._plan(cur, watches)))

    def install(self, watches: Sequence[Watch]) -> None:
        def work(cur: Any) -> None:
            for statement in self._plan(cur, watches):
                cur.execute(statement)

        self._cursor(work)

    def script(self, statements: Sequence[str]) -> str:
        # The mysql client ends a statement at the first semicolon: a
        # trigger of several statements is set off by another delimiter.
        lines = []
        for statement in statements:
            if ";" in statement:
                lines += ["DELIMITER $$", f"{statement}$$", "DELIMITER ;"]
            else:
                lines.append(f"{statement};")
        return "".join(f"{line}\n" for line in lines)

    def execute_all(self, statements: Sequence[str]) -> None:
        def work(cur: Any) -> None:
            for statement in statements:
                cur.execute(statement)

        self._cursor(work)

    def uninstall_sql(self, watches: Sequence[Watch], everything: bool) -> list[str]:
        database = self.db.database

        def work(cur: Any) -> list[str]:
            installed = our_triggers(cur, database)
            if everything:
                drops = [(schema, name) for schema, name, _ in installed]
                tables = [
                    f"DROP TABLE IF EXISTS {qualified(database, t)}"
                    for t in our_tables(cur, database)
                ]
            else:
                wanted = {
                    (table.schema, table.name)
                    for table in (resolve(cur, database, watch) for watch in watches)
                }
                drops = [(schema, name) for schema, name, on in installed if (schema, on) in wanted]
                tables = []
            return [drop_trigger(schema, name) for schema, name in drops] + tables

        return list(self._cursor(work))

    def revision(self, watches: Sequence[Watch]) -> Revision | None:
        def work(cur: Any) -> Revision | None:
            return plan(cur, self.db.database, watches, self._plan(cur, watches))

        result: Revision | None = self._cursor(work)
        return result

    def foreign(self, connection: Any) -> str | None:
        return why_foreign(connection, tuple(self.db.run(WHERE)[0]))

    def kept_tables(self) -> tuple[str | None, frozenset[str]]:
        return None, frozenset(TABLES)

    def status(self, watches: Sequence[Watch], health: bool = True) -> Status:
        database = self.db.database

        def work(cur: Any) -> Status:
            status = Status()
            installed = our_triggers(cur, database)
            covered: set[tuple[str, str]] = set()

            def inspect(watch: Watch) -> Inspection:
                table = resolve(cur, database, watch)
                where = (table.schema, table.name)
                covered.add(where)
                present = {name for schema, name, on in installed if (schema, on) == where}
                return present, set(watch_triggers(database, watch, table)), []

            compare_watches(status, watches, inspect)
            for schema, name, on in installed:
                if (schema, on) not in covered:
                    status.orphaned.append(f"trigger {schema}.{name} on {on}")
            if health:
                journal_health(cur, database, status, "triggers and a journal table, polled")
            return status

        result: Status = self._cursor(work)
        return result


def journal_health(cur: Any, database: str, status: Status, capture: str) -> None:
    """The health lines of the journal, its listeners and once receivers,
    after the capture's."""
    health = status.health
    health["capture"] = capture
    journal = qualified(database, "dbnotify_journal")
    try:
        cur.execute(f"SELECT count(*), min(created_at), max(id) FROM {journal}")
        count, oldest, last = cur.fetchone()
        cur.execute(
            "SELECT name, position, seen_at FROM "
            f"{qualified(database, 'dbnotify_listeners')} ORDER BY name"
        )
        listeners = cur.fetchall()
    except pymysql.MySQLError as exc:
        if exc.args and exc.args[0] == NO_SUCH_TABLE:
            return  # Not installed.
        raise
    health["journal"] = (
        f"{count} rows"
        + (f", last id {last}" if last else "")
        + (f", oldest {iso(oldest)}" if oldest else "")
    )
    health["listeners"] = str(len(listeners))
    for name, position, seen_at in listeners:
        health[f"listener {name}"] = f"read to id {position}, seen {iso(seen_at)}"
    backlog, failures = once_health_queries(
        qualified(database, "dbnotify_claims"), qualified(database, "dbnotify_receivers")
    )
    cur.execute(backlog)
    rows = cur.fetchall()
    cur.execute(failures)
    add_once_health(health, rows, cur.fetchall())
