"""What a migration runs (see :mod:`flask_dbnotify.migrations`): the
statements of :func:`.ddl.install_plan`, drops of our triggers on tables
no watch covers, and what undoes them all, read from
``information_schema`` before they run: the triggers they drop as they
were made, and drops of what they make."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..._watch import Watch
from ..base import Revision
from .catalog import TABLES, our_tables, our_triggers, qualified, resolve
from .ddl import drop_trigger, watch_triggers

#: Where a session is: the same on the migration's connection and ours
#: means the same database.
WHERE = "SELECT DATABASE(), @@hostname, @@port"


def why_foreign(connection: Any, ours: tuple[Any, ...]) -> str | None:
    """Why ``connection`` (a SQLAlchemy one) is not to our database (whose
    :data:`WHERE` is ``ours``), or None."""
    if connection.dialect.name not in ("mysql", "mariadb"):
        return f"the migration runs on {connection.dialect.name}, not MySQL"
    theirs = tuple(connection.exec_driver_sql(WHERE).one())
    if theirs == ours:
        return None
    return (
        f"the migration's database is {theirs[0]!r} on {theirs[1]}:{theirs[2]}, "
        f"DBNOTIFY_DATABASE_URI's {ours[0]!r} on {ours[1]}:{ours[2]}"
    )


def definition(cur: Any, schema: str, name: str) -> str:
    """The statement that makes trigger ``name`` again as it is now."""
    cur.execute(
        "SELECT ACTION_TIMING, EVENT_MANIPULATION, EVENT_OBJECT_TABLE, ACTION_STATEMENT "
        "FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s AND TRIGGER_NAME = %s",
        (schema, name),
    )
    timing, event, table, body = cur.fetchone()
    return (
        f"CREATE TRIGGER {qualified(schema, name)} {timing} {event} "
        f"ON {qualified(schema, table)} FOR EACH ROW {body}"
    )


def plan(cur: Any, database: str, watches: Sequence[Watch], install: list[str]) -> Revision | None:
    """``install`` is what install-triggers would run now."""
    installed = our_triggers(cur, database)
    tables = [(watch, resolve(cur, database, watch)) for watch in watches]
    wanted = {
        (table.schema, name, table.name)
        for watch, table in tables
        for name in watch_triggers(database, watch, table)
    }
    have = set(installed)
    present = our_tables(cur, database)
    if have == wanted and (not tables or set(TABLES) <= set(present)):
        return None
    gone = [trigger for trigger in installed if trigger not in wanted]
    upgrade = install + [drop_trigger(schema, name) for schema, name, _ in gone]
    # The old triggers back first: a table is never without triggers.
    downgrade = [definition(cur, schema, name) for schema, name, _ in gone]
    downgrade += [drop_trigger(schema, name) for schema, name, _ in sorted(wanted - have)]
    downgrade += [
        f"DROP TABLE IF EXISTS {qualified(database, name)}"
        for name in TABLES
        if name not in present
    ]
    changes = []
    for watch, table in tables:
        where = (table.schema, table.name)
        mine = {t for t in have if (t[0], t[2]) == where}
        if mine != {t for t in wanted if (t[0], t[2]) == where}:
            changes.append(f"watch {watch.name!r} ({'outdated' if mine else 'missing'})")
    covered = {(table.schema, table.name) for _, table in tables}
    changes += [
        f"trigger {schema}.{name} on {on} (orphaned)"
        for schema, name, on in gone
        if (schema, on) not in covered
    ]
    if not set(TABLES) <= set(present):
        changes.append("tables " + ", ".join(t for t in TABLES if t not in present) + " (missing)")
    return Revision(list(dict.fromkeys(upgrade)), downgrade, changes)
