"""What a migration runs (see :mod:`flask_dbnotify.migrations`): the
statements of :func:`.ddl.install_plan`, drops of our triggers on tables
no watch covers, and what undoes them all, read from the catalog before
they run: the definitions of the triggers and functions they replace or
drop, and drops of what they make."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..._watch import Watch
from ...errors import DBNotifyError
from ..base import Revision
from .catalog import Catalog, Function, Installed, Resolved, read_catalog, resolve_all
from .common import IDENTITY, INSTALL_LOCK, ident, identity_text, literal
from .ddl import LEGACY_FUNCTION, TABLES, drop_function, drop_trigger, install_plan, watch_functions

_TRIGGER_DEFS = """
SELECT t.tgrelid, t.tgname, pg_catalog.pg_get_triggerdef(t.oid)
FROM pg_catalog.pg_trigger t
WHERE NOT t.tgisinternal AND t.tgrelid = ANY(%(tables)s)
"""
# With the owner: a definition is put back with the rights of whoever runs
# the downgrade, so only what that role could have written is.
_FUNCTION_DEFS = """
SELECT p.proname, pg_catalog.pg_get_functiondef(p.oid),
       pg_catalog.obj_description(p.oid, 'pg_proc'),
       pg_catalog.pg_get_userbyid(p.proowner), p.proowner = r.oid
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
CROSS JOIN (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user) r
WHERE n.nspname = %(schema)s AND p.proname = ANY(%(names)s) AND p.pronargs = 0
"""


def why_foreign(connection: Any, identity: Callable[[], Sequence[object]]) -> str | None:
    """Why ``connection`` is not to the database whose
    :data:`.common.IDENTITY` ``identity()`` reads, or None."""
    if connection.dialect.name != "postgresql":
        return f"the migration runs on {connection.dialect.name}, not PostgreSQL"
    theirs = tuple(connection.exec_driver_sql("SELECT " + IDENTITY).one())
    ours = tuple(identity())
    if theirs != ours:
        return (
            f"the migration's database is {identity_text(theirs)}, "
            f"DBNOTIFY_DATABASE_URI's {identity_text(ours)}"
        )
    return None


def plan(cur: Any, watches: Sequence[Watch], schema: str) -> Revision | None:
    """Run in one transaction, which it leaves with an empty search_path."""
    catalog = read_catalog(cur, schema)
    resolved = resolve_all(cur, watches)
    wanted = {r.watch.name: watch_functions(r, schema) for r in resolved}
    want_triggers = {
        (oid, name) for r in resolved for oid, _, _ in r.tree for name in wanted[r.watch.name]
    }
    want_functions = {n for functions in wanted.values() for n in functions}
    have_triggers = {(o.table_oid, o.trigger) for o in catalog.triggers}
    # Our tables are needed once something is watched.
    tables_ok = not resolved or (catalog.schema_exists and set(TABLES) <= set(catalog.tables))
    same = have_triggers == want_triggers and set(catalog.functions) == want_functions
    if same and tables_ok and not catalog.exposed:
        return None
    gone = [o for o in catalog.triggers if (o.table_oid, o.trigger) not in want_triggers]
    unused = [f for name, f in catalog.functions.items() if name not in want_functions]
    # Each runs after concurrent installs, as install-triggers does.
    lock = f"SELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK})"
    upgrade = [lock, *install_plan(catalog, resolved, schema)]
    upgrade += [drop_trigger(o) for o in gone] + [drop_function(schema, f) for f in unused]
    # Definitions as the catalog gives them, every name qualified.
    cur.execute("SELECT pg_catalog.set_config('search_path', '', true)")
    downgrade = [lock, *_restore(cur, catalog, gone, unused, schema)]
    downgrade += _unmake(catalog, resolved, wanted, have_triggers, schema)
    changes = _changes(resolved, wanted, have_triggers, gone, catalog, schema)
    return Revision(list(dict.fromkeys(upgrade)), downgrade, changes)


def _restore(
    cur: Any, catalog: Catalog, gone: list[Installed], unused: list[Function], schema: str
) -> list[str]:
    """Make again, as they are now, the functions and triggers the
    upgrade drops (not 0.1's ``dbnotify_spill()``, which any role could call)."""
    names = [f.name for f in unused if f.name != LEGACY_FUNCTION]
    cur.execute(_FUNCTION_DEFS, {"schema": schema, "names": names})
    statements = []
    for name, definition, comment, owner, owned in cur.fetchall():
        if not owned:
            raise DBNotifyError(
                f"function {schema}.{name}() belongs to the role {owner}: a downgrade "
                "would make it again with the rights of the role that runs it; generate "
                "the migration as its owner, or drop it first"
            )
        fn = ident(schema, name)
        statements += [definition.strip(), f"REVOKE ALL ON FUNCTION {fn}() FROM PUBLIC"]
        if comment is not None:
            statements.append(f"COMMENT ON FUNCTION {fn}() IS {literal(comment)}")
    cur.execute(_TRIGGER_DEFS, {"tables": sorted({o.table_oid for o in gone})})
    defs = {(oid, name): definition for oid, name, definition in cur.fetchall()}
    return statements + [defs[(o.table_oid, o.trigger)] for o in gone]


def _unmake(
    catalog: Catalog,
    resolved: Sequence[Resolved],
    wanted: dict[str, dict[str, Any]],
    have_triggers: set[tuple[int, str]],
    schema: str,
) -> list[str]:
    """Drop what the upgrade makes that the database does not hold now."""
    statements = [
        drop_trigger(Installed(name, oid, table_schema, table, name))
        for r in resolved
        for oid, table_schema, table in r.tree
        for name in wanted[r.watch.name]
        if (oid, name) not in have_triggers
    ]
    made_functions = {name for functions in wanted.values() for name in functions}
    statements += [
        drop_function(schema, Function(name, "", True))
        for name in sorted(made_functions - set(catalog.functions))
    ]
    made = [name for name in TABLES if name not in catalog.tables]
    statements += [f"DROP TABLE IF EXISTS {ident(schema, name)}" for name in made]
    if not catalog.schema_exists:
        statements.append(f"DROP SCHEMA IF EXISTS {ident(schema)}")
    return statements


def _changes(
    resolved: Sequence[Resolved],
    wanted: dict[str, dict[str, Any]],
    have_triggers: set[tuple[int, str]],
    gone: list[Installed],
    catalog: Catalog,
    schema: str,
) -> list[str]:
    changes = []
    wanted_names = {n for functions in wanted.values() for n in functions}
    for r in resolved:
        want = {(oid, n) for oid, _, _ in r.tree for n in wanted[r.watch.name]}
        present = {(oid, n) for oid, n in have_triggers if oid in {o for o, _, _ in r.tree}}
        if present != want:
            changes.append(f"watch {r.watch.name!r} ({'outdated' if present else 'missing'})")
    covered = {oid for r in resolved for oid, _, _ in r.tree}
    changes += [
        f"trigger {o.trigger} on {o.schema}.{o.table} (orphaned)"
        for o in gone
        if o.table_oid not in covered
    ]
    used = {o.function for o in gone}
    changes += [
        f"function {schema}.{name}() (orphaned)"
        for name in catalog.functions
        if name not in wanted_names and name not in used
    ]
    changes += [f"function {schema}.{name}() (executable by others)" for name in catalog.exposed]
    missing = [name for name in TABLES if name not in catalog.tables]
    if missing:
        changes.append(f"tables {', '.join(missing)} in {schema!r} (missing)")
    return changes
