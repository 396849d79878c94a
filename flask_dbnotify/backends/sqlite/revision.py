"""What a migration runs (see :mod:`flask_dbnotify.migrations`): the
statements of :func:`.ddl.install_plan`, drops of our triggers on tables
no watch covers, and what undoes them all, read from ``sqlite_schema``
before they run: the triggers they drop as they were made, and drops of
what they make."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from typing import Any

from ..._watch import Watch
from ..base import Revision
from .catalog import our_tables, our_triggers, resolve
from .ddl import TABLES, drop_trigger, watch_triggers


def why_foreign(connection: Any, path: str) -> str | None:
    """Why ``connection`` is not to the database file ``path``, or None."""
    if connection.dialect.name != "sqlite":
        return f"the migration runs on {connection.dialect.name}, not SQLite"
    files = [file for _, name, file in connection.exec_driver_sql("PRAGMA database_list")]
    main = files[0] if files else ""
    try:
        same = bool(main) and os.path.samefile(main, path)
    except OSError:  # either file does not exist
        same = False
    if same:
        return None
    return f"the migration's database is {main or 'in memory'!r}, DBNOTIFY_DATABASE_URI's {path!r}"


def plan(
    conn: sqlite3.Connection, path: str, watches: Sequence[Watch], install: list[str]
) -> Revision | None:
    """Run in one read transaction (one snapshot); ``install`` is what
    install-triggers would run."""
    installed = our_triggers(conn)
    tables = [(watch, resolve(conn, path, watch)) for watch in watches]
    wanted = {(name, table[0].lower()) for w, table in tables for name in watch_triggers(w, table)}
    have = {(name, on.lower()) for name, on in installed}
    present = our_tables(conn)
    # Our tables are needed once something is watched.
    if have == wanted and (not tables or set(TABLES) <= set(present)):
        return None
    gone = [(name, on) for name, on in installed if (name, on.lower()) not in wanted]
    upgrade = install + [drop_trigger(name) for name, _ in gone]
    definitions = dict(
        conn.execute(
            "SELECT name, sql FROM sqlite_schema WHERE type = 'trigger' AND substr(name, 1, 9) = "
            "'dbnotify_'"
        ).fetchall()
    )
    # The old triggers back first: a table is never without triggers.
    downgrade = [definitions[name] for name, _ in gone]
    downgrade += [drop_trigger(name) for name, on in sorted(wanted - have)]
    downgrade += [f"DROP TABLE IF EXISTS {name}" for name in TABLES if name not in present]
    changes = []
    for watch, table in tables:
        key = table[0].lower()
        mine = {(name, on) for name, on in have if on == key}
        if mine != {(name, on) for name, on in wanted if on == key}:
            changes.append(f"watch {watch.name!r} ({'outdated' if mine else 'missing'})")
    covered = {table[0].lower() for _, table in tables}
    changes += [f"trigger {n} on {on} (orphaned)" for n, on in gone if on.lower() not in covered]
    if not set(TABLES) <= set(present):
        changes.append("tables " + ", ".join(t for t in TABLES if t not in present) + " (missing)")
    return Revision(list(dict.fromkeys(upgrade)), downgrade, changes)
