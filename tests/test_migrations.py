"""Triggers in migrations: a real Flask-Migrate project in a folder of the
test's, driven by the real ``flask db`` commands, on PostgreSQL, SQLite and MySQL;
then Alembic's autogenerate and the operation in this process."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import produce_migrations
from alembic.migration import MigrationContext
from alembic.operations import Operations

from flask_dbnotify import ChangeEvent, Status, row_changed
from flask_dbnotify.migrations import DBNotifySQLOp, render

from ._helpers import SQL, Backend, Recorder, pg_triggers, roles_on

#: The app of the project: a model, Flask-SQLAlchemy, Flask-Migrate and
#: Flask-DBNotify, its watches (keyword arguments of watch()) from the
#: environment, so that one project sees its watches change.
APP = """
import json
import os

from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

from flask_dbnotify import DBNotify

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["PROJECT_DATABASE"]
app.config["DBNOTIFY_DATABASE_URI"] = os.environ["PROJECT_DBNOTIFY_DATABASE"]
app.config["DBNOTIFY_AUTOSTART"] = False
db = SQLAlchemy(app)


class Order(db.Model):
    __tablename__ = "orders"
    id = db.Column(db.Integer, primary_key=True)
    note = db.Column(db.Text)
    status = db.Column(db.Text)


migrate = Migrate(app, db)
dbnotify = DBNotify(app)
for watch in json.loads(os.environ["PROJECT_WATCHES"]):
    dbnotify.watch(**watch)
"""
#: Every ``flask`` command costs about a second: each is bounded by this.
COMMAND_WAIT = 60.0
EVERYTHING = [{"target": "orders"}]
SOME = [{"target": "orders", "operations": ["insert", "update"], "columns": ["id", "status"]}]


class Project:
    """A Flask-Migrate project in ``root``: ``app.py`` and, once ``flask db
    init`` has run, ``migrations/``."""

    def __init__(self, root: Path, backend: Backend) -> None:
        self.root = root
        (root / "app.py").write_text(APP)
        self.env = {
            **os.environ,
            # This checkout's flask_dbnotify, as the spawn fixture's children.
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            # Bare: psycopg 3 under SQLAlchemy 2.1 (this process's
            # migrations use psycopg2).
            "PROJECT_DATABASE": backend.url,
            "PROJECT_DBNOTIFY_DATABASE": backend.url,
        }

    def flask(self, *args: str, watches: list[dict[str, Any]]) -> str:
        """Run ``flask --app app ARGS`` with the app watching ``watches``;
        its output (stdout and stderr)."""
        try:
            done = subprocess.run(
                [sys.executable, "-m", "flask", "--app", "app", *args],
                cwd=self.root,
                env={**self.env, "PROJECT_WATCHES": json.dumps(watches)},
                capture_output=True,
                text=True,
                timeout=COMMAND_WAIT,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"flask {' '.join(args)} still running after {exc.timeout}s"
            ) from None
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"flask {' '.join(args)} exited {done.returncode}:\n{output}"
        return output

    def revisions(self) -> set[Path]:
        return set((self.root / "migrations" / "versions").glob("*.py"))

    def migrate(self, message: str, watches: list[dict[str, Any]]) -> str | None:
        """``flask db migrate``: the new revision's text, or None when it
        wrote none (Flask-Migrate writes none without changes)."""
        before = self.revisions()
        output = self.flask("db", "migrate", "-m", message, watches=watches)
        made = self.revisions() - before
        if not made:
            assert "No changes in schema detected" in output, output
            return None
        (path,) = made
        text = path.read_text()
        compile(text, str(path), "exec")
        return text


def definitions(backend: Backend) -> list[Any]:
    """Every object of Flask-DBNotify's as the database defines it: on
    PostgreSQL with the grants and comments of its functions."""
    if backend.mysql:
        triggers = backend.sql(
            "SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE, ACTION_TIMING, EVENT_MANIPULATION, "
            "ACTION_STATEMENT FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE() "
            "AND TRIGGER_NAME LIKE 'dbnotify%' ORDER BY 1"
        )
        tables = backend.sql(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_NAME LIKE 'dbnotify%' ORDER BY 1"
        )
        return [tuple(row) for row in triggers + tables]
    if not backend.pg:
        rows = backend.sql(
            "SELECT type, name, sql FROM sqlite_schema WHERE name LIKE 'dbnotify%' ORDER BY 2"
        )
        return [tuple(row) for row in rows]
    functions = backend.sql(
        "SELECT proname, pg_get_functiondef(oid), proacl::text, obj_description(oid, 'pg_proc') "
        "FROM pg_proc WHERE proname LIKE 'dbnotify%' ORDER BY 1"
    )
    triggers = backend.sql(
        "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
        "WHERE tgname LIKE 'dbnotify%' ORDER BY 1, 2"
    )
    tables = backend.sql("SELECT relname FROM pg_class WHERE relname LIKE 'dbnotify%' ORDER BY 1")
    return [tuple(row) for row in functions + triggers + tables]


def database(backend: Backend) -> str:
    """The database's name, as MySQL's statements qualify names with it."""
    return str(sa.make_url(backend.url).database)


def status(backend: Backend, watches: list[dict[str, Any]]) -> Status:
    app, ext = backend.make_app()
    for watch in watches:
        ext.watch(**watch)
    return ext.status(app)


def delivered(backend: Backend, watches: list[dict[str, Any]], statement: str) -> ChangeEvent:
    """The event a listener of an app watching ``watches`` gets for ``statement``."""
    app, ext = backend.make_app()
    for watch in watches:
        ext.watch(**watch)
    recorder = Recorder()
    with row_changed.connected_to(recorder):
        ext.start(app)
        backend.sql(statement)
        events = recorder.wait_for(1, f"an event of {statement!r} through migrated triggers")
    ext.close(app)
    return events[0]  # type: ignore[no-any-return]


def assert_matches(backend: Backend, watches: list[dict[str, Any]]) -> None:
    found = status(backend, watches)
    assert set(found.watches.values()) <= {"installed"}, found
    assert not found.orphaned, found


@pytest.mark.backends(
    "postgresql", "sqlite", "mysql"
)  # WAL capture: see test_wal_capture_writes_nothing
def test_a_watch_through_its_migrations(backend: Backend, tmp_path: Path) -> None:
    project = Project(tmp_path, backend)
    project.flask("db", "init", watches=[])
    orders = project.migrate("orders", watches=[])
    assert orders is not None and "dbnotify" not in orders, orders
    project.flask("db", "upgrade", watches=[])
    assert definitions(backend) == []

    # A watch: its triggers, missing, are written into the revision.
    first_revision = project.migrate("watch orders", watches=EVERYTHING)
    assert first_revision is not None and "op.dbnotify_sql([" in first_revision
    assert "import flask_dbnotify.migrations" in first_revision
    # The revision holds its SQL: upgrading with other watches changes nothing.
    project.flask("db", "upgrade", watches=[])
    report = project.flask("dbnotify", "status", watches=EVERYTHING)
    assert "installed  orders" in report and "orphaned" not in report, report
    event = delivered(backend, EVERYTHING, "INSERT INTO orders (id, note) VALUES (1, 'tea')")
    assert (event.op, event.new) == ("INSERT", {"id": 1, "note": "tea", "status": None})
    first, old_names = definitions(backend), {name for name, _ in backend.triggers()}
    for name in old_names:
        assert name in first_revision, f"trigger {name} not in the revision"

    # Nothing changed: nothing written.
    assert project.migrate("again", watches=EVERYTHING) is None

    # The watch changes: the revision replaces the triggers.
    second_revision = project.migrate("fewer columns", watches=SOME)
    assert second_revision is not None
    project.flask("db", "upgrade", watches=[])
    assert_matches(backend, SOME)
    event = delivered(
        backend, SOME, "UPDATE orders SET status = 'paid', note = 'tea!' WHERE id = 1"
    )
    assert (event.op, event.new) == ("UPDATE", {"id": 1, "status": "paid"})
    second = definitions(backend)
    new_names = {name for name, _ in backend.triggers()}
    assert new_names and not new_names & old_names
    upgrade, downgrade = second_revision.split("def downgrade")
    for name in new_names:
        assert name in upgrade, f"new trigger {name} not in the upgrade"
    # Names as written: "name" (PostgreSQL, SQLite), `database`.`name` (MySQL).
    upgrade, downgrade = (
        text.replace(f"`{database(backend)}`.", "").replace('"', "").replace("`", "")
        for text in (upgrade, downgrade)
    )
    for name in old_names:
        assert f"DROP TRIGGER IF EXISTS {name}" in upgrade, f"{name} not dropped"
        assert f"CREATE TRIGGER {name}" in downgrade, f"{name} not restored"

    # Downgrade: the previous triggers, exactly as they were.
    project.flask("db", "downgrade", watches=[])
    assert definitions(backend) == first
    assert status(backend, SOME).watches == {"orders": "outdated"}
    assert_matches(backend, EVERYTHING)
    project.flask("db", "upgrade", watches=[])
    assert definitions(backend) == second

    # The watch goes: its triggers are dropped.
    third_revision = project.migrate("no watch", watches=[])
    assert third_revision is not None and "(orphaned)" in third_revision
    project.flask("db", "upgrade", watches=[])
    assert backend.triggers() == []
    assert_matches(backend, [])

    # Down to nothing, through every revision's downgrade.
    project.flask("db", "downgrade", "base", watches=[])
    assert definitions(backend) == []
    assert not backend.table_exists("orders")


# -- autogenerate and the operation, in this process -----------------------------


def autogenerate(app: Any, connection: sa.Connection) -> list[Any]:
    """What Alembic's autogenerate puts in a revision's upgrade, as
    ``flask db migrate`` runs it (in an app context)."""
    metadata = sa.MetaData()
    sa.Table("orders", metadata, sa.Column("id", sa.Integer, primary_key=True))
    with app.app_context():
        context = MigrationContext.configure(connection, opts={"target_metadata": metadata})
        script = produce_migrations(context, metadata)
    assert script.upgrade_ops is not None
    return list(script.upgrade_ops.ops)


def ours(ops: list[Any]) -> list[Any]:
    """The operations that are Flask-DBNotify's, or touch its tables."""
    return [
        op
        for op in ops
        if isinstance(op, DBNotifySQLOp)
        or str(getattr(op, "table_name", "")).startswith("dbnotify")
    ]


@pytest.mark.backends("postgresql", "sqlite", "mysql")  # WAL capture writes no operation at all
def test_autogenerate_writes_install_sql_once(backend: Backend) -> None:
    backend.sql("CREATE TABLE orders (id integer PRIMARY KEY, note text)")
    app, ext = backend.make_app()
    ext.watch("orders")
    with backend.engine().connect() as connection:
        (op,) = ours(autogenerate(app, connection))
        # A first install: what install-triggers would run (after its lock).
        assert op.statements[backend.pg :] == ext.install_sql(app)
        assert op.changes[0] == "watch 'orders' (missing)"
        ext.install_triggers(app)
        # Installed (our tables included): nothing of ours, nor drops of our tables.
        assert ours(autogenerate(app, connection)) == []
    if not backend.pg:
        return
    assert "pg_advisory_xact_lock" in op.statements[0]
    # A function that others may run is made safe again.
    (function,) = backend.sql("SELECT proname FROM pg_proc WHERE proname LIKE 'dbnotify_%_i_%'")[0]
    backend.sql(f"GRANT EXECUTE ON FUNCTION {function}() TO PUBLIC")
    assert ext.status(app).warnings
    with backend.engine().begin() as connection:
        (op,) = ours(autogenerate(app, connection))
        assert op.changes == [f"function public.{function}() (executable by others)"]
        Operations(MigrationContext.configure(connection)).dbnotify_sql(op.statements)
    assert ext.status(app).warnings == []


@pytest.mark.backends("postgresql", "sqlite", "mysql")  # the other database is of the same kind
def test_another_database_gets_no_operation(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend.sql("CREATE TABLE orders (id integer PRIMARY KEY, note text)")
    app, ext = backend.make_app()
    ext.watch("orders")
    if backend.pg:
        other = sa.make_url(backend.url).set(database="postgres", drivername="postgresql+psycopg2")
        engine = sa.create_engine(other)
    elif backend.mysql:
        engine = sa.create_engine(sa.make_url(backend.url).set(database="mysql"))
    else:
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    caplog.set_level(logging.INFO, logger="alembic.autogenerate.dbnotify")
    try:
        with engine.connect() as connection:
            assert ours(autogenerate(app, connection)) == []
    finally:
        engine.dispose()
    assert "Flask-DBNotify writes nothing into this revision: the migration's database is" in (
        caplog.text
    )


def test_wal_capture_writes_nothing(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    app, ext = make_app(DBNOTIFY_CAPTURE="wal")
    ext.watch("orders")
    url = sa.make_url(app.config["DBNOTIFY_DATABASE_URI"]).set(drivername="postgresql+psycopg2")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            assert ours(autogenerate(app, connection)) == []
    finally:
        engine.dispose()
    assert "run `flask dbnotify install-triggers` after `flask db upgrade`" in caplog.text


@pytest.mark.backends("postgresql", "sqlite", "mysql")  # no WAL-specific behaviour
def test_the_operation_runs_statements_as_written(backend: Backend) -> None:
    # Neither a bind parameter (':x') nor '%' formatting.
    statements = [
        "CREATE TABLE t (a text DEFAULT ':x %s 100%')",
        "INSERT INTO t (a) VALUES ('it''s :y %(z)s')",
    ]
    with backend.engine().begin() as connection:
        Operations(MigrationContext.configure(connection)).dbnotify_sql(statements)
    backend.sql("INSERT INTO t () VALUES ()" if backend.mysql else "INSERT INTO t DEFAULT VALUES")
    assert sorted(backend.sql("SELECT a FROM t")) == [(":x %s 100%",), ("it's :y %(z)s",)]
    # Offline (`flask db upgrade --sql`): printed as written.
    buffer = io.StringIO()
    dialect = "postgresql" if backend.pg else backend.name
    offline = MigrationContext.configure(
        dialect_name=dialect, opts={"as_sql": True, "output_buffer": buffer}
    )
    Operations(offline).dbnotify_sql(statements)
    assert [s + ";" for s in statements] == [
        line for line in buffer.getvalue().splitlines() if line
    ]
    with pytest.raises(TypeError, match="a list of statements"):
        Operations(offline).dbnotify_sql(statements[0])


def test_a_revision_is_python_for_any_text() -> None:
    statements = [
        "plain",
        "two\nlines\r\nand a \r",
        "quotes ' \" ''' \"\"\" \\ \\n",
        "\x00 \u2028 \ud800 é 😀 \t",
        "",
        "ends in a colon:",
    ]
    changes = ["watch 'a\nb' (missing)", "colon at the end:", "\x1b[31m"]
    op = DBNotifySQLOp(statements, ["undo"], changes)
    lines = render(op, "op.")
    assert all(line.startswith("#") for line in lines[: len(changes)])
    assert not any(line.rstrip().endswith(":") for line in lines), lines
    source = "def upgrade():\n" + textwrap.indent("\n".join(lines), "    ")
    calls: list[list[str]] = []
    namespace: dict[str, Any] = {"op": type("Op", (), {"dbnotify_sql": staticmethod(calls.append)})}
    exec(compile(source, "revision", "exec"), namespace)
    namespace["upgrade"]()
    assert calls == [statements]
    back = op.reverse()
    assert (back.statements, back.reverse_statements) == (["undo"], statements)
    with pytest.raises(ValueError, match="does not know what undoes it"):
        DBNotifySQLOp(statements).reverse()


#: Makes an app with Flask-DBNotify: with "blocked", where Alembic cannot be
#: imported; either way, it must not import Alembic.
WITHOUT_ALEMBIC = """
import sys


class NoAlembic:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "alembic":
            raise ImportError("no alembic here")


if sys.argv[1] == "blocked":
    sys.meta_path.insert(0, NoAlembic())

from flask import Flask

from flask_dbnotify import DBNotify

app = Flask("app")
app.config["DBNOTIFY_DATABASE_URI"] = "sqlite:///unused.db"
app.config["DBNOTIFY_AUTOSTART"] = False
DBNotify(app)
assert "alembic" not in sys.modules, "alembic was imported"
if sys.argv[1] == "blocked":
    try:
        import flask_dbnotify.migrations
    except ImportError:
        pass
    else:
        raise AssertionError("alembic was not blocked")
print("ok")
"""


@pytest.mark.parametrize("alembic", ["blocked", "installed"])
def test_alembic_is_no_dependency(alembic: str) -> None:
    """Without Alembic, and with Alembic installed but not loaded (no
    Flask-Migrate), an app is made without importing it."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_ALEMBIC, alembic],
        capture_output=True,
        text=True,
        timeout=COMMAND_WAIT,
    )
    assert done.stdout.strip() == "ok", done.stdout + done.stderr


@pytest.mark.backends("postgresql", "sqlite", "mysql")  # no WAL-specific behaviour
def test_a_table_not_made_yet_waits_for_the_next_revision(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """A model and its watch added together: the revision makes the table,
    the next one its triggers (the DDL is read from the table)."""
    app, ext = backend.make_app()
    ext.watch("orders")
    with backend.engine().connect() as connection:
        assert ours(autogenerate(app, connection)) == []
    assert "Flask-DBNotify writes nothing into this revision: table 'orders' does not exist" in (
        caplog.text
    )


def test_another_roles_function_is_not_made_again_as_ours(
    sql: SQL, pg_url: str, make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A downgrade makes functions again with the rights of the role that
    runs it: a function of another role's (that role wrote its body) must
    not become the migrating role's."""
    sql("CREATE TABLE orders (id integer PRIMARY KEY, note text)")
    app, ext = make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    app, ext = make_app()
    ext.watch("orders", columns=["id"])
    engine = sa.create_engine(sa.make_url(pg_url).set(drivername="postgresql+psycopg2"))
    with roles_on(sql, pg_url) as make_role:
        other = make_role("owner")
        (function,) = sql("SELECT proname FROM pg_proc WHERE proname LIKE 'dbnotify_%_i_%'")[0]
        sql(f'ALTER FUNCTION {function}() OWNER TO "{other.name}"')
        try:
            with engine.connect() as connection:
                assert ours(autogenerate(app, connection)) == []
        finally:
            engine.dispose()
    assert f"function public.{function}() belongs to the role {other.name}" in caplog.text


def test_a_new_partition_gets_its_triggers_and_loses_them_on_downgrade(
    sql: SQL, pg_url: str, make_app: Any
) -> None:
    sql("CREATE TABLE orders (id int, year int, PRIMARY KEY (id, year)) PARTITION BY LIST (year)")
    sql("CREATE TABLE orders_2025 PARTITION OF orders FOR VALUES IN (2025)")
    app, ext = make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    sql("CREATE TABLE orders_2026 PARTITION OF orders FOR VALUES IN (2026)")
    assert ext.status(app).watches == {"orders": "outdated"}
    engine = sa.create_engine(sa.make_url(pg_url).set(drivername="postgresql+psycopg2"))
    try:
        with engine.begin() as connection:
            (op,) = ours(autogenerate(app, connection))
            assert op.changes == ["watch 'orders' (outdated)"]
            Operations(MigrationContext.configure(connection)).dbnotify_sql(op.statements)
        assert ext.status(app).watches == {"orders": "installed"}
        triggers = pg_triggers(sql)
        assert {table for _, table in triggers} == {"orders", "orders_2025", "orders_2026"}
        with engine.begin() as connection:
            Operations(MigrationContext.configure(connection)).dbnotify_sql(op.reverse().statements)
    finally:
        engine.dispose()
    assert [t for t in triggers if t[1] != "orders_2026"] == pg_triggers(sql)
