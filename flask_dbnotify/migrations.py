"""Triggers in Alembic (and Flask-Migrate) migrations: the operation
``op.dbnotify_sql(statements)``, and autogenerate support, which writes
it into a revision when the database does not match the watches.

Importing this module registers both with Alembic. :meth:`DBNotify.init_app
<flask_dbnotify.DBNotify.init_app>` imports it when Alembic is loaded
already (Flask-Migrate loads it, and so does the ``alembic`` command before
it runs ``env.py``), so nothing else is needed; a revision that uses the
operation imports it too. See the Migrations page of the docs.

A revision holds the SQL as it was generated, never what the app would
generate later: a migration means the same whatever the code becomes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import alembic.util
from alembic.autogenerate import comparators, renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import MigrateOperation, Operations
from alembic.operations.ops import UpgradeOps
from flask import current_app, has_app_context

from .errors import DBNotifyError

# A child of Alembic's logger: env.py applies alembic.ini's logging setup,
# which shows alembic.* at INFO and turns off the loggers it does not name.
_log = logging.getLogger("alembic.autogenerate.dbnotify")
#: What a revision that uses the operation imports, so that it registers.
_IMPORT = "import flask_dbnotify.migrations  # noqa: F401 - registers op.dbnotify_sql"


@Operations.register_operation("dbnotify_sql")
class DBNotifySQLOp(MigrateOperation):
    """Run Flask-DBNotify's DDL, each statement as written (no bind
    parameters, no ``%`` formatting).

    In a revision, ``op.dbnotify_sql(statements)`` runs ``statements`` (a
    list of strings) in the migration's transaction; offline (``flask db
    upgrade --sql``) it prints them, each followed by ``;``.

    :param statements: the statements, one string each.
    :param reverse_statements: what undoes them, for :meth:`reverse`
        (autogenerate's downgrade); not written into the revision.
    :param changes: what the statements change, one line each; written
        into the revision as comments.
    """

    def __init__(
        self,
        statements: Sequence[str],
        reverse_statements: Sequence[str] | None = None,
        changes: Sequence[str] = (),
    ) -> None:
        self.statements = list(statements)
        self.reverse_statements = None if reverse_statements is None else list(reverse_statements)
        self.changes = list(changes)

    @classmethod
    def dbnotify_sql(cls, operations: Operations, statements: Sequence[str]) -> None:
        # Alembic puts its own docstring here: see the class's.
        if isinstance(statements, str):
            raise TypeError("op.dbnotify_sql() takes a list of statements, not one string")
        operations.invoke(cls(statements))

    def reverse(self) -> DBNotifySQLOp:
        """The operation that undoes this one (autogenerate writes it into
        the revision's downgrade). Raises ``ValueError`` when this one was
        made without ``reverse_statements``."""
        if self.reverse_statements is None:
            raise ValueError("this op.dbnotify_sql() does not know what undoes it")
        undo = [f"undo: {change}" for change in self.changes]
        return DBNotifySQLOp(self.reverse_statements, self.statements, undo)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        # What `alembic check` (`flask db check`) lists: what differs.
        return ("dbnotify_sql", *self.changes)


@Operations.implementation_for(DBNotifySQLOp)
def _run(operations: Operations, operation: DBNotifySQLOp) -> None:
    context = operations.get_context()
    for statement in operation.statements:
        if context.as_sql:
            context.impl.static_output(statement + context.impl.command_terminator)
        else:
            # To the driver as written: text() would take ':name' for a bind
            # parameter, and a driver given parameters would format '%'.
            operations.get_bind().exec_driver_sql(
                statement, execution_options={"no_parameters": True}
            )


@renderers.dispatch_for(DBNotifySQLOp)
def _render(autogen_context: AutogenContext, op: DBNotifySQLOp) -> list[str]:
    autogen_context.imports.add(_IMPORT)
    prefix = autogen_context.opts.get("alembic_module_prefix", "op.")
    return render(op, prefix)


def render(op: DBNotifySQLOp, prefix: str = "op.") -> list[str]:
    """The lines of Python that make ``op``: valid for any text, each
    statement the ``repr()`` of its lines, one per line, concatenated."""
    lines = [f"# Flask-DBNotify, {_printable(change)}" for change in op.changes]
    lines.append(f"{prefix}dbnotify_sql([")
    for statement in op.statements:
        pieces = [repr(piece) for piece in statement.splitlines(keepends=True)] or ["''"]
        lines.append(f"    {pieces[0]}")
        lines += [f"        {piece}" for piece in pieces[1:]]
        lines[-1] += ","
    lines.append("])")
    return lines


def _printable(text: str) -> str:
    """``text`` with what could end a comment line escaped, and no ':' at
    the end (Alembic's printer would indent the lines after it)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text).rstrip(":")


def _ours(autogen_context: AutogenContext, say: bool) -> Any:
    """The current app's Flask-DBNotify state, if the migration's database
    is the one it is configured for; else None (logged why, if ``say``)."""
    state = current_app.extensions.get("dbnotify") if has_app_context() else None
    connection = autogen_context.connection
    if state is None or connection is None:
        return None
    try:
        why = state.backend.admin.foreign(connection)
    except DBNotifyError as exc:
        why = str(exc)
    if why is None:
        return state
    if say:
        _log.info("Flask-DBNotify writes nothing into this revision: %s", why)
    return None


def _hide_kept_tables(
    autogen_context: AutogenContext, upgrade_ops: UpgradeOps, schemas: Any
) -> None:
    """Before Alembic reads the database: a name filter that leaves our
    tables unread, as ``include_name`` in env.py would (Alembic would drop
    them, being in no model, and warns about types it does not know)."""
    state = _ours(autogen_context, say=False)
    # Where env.py's include_name goes (a list since Alembic 1.5).
    filters = getattr(autogen_context, "_name_filters", None)
    if state is not None and isinstance(filters, list):
        filters.append(_kept_filter(state.backend.admin.kept_tables(), autogen_context.dialect))


def _kept_filter(kept: tuple[str | None, frozenset[str]], dialect: Any) -> Any:
    """An ``include_name`` function that is false for our tables and what
    is theirs (indexes, columns)."""
    default = dialect.default_schema_name
    schema, names = kept

    def include(name: str | None, type_: str, parents: dict[str, Any]) -> bool:
        table = name if type_ == "table" else parents.get("table_name")
        where = parents.get("schema_name") or default
        return not (table in names and where == (schema or default))

    return include


def _compare(autogen_context: AutogenContext, upgrade_ops: UpgradeOps, schemas: Any) -> None:
    """Add an ``op.dbnotify_sql()`` when the migration's database does not
    match the current app's watches (and take out drops of our tables
    where :func:`_hide_kept_tables` could not run)."""
    state = _ours(autogen_context, say=True)
    if state is None:
        return
    admin = state.backend.admin
    include = _kept_filter(admin.kept_tables(), autogen_context.dialect)
    upgrade_ops.ops = [
        op
        for op in upgrade_ops.ops
        if include(
            getattr(op, "table_name", None), "table", {"schema_name": getattr(op, "schema", None)}
        )
    ]
    try:
        revision = admin.revision(list(state.ext.watches.values()))
    except DBNotifyError as exc:
        _log.warning("Flask-DBNotify writes nothing into this revision: %s", exc)
        return
    if revision is None:
        return
    for change in revision.changes:
        _log.info("Detected Flask-DBNotify change: %s", change)
    # First: its downgrade then comes last, after tables it names are back.
    upgrade_ops.ops.insert(0, DBNotifySQLOp(revision.upgrade, revision.downgrade, revision.changes))


# Alembic 1.18 runs comparators by priority: the filter first, the
# comparison after Alembic's. Before 1.18 they ran in the order registered,
# Alembic's first: too late for the filter, so the comparison takes out
# what Alembic made of our tables.
_priority = getattr(alembic.util, "DispatchPriority", None)
if _priority is None:
    comparators.dispatch_for("schema")(_compare)
else:
    comparators.dispatch_for("schema", priority=_priority.FIRST)(_hide_kept_tables)
    comparators.dispatch_for("schema", priority=_priority.LAST)(_compare)
