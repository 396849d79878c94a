"""Binary-log capture on MariaDB (``DBNOTIFY_CAPTURE = "binlog"``): no
trigger in any writer's transaction. One elected process of the app
follows the row-based binary log (:mod:`.leader`, :mod:`.events`,
:mod:`.values`) and relays each committed transaction into the journal
(:mod:`.relay`), as the triggers would have written it; every process's
listener reads the journal as with triggers, so the rest of the
extension works unchanged.

Where the server's binary log cannot be followed (off, not row-based,
not full images or metadata, or MySQL rather than MariaDB),
``install-triggers`` installs triggers instead and says why, and
``status`` says which capture is in use and why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from ...._watch import Watch
from ....errors import DBNotifyError
from ....events import Operation
from ...base import Feed, Revision, Status, Stream
from ...common import OP_CODE, Inspection, compare_watches, digest, execute_on
from ...shaped import header as shape_header
from .. import MySQLBackend
from ..admin import MySQLAdmin, journal_health
from ..catalog import Table, our_tables, our_triggers, qualified, resolve
from ..context import in_transaction
from ..ddl import DDL_VERSION, drop_trigger, literal, shape_sql, shared_sql
from ..feed import MySQLFeed
from .leader import Leader, lock_name, start_position, unusable

log = logging.getLogger(__name__)

#: The trigger name of a shape binary-log capture no longer writes.
RETIRED = "-"


def binlog_shapes(database: str, watch: Watch, table: Table) -> dict[str, str]:
    """``{shape key: header}`` the relay writes for ``watch`` on ``table``:
    the shapes of the triggers, with the columns whose change makes an
    UPDATE an event (``"w"``), and a TRUNCATE's."""
    names = [column for column, _ in table.columns]
    ops = [op for op in watch.operations if op is not Operation.TRUNCATE] + [Operation.TRUNCATE]
    headers = {}
    for op in ops:
        header = json.loads(shape_header(watch, op, table.pk, names, True))
        header["w"] = list(watch.when_changed) if watch.when_changed else None
        headers[op] = json.dumps(header, ensure_ascii=False)
    hashed = digest([DDL_VERSION, database, "binlog", [[op.value, headers[op]] for op in ops]])
    return {f"{OP_CODE[op]}{hashed}": headers[op] for op in ops}


def _retire(database: str, table: Table, keep: Sequence[str]) -> str:
    """Shapes of ``table`` the relay is no longer to write (their rows in
    the journal still read)."""
    kept = ", ".join(f"'{key}'" for key in keep) or "''"
    return (
        f"UPDATE {qualified(database, 'dbnotify_shapes')} SET trigger_name = '{RETIRED}' "
        f"WHERE trigger_name = '' AND trigger_schema = {literal(table.schema)} "
        f"AND table_name = {literal(table.name)} AND name NOT IN ({kept})"
    )


class BinlogAdmin(MySQLAdmin):
    """Install and status for binary-log capture, or for triggers where
    the server's binary log cannot be followed."""

    def _plan(self, cur: Any, watches: Sequence[Watch]) -> list[str]:
        why = unusable(cur)
        if why is not None:
            log.warning("the binary log cannot be followed (%s): installing triggers", why)
            return super()._plan(cur, watches)
        database = self.db.database
        installed = our_triggers(cur, database)
        statements = shared_sql(database) + [
            f"INSERT IGNORE INTO {qualified(database, 'dbnotify_binlog')} "
            "(name, file, position, updated_at) VALUES ('position', '', 0, 0)"
        ]
        for watch in watches:
            table = resolve(cur, database, watch)
            shapes = binlog_shapes(database, watch, table)
            statements += [
                drop_trigger(schema, name)
                for schema, name, on in installed
                if (schema, on) == (table.schema, table.name)
            ]
            statements.append(_retire(database, table, list(shapes)))
            statements += [
                shape_sql(database, key, watch, header, table, "") for key, header in shapes.items()
            ]
        return statements

    def install(self, watches: Sequence[Watch]) -> None:
        super().install(watches)
        if self._cursor(unusable) is None:
            # What commits from now on is relayed, once a process of the app runs.
            start_position(self.db)

    def revision(self, watches: Sequence[Watch]) -> Revision | None:
        raise DBNotifyError(
            "DBNOTIFY_CAPTURE = 'binlog' is not written into migrations: what it installs "
            "depends on the server's binary log; run `flask dbnotify install-triggers` after "
            "`flask db upgrade`"
        )

    def uninstall_sql(self, watches: Sequence[Watch], everything: bool) -> list[str]:
        statements = super().uninstall_sql(watches, everything)
        if everything:
            return statements
        database = self.db.database

        def work(cur: Any) -> list[str]:
            return [_retire(database, resolve(cur, database, watch), []) for watch in watches]

        retire: list[str] = self._cursor(work)
        return retire + statements

    def status(self, watches: Sequence[Watch], health: bool = True) -> Status:
        database = self.db.database

        def work(cur: Any) -> Status | str:
            why = unusable(cur)
            if why is not None:
                return why
            status = Status()
            installed = our_triggers(cur, database)
            active = []
            if "dbnotify_shapes" in our_tables(cur, database):
                cur.execute(
                    "SELECT name, trigger_schema, table_name FROM "
                    f"{qualified(database, 'dbnotify_shapes')} WHERE trigger_name = ''"
                )
                active = cur.fetchall()

            def inspect(watch: Watch) -> Inspection:
                table = resolve(cur, database, watch)
                where = (table.schema, table.name)
                present = {key for key, schema, name in active if (schema, name) == where}
                problems = [
                    f"trigger {name} of ours is installed too: run install-triggers"
                    for schema, name, on in installed
                    if (schema, on) == where
                ]
                return present, set(binlog_shapes(database, watch, table)), problems

            compare_watches(status, watches, inspect)
            if health:
                journal_health(cur, database, status, "the binary log, followed by one process")
                _binlog_health(cur, database, status)
            return status

        found: Status | str = self._cursor(work)
        if isinstance(found, Status):
            return found
        why = found
        status = super().status(watches, health)
        status.health["capture"] = f"triggers: the binary log cannot be followed ({why})"
        status.warnings.append(
            f"DBNOTIFY_CAPTURE is 'binlog', but the binary log cannot be followed ({why}): "
            "triggers capture the changes"
        )
        return status


def _binlog_health(cur: Any, database: str, status: Status) -> None:
    cur.execute("SELECT IS_USED_LOCK(%s)", (lock_name(database),))
    holder = cur.fetchone()[0]
    status.health["leader"] = f"connection {holder}" if holder else "none"
    try:
        cur.execute(
            "SELECT file, position FROM "
            f"{qualified(database, 'dbnotify_binlog')} WHERE name = 'position'"
        )
        found = cur.fetchone()
    except Exception:  # noqa: BLE001 - not installed
        return
    if found is not None:
        status.health["relayed to"] = f"{found[0]}:{found[1]}" if found[0] else "not yet"


class BinlogFeed(MySQLFeed):
    """A listener's feed, and this process's candidate for leader."""

    def __init__(self, backend: MySQLBinlogBackend) -> None:
        super().__init__(backend)
        self.leader = Leader(backend.db)

    def open_stream(self, settings: Any) -> Stream:
        stream = super().open_stream(settings)
        try:
            # What commits from now on is relayed, whoever leads.
            start_position(self.db)
        except Exception as exc:  # noqa: BLE001 - the leader says why, again
            log.warning("cannot record where the binary log begins: %s", exc)
        self.leader.start()
        return stream

    def close(self) -> None:
        self.leader.stop()

    def discard(self) -> None:
        super().discard()
        self.leader.discard()


class MySQLBinlogBackend(MySQLBackend):
    """MariaDB, changes captured from the binary log."""

    def __init__(self, url: sa.URL, timeout: float) -> None:
        super().__init__(url, timeout)
        self.admin = BinlogAdmin(self.db)
        # What a writer's transaction hands the relay, in the log with its
        # changes, so that it arrives in order with them.
        self._hand = (
            f"INSERT INTO {qualified(self.db.database, 'dbnotify_relay')} (kind, body) "
            "VALUES (%(kind)s, %(body)s)"
        )

    def notify(self, connection: Any, channel: str, payload: str, durable: bool = False) -> None:
        if connection is None:
            super().notify(None, channel, payload, durable)  # at once, into the journal
            return
        execute_on(connection, self._hand, {"kind": "m", "body": payload})

    def set_context(self, conn: Any, text: str) -> None:
        in_transaction(conn)
        conn.exec_driver_sql(self._hand, {"kind": "c", "body": text})

    def feed(self) -> Feed:
        return BinlogFeed(self)
