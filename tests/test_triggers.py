"""Installing, inspecting and removing triggers: API, CLI and the catalog."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
import sqlalchemy as sa
from flask import Flask
from psycopg2 import sql as pgsql
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_dbnotify import DBNotify, DBNotifyError, WatchError, notification_received, row_changed

from ._helpers import (
    SQL,
    Backend,
    Recorder,
    listening,
    marker,
    pg_objects,
    pg_triggers,
    poll_until,
    quote,
)

MakeApp = Callable[..., tuple[Flask, DBNotify]]

ORDERS = "CREATE TABLE orders (id integer PRIMARY KEY, item text, qty integer)"


@pytest.mark.backends("postgresql", "sqlite", "mysql")  # the triggers' own DDL
def test_install_is_idempotent(backend: Backend, events: Recorder) -> None:
    """Installing twice leaves one set of working triggers, one per
    operation, named dbnotify_*; status goes from missing to installed."""
    backend.sql(ORDERS)
    app, ext = backend.make_app()
    ext.watch("orders")
    assert ext.status(app).watches == {"orders": "missing"}
    ext.install_triggers(app)
    first = backend.triggers()
    ext.install_triggers(app)
    assert backend.triggers() == first
    # insert, update, delete; and truncate on PostgreSQL (SQLite has no TRUNCATE)
    assert len(first) == (4 if backend.pg else 3)
    assert all(table == "orders" and name.startswith("dbnotify_") for name, table in first)
    status = ext.status(app)
    assert status.watches == {"orders": "installed"} and status.orphaned == []
    ext.start(app)
    backend.sql("INSERT INTO orders VALUES (1, 'a', 1)")
    assert [e.pk for e in events.wait_for(1)] == [1]
    events.assert_no_more(1, marker(ext, app))


@pytest.mark.parametrize("bad", ["missing_table", "nokey", "orders_bad_column"])
def test_install_is_all_or_nothing(backend: Backend, bad: str) -> None:
    """If one watch cannot be installed (no such table, no primary key, no
    such column), nothing of any watch is installed, journal included."""
    backend.sql(ORDERS)
    backend.sql("CREATE TABLE nokey (a integer, b text)")
    backend.sql("CREATE TABLE other (id integer PRIMARY KEY, v text)")
    app, ext = backend.make_app()
    ext.watch("other")
    if bad == "orders_bad_column":
        ext.watch("orders", columns=["qty", "ghost_col"])
    else:
        ext.watch(bad)
    name = "orders" if bad == "orders_bad_column" else bad
    with pytest.raises(WatchError, match="ghost_col" if name == "orders" else name):
        ext.install_triggers(app)
    assert backend.objects() == []
    assert ext.status(app).watches == {"other": "missing", name: "error"}


@pytest.fixture()
def limited_url(sql: SQL, pg_url: str) -> Iterator[str]:
    """URL of the scratch database for a role that is not a superuser."""
    role = f"dbnotify_limited_{uuid.uuid4().hex[:12]}"
    ident = pgsql.Identifier(role).as_string(sql.conn)
    try:
        sql(f"CREATE ROLE {ident} LOGIN PASSWORD 'limited'")
    except psycopg2.errors.InsufficientPrivilege:
        pytest.skip("the test server's user cannot create roles")
    database = pgsql.Identifier(make_url(pg_url).database or "").as_string(sql.conn)
    sql(f"GRANT CREATE ON DATABASE {database} TO {ident}")
    sql(f"GRANT USAGE, CREATE ON SCHEMA public TO {ident}")
    yield (
        make_url(pg_url)
        .set(username=role, password="limited")
        .render_as_string(hide_password=False)
    )
    sql(f"DROP OWNED BY {ident} CASCADE")
    sql(f"DROP ROLE {ident}")


def test_install_failing_midway_leaves_nothing(
    limited_url: str, make_app: MakeApp, sql: SQL
) -> None:
    """When the database refuses a trigger after others were created, the
    whole install is rolled back."""
    app, ext = make_app(DBNOTIFY_DATABASE_URI=limited_url)
    role = str(make_url(limited_url).username)
    sql(ORDERS)
    owner = pgsql.SQL("ALTER TABLE orders OWNER TO {}").format(pgsql.Identifier(role))
    sql(owner.as_string(sql.conn))
    sql("CREATE TABLE locked (id int PRIMARY KEY)")  # owned by someone else
    ext.watch("orders")
    ext.watch("locked")
    with pytest.raises((DBNotifyError, psycopg2.Error, sa.exc.SQLAlchemyError)) as info:
        ext.install_triggers(app)
    assert "locked" in str(info.value)
    assert pg_objects(sql) == []
    assert ext.status(app).watches == {"orders": "missing", "locked": "missing"}


@pytest.mark.backends("postgresql", "sqlite", "mysql")  # the triggers' own DDL
def test_install_sql_changes_nothing_and_works_when_run(backend: Backend, events: Recorder) -> None:
    """install_sql() and `install-triggers --sql` only print; the printed
    script, run as is (as psql or the sqlite3 shell would), installs
    working triggers."""
    backend.sql(ORDERS)
    app, ext = backend.make_app()
    ext.watch("orders", columns=["qty"], when_changed=["qty"])
    statements = ext.install_sql(app)
    assert statements and all(isinstance(s, str) for s in statements)
    result = app.test_cli_runner().invoke(args=["dbnotify", "install-triggers", "--sql"])
    assert result.exit_code == 0, result.output
    assert all(s in result.output for s in statements)
    assert backend.objects() == []
    assert ext.status(app).watches == {"orders": "missing"}

    backend.script(result.output)
    assert ext.status(app).watches == {"orders": "installed"}
    ext.start(app)
    backend.sql("INSERT INTO orders VALUES (1, 'a', 1)")
    backend.sql("UPDATE orders SET item = 'b'")
    backend.sql("UPDATE orders SET qty = 2")
    got = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    assert [(e.op.value, e.new) for e in got] == [
        ("INSERT", {"id": 1, "qty": 1}),
        ("UPDATE", {"id": 1, "qty": 2}),
    ]


def _psql() -> str:
    found = shutil.which("psql")
    if found is None:
        from ._postgres import _binary_dirs

        found = next((str(d / "psql") for _, d in _binary_dirs() if (d / "psql").is_file()), None)
    if found is None:
        pytest.fail("no psql: install PostgreSQL's client or the test extra (pgserver)")
    return found


def catalog_of_ours(sql: SQL) -> list[tuple[Any, ...]]:
    """What install made: functions (body, rights, settings, comment),
    triggers (table, kind, function), tables (rights, comment)."""
    return sql(
        "SELECT 'function', p.proname, p.prosrc, p.prosecdef::text, p.proconfig::text, "
        "  p.proacl::text, obj_description(p.oid, 'pg_proc') "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'public' AND p.proname LIKE 'dbnotify%%' "
        "UNION ALL SELECT 'trigger', t.tgname, c.relname, t.tgtype::text, "
        "  t.tgnewtable || '/' || t.tgoldtable, p.proname, NULL "
        "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_proc p ON p.oid = t.tgfoid WHERE NOT t.tgisinternal "
        "UNION ALL SELECT 'relation', c.relname, c.relkind::text, NULL, NULL, "
        "  c.relacl::text, obj_description(c.oid, 'pg_class') "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relname LIKE 'dbnotify%%' "
        "ORDER BY 1, 2, 3"
    )


def test_sql_output_run_by_psql_makes_what_install_makes(
    pg_url: str, make_app: MakeApp, sql: SQL
) -> None:
    """`install-triggers --sql` piped into psql creates exactly the objects,
    rights and marks that install-triggers creates."""
    sql(ORDERS)
    sql("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    sql("CREATE TABLE parts (id int, k int, PRIMARY KEY (id, k)) PARTITION BY LIST (k)")
    sql("CREATE TABLE parts_1 PARTITION OF parts FOR VALUES IN (1)")
    app, ext = make_app()
    ext.watch("orders", columns=["qty"], when_changed=["qty"])
    ext.watch("ledger", durable=True)
    ext.watch("parts")
    script = app.test_cli_runner().invoke(args=["dbnotify", "install-triggers", "--sql"])
    assert script.exit_code == 0, script.output
    ran = subprocess.run(
        [_psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", pg_url],
        input=script.output,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    by_psql = catalog_of_ours(sql)
    assert len(by_psql) > 20
    assert ext.status(app).watches == dict.fromkeys(["orders", "ledger", "parts"], "installed")
    ext.uninstall_triggers(app, everything=True)
    assert catalog_of_ours(sql) == []
    ext.install_triggers(app)
    assert catalog_of_ours(sql) == by_psql


def test_status_follows_the_watch_definition(backend: Backend, events: Recorder) -> None:
    """missing -> installed -> outdated when the watch changes; installing
    the new definition replaces the old triggers (no double events)."""
    backend.sql(ORDERS)
    app, ext = backend.make_app()
    ext.watch("orders")
    assert ext.status(app).watches == {"orders": "missing"}
    ext.install_triggers(app)
    status = ext.status(app)
    assert status.watches == {"orders": "installed"}
    assert status.orphaned == []

    changes: list[dict[str, Any]] = [
        {"columns": ["qty"]},
        {"when_changed": ["qty"]},
        {"operations": "insert"},
    ]
    for options in changes:
        other_app, other = backend.make_app()
        other.watch("orders", **options)
        status = other.status(other_app)
        assert status.watches == {"orders": "outdated"}, options
        assert status.details["orders"]

    new_app, new = backend.make_app()
    new.watch("orders", columns=["qty"])
    new.install_triggers(new_app)
    assert new.status(new_app).watches == {"orders": "installed"}
    assert ext.status(app).watches == {"orders": "outdated"}
    # + TRUNCATE on PostgreSQL; WAL and binary-log capture have no trigger
    no_trigger = backend.wal or backend.binlog
    assert len(backend.triggers()) == (0 if no_trigger else 4 if backend.pg else 3)
    new.start(new_app)
    backend.sql("INSERT INTO orders VALUES (1, 'a', 1)")
    (event,) = events.wait_for(1)
    events.assert_no_more(1, marker(new, new_app))
    assert event.new == {"id": 1, "qty": 1}


def test_status_reports_errors_with_details(backend: Backend) -> None:
    """A watch the database cannot satisfy has status 'error' and says why;
    install_triggers() and install_sql() raise WatchError naming the problem."""
    backend.sql(ORDERS)
    backend.sql("CREATE TABLE nokey (a integer, line text)")
    app, ext = backend.make_app()
    ext.watch("orders", columns=["ghost_column"])
    ext.watch("missing_table")
    ext.watch("nokey")
    status = ext.status(app)
    assert status.watches == {
        "orders": "error",
        "missing_table": "error",
        "nokey": "error",
    }
    assert "ghost_column" in status.details["orders"]
    assert "missing_table" in status.details["missing_table"]
    assert "does not exist" in status.details["missing_table"]
    assert "primary key" in status.details["nokey"]

    cases: list[tuple[str, dict[str, Any], str]] = [
        ("orders", {"when_changed": ["ghost_column"]}, "ghost_column"),
        ("missing_table", {}, "missing_table"),
        ("nokey", {}, "primary key"),
    ]
    for target, options, expected in cases:
        one_app, one = backend.make_app()
        one.watch(target, **options)
        with pytest.raises(WatchError, match=expected):
            one.install_triggers(one_app)
        with pytest.raises(WatchError, match=expected):
            one.install_sql(one_app)


@pytest.mark.backends("postgresql", "sqlite", "mysql")  # the triggers' own DDL
def test_status_lists_orphaned_objects(backend: Backend) -> None:
    """Triggers on tables no watch covers are listed as orphaned. On
    PostgreSQL, functions left by a dropped table are too, and installing
    clears them; on SQLite (no functions: a dropped table takes its
    triggers along) uninstall_triggers(everything=True) removes orphans."""
    backend.sql("CREATE TABLE a (id integer PRIMARY KEY)")
    backend.sql("CREATE TABLE b (id integer PRIMARY KEY)")
    old_app, old = backend.make_app()
    old.watch("a")
    old.watch("b")
    old.install_triggers(old_app)
    per_table = 4 if backend.pg else 3  # + TRUNCATE on PostgreSQL
    b_triggers = [name for name, table in backend.triggers() if table == "b"]
    assert len(b_triggers) == per_table

    app, ext = backend.make_app()
    ext.watch("a")
    status = ext.status(app)
    assert status.watches == {"a": "installed"}
    assert len(status.orphaned) == per_table
    for name in b_triggers:
        assert any(name in line for line in status.orphaned), status.orphaned

    if backend.pg:
        # PostgreSQL only: trigger functions outlive their table.
        backend.sql("DROP TABLE b")  # its triggers go, their functions stay
        status = ext.status(app)
        assert len(status.orphaned) == 4
        for name in b_triggers:
            assert any(name in line and "function" in line for line in status.orphaned)
        ext.install_triggers(app)
        assert ext.status(app).orphaned == []
    else:
        ext.uninstall_triggers(app)
        assert [table for _, table in backend.triggers()] == ["b"] * 3
        ext.uninstall_triggers(app, everything=True)
        assert backend.triggers() == []
        assert ext.status(app).orphaned == []


def test_uninstall_stops_delivery(backend: Backend, events: Recorder) -> None:
    """After uninstall_triggers(), writes deliver nothing and status is
    missing; messages (the marker) still arrive."""
    backend.sql(ORDERS)
    app, ext = backend.make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    ext.start(app)
    ext.uninstall_triggers(app)
    assert backend.triggers() == []
    assert ext.status(app).watches == {"orders": "missing"}
    backend.sql("INSERT INTO orders VALUES (1, 'a', 1)")
    backend.sql("UPDATE orders SET qty = 2")
    backend.sql("DELETE FROM orders")
    events.assert_no_more(0, marker(ext, app))


def test_uninstall_everything_removes_every_object(make_app: MakeApp, sql: SQL) -> None:
    """uninstall_triggers(everything=True) removes every dbnotify_* object,
    including triggers no watch covers and the journal."""
    sql("CREATE TABLE a (id int PRIMARY KEY)")
    sql("CREATE TABLE b (id int PRIMARY KEY)")
    old_app, old = make_app()
    old.watch("a")
    old.watch("b")
    old.install_triggers(old_app)
    installed = pg_objects(sql)
    assert "relation dbnotify_journal" in installed
    assert len([o for o in installed if o.startswith("trigger")]) == 8

    app, ext = make_app()
    ext.watch("a")
    ext.uninstall_triggers(app, everything=True)
    assert pg_objects(sql) == []
    assert ext.status(app).watches == {"a": "missing"}
    assert ext.status(app).orphaned == []


def test_object_names_are_prefixed_short_and_distinct(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """Names start with dbnotify_, fit PostgreSQL's 63 bytes even for 63-character
    table names, and differ between tables and between watch definitions."""
    long_a, long_b = "a" * 62 + "x", "a" * 62 + "y"
    for name in (long_a, long_b):
        sql(
            pgsql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v int)")
            .format(pgsql.Identifier(name))
            .as_string(sql.conn)
        )
    app, ext = make_app()
    ext.watch(long_a)
    ext.watch(long_b)
    ext.install_triggers(app)
    names = [name for name, _ in pg_triggers(sql)]
    assert len(set(names)) == 8
    for name in names:
        assert name.startswith("dbnotify_")
        assert len(name.encode()) <= 63
    assert ext.status(app).watches == {long_a: "installed", long_b: "installed"}
    ext.start(app)
    sql(f'INSERT INTO "{long_a}" VALUES (1, 1)')
    sql(f'INSERT INTO "{long_b}" VALUES (2, 2)')
    got = events.wait_for(2)
    events.assert_no_more(2, marker(ext, app))
    assert [(e.table, e.pk) for e in got] == [(long_a, 1), (long_b, 2)]

    other_app, other = make_app()
    other.watch(long_a, columns=["id"])
    other.watch(long_b)
    other.install_triggers(other_app)
    renamed = {name for name, table in pg_triggers(sql) if table == long_a}
    assert len(renamed) == 4
    assert renamed.isdisjoint(names)
    assert {name for name, table in pg_triggers(sql) if table == long_b} <= set(names)


def test_unknown_table_is_a_watch_error(backend: Backend) -> None:
    """Installing a watch on a missing table names the table."""
    app, ext = backend.make_app()
    ext.watch("nowhere_table")
    with pytest.raises(WatchError, match="nowhere_table"):
        ext.install_triggers(app)


@pytest.mark.parametrize("option", ["columns", "when_changed"])
def test_unknown_column_is_a_watch_error(backend: Backend, option: str) -> None:
    """A column the table does not have is named in the error."""
    backend.sql(ORDERS)
    app, ext = backend.make_app()
    options: dict[str, Any] = {option: ["qty", "ghost_col"]}
    ext.watch("orders", **options)
    with pytest.raises(WatchError, match="ghost_col"):
        ext.install_triggers(app)
    with pytest.raises(WatchError, match="ghost_col"):
        ext.install_sql(app)


@pytest.mark.parametrize("option", ["columns", "when_changed"])
def test_unknown_column_of_a_model_fails_at_watch(sqlite_app: MakeApp, option: str) -> None:
    """With a model target the typo is caught by watch() itself (no database
    is asked: a SQLite app stands for either)."""

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(primary_key=True)
        qty: Mapped[int]

    app, ext = sqlite_app()
    options: dict[str, Any] = {option: ["ghost_col"]}
    with pytest.raises(ValueError, match="ghost_col"):
        ext.watch(Order, **options)
    assert ext.watches == {}


def test_table_without_primary_key_is_a_watch_error(make_app: MakeApp, sql: SQL) -> None:
    """A table without a primary key cannot be watched, and the error says so."""
    sql("CREATE TABLE logbook (at timestamptz, line text)")
    app, ext = make_app()
    ext.watch("logbook")
    with pytest.raises(WatchError, match="primary key") as info:
        ext.install_triggers(app)
    assert "logbook" in str(info.value)


def test_same_table_under_two_names_is_a_watch_error(make_app: MakeApp, sql: SQL) -> None:
    """'orders' and 'public.orders' are one table: installing both fails."""
    sql(ORDERS)
    app, ext = make_app()
    ext.watch("orders")
    ext.watch("public.orders")
    with pytest.raises(WatchError, match="same table"):
        ext.install_triggers(app)
    assert pg_triggers(sql) == []


def cli_status(app: Flask, backend: str = "postgresql") -> tuple[int, dict[str, str]]:
    """Exit code of `flask dbnotify status`, and the state it shows per name."""
    result = app.test_cli_runner().invoke(args=["dbnotify", "status"])
    states = {}
    lines = result.output.splitlines()
    for line in lines:
        state, _, rest = line.partition(" ")
        if state in ("installed", "outdated", "missing", "error", "orphaned"):
            states[rest.strip().split("  (")[0]] = state
    # After the watches: the database side's health, one "label: value" a line.
    if backend == "postgresql":
        assert any(line.startswith("notification queue: ") for line in lines), result.output
        assert "listeners: " in result.output, result.output
    elif backend == "wal":  # the slot, its leader and lag
        assert any(line.startswith("slot: ") for line in lines), result.output
    elif backend == "mysql":  # the capture, and why
        assert any(line.startswith("capture: triggers") for line in lines), result.output
    else:  # SQLite's health starts with its journal mode (listeners: once installed)
        assert any(line.startswith("journal mode: ") for line in lines), result.output
    return result.exit_code, states


@pytest.mark.backends("postgresql", "sqlite", "mysql")  # the triggers' own DDL
def test_cli_install_status_uninstall(backend: Backend) -> None:
    """`flask dbnotify status` names each watch and its state and exits 1
    unless all are installed; install/uninstall change what it shows;
    uninstall --sql prints and changes nothing; --all removes everything."""
    backend.sql(ORDERS)
    backend.sql("CREATE TABLE customers (id integer PRIMARY KEY)")
    app, ext = backend.make_app()
    ext.watch("orders")
    ext.watch("customers")
    runner = app.test_cli_runner()
    per_table = 4 if backend.pg else 3  # + TRUNCATE on PostgreSQL
    assert cli_status(app, backend.name) == (1, {"orders": "missing", "customers": "missing"})

    result = runner.invoke(args=["dbnotify", "install-triggers"])
    assert result.exit_code == 0, result.output
    assert len(backend.triggers()) == 2 * per_table
    assert cli_status(app, backend.name) == (0, {"orders": "installed", "customers": "installed"})
    if not backend.pg:  # the journal's own health lines
        status = runner.invoke(args=["dbnotify", "status"])
        assert ("capture: triggers" if backend.mysql else "journal mode: wal") in status.output
        assert "journal: 0 rows" in status.output

    result = runner.invoke(args=["dbnotify", "uninstall-triggers", "--sql"])
    assert result.exit_code == 0, result.output
    assert "DROP TRIGGER" in result.output
    assert len(backend.triggers()) == 2 * per_table

    result = runner.invoke(args=["dbnotify", "uninstall-triggers"])
    assert result.exit_code == 0, result.output
    assert backend.triggers() == []
    assert cli_status(app, backend.name) == (1, {"orders": "missing", "customers": "missing"})

    result = runner.invoke(args=["dbnotify", "uninstall-triggers", "--all"])
    assert result.exit_code == 0, result.output
    assert backend.objects() == []


def test_cli_status_shows_errors_and_orphans(make_app: MakeApp, sql: SQL) -> None:
    """Triggers no watch covers are listed; a watch in error is shown with
    its reason and makes the exit code 1."""
    sql(ORDERS)
    sql("CREATE TABLE customers (id int PRIMARY KEY)")
    old_app, old = make_app()
    old.watch("customers")
    old.install_triggers(old_app)
    app, ext = make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    # Orphans are reported, but every watch is installed: exit code 0.
    code, states = cli_status(app)
    assert code == 0
    assert states.pop("orders") == "installed"
    customers = [name for name, table in pg_triggers(sql) if table == "customers"]
    assert len(customers) == 4
    assert list(states.values()) == ["orphaned"] * 4
    assert all(any(name in line for line in states) for name in customers), states
    ext.watch("ghost_table")
    code, states = cli_status(app)
    assert code == 1
    assert states["ghost_table"] == "error"
    result = app.test_cli_runner().invoke(args=["dbnotify", "status"])
    assert "does not exist" in result.output


def test_cli_notify_reaches_a_running_listener(backend: Backend) -> None:
    """`flask dbnotify notify CHANNEL JSON` delivers; bad JSON is a usage error."""
    app, ext = backend.make_app()
    if not backend.pg:  # SQLite: messages go through the journal install-triggers makes
        ext.install_triggers(app)
    ext.start(app)
    runner = app.test_cli_runner()
    received = Recorder()
    with notification_received.connected_to(received, sender="cache"):
        result = runner.invoke(args=["dbnotify", "notify", "cache", '{"a":1}'])
        assert result.exit_code == 0, result.output
        assert received.wait_for(1, "messages on 'cache'") == [{"a": 1}]

        bad = runner.invoke(args=["dbnotify", "notify", "cache", "{a:1"])
        assert bad.exit_code == 2
        assert "JSON" in bad.output
        received.assert_no_more(1, lambda: ext.notify("cache", "marker", app=app))


def test_hostile_names_are_quoted_not_pasted(backend: Backend, events: Recorder) -> None:
    """A table, column, value and channel named like SQL injections install
    and deliver, and the victims table survives install, use and uninstall."""
    table = "x'; DROP TABLE victims; --"
    column = "q'\"); DROP TABLE victims; --"
    backend.sql("CREATE TABLE victims (id integer PRIMARY KEY)")
    backend.sql(
        f"CREATE TABLE {quote(table)} (id integer PRIMARY KEY, {quote(column)} text, other integer)"
    )
    app, ext = backend.make_app()
    ext.watch(table, columns=[column], when_changed=[column])
    ext.install_triggers(app)
    assert ext.status(app).watches == {table: "installed"}
    ext.start(app)
    own = Recorder()
    with row_changed.connected_to(own, sender=table):
        backend.sql(f"INSERT INTO {quote(table)} VALUES (1, ?, 0)", ("'; DROP TABLE victims; --",))
        backend.sql(f"UPDATE {quote(table)} SET other = 1")
        backend.sql(f"UPDATE {quote(table)} SET {quote(column)} = 'safe'")
        backend.sql(f"DELETE FROM {quote(table)}")
        got = own.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    assert [e.op.value for e in got] == ["INSERT", "UPDATE", "DELETE"]
    assert got[0].new == {"id": 1, column: "'; DROP TABLE victims; --"}
    assert got[1].changed == {column}
    assert backend.table_exists("victims")

    on_channel = Recorder()
    with notification_received.connected_to(on_channel, sender=table):
        ext.notify(table, table, app=app)
        assert on_channel.wait_for(1, "messages on the hostile channel") == [table]

    ext.uninstall_triggers(app, everything=True)
    assert backend.objects() == []
    assert backend.table_exists("victims")


@pytest.mark.parametrize(
    "migration",
    ["ALTER TABLE orders DROP COLUMN item", "ALTER TABLE orders RENAME COLUMN item TO thing"],
    ids=["drop-column", "rename-column"],
)
@pytest.mark.parametrize("columns", [None, ["item", "qty"]], ids=["all-columns", "columns="])
def test_migrating_a_watched_table_does_not_break_writes(
    make_app: MakeApp, sql: SQL, events: Recorder, migration: str, columns: list[str] | None
) -> None:
    """After a migration drops or renames a watched column, and before
    install-triggers is run again, every write still succeeds and is
    delivered with the table's new shape. The triggers name no column, so
    status stays 'installed' unless the watch itself names the lost column."""
    sql(ORDERS)
    sql("INSERT INTO orders VALUES (1, 'a', 1)")
    app, ext = make_app()
    ext.watch("orders", columns=columns)
    ext.install_triggers(app)
    ext.start(app)
    sql(migration)
    state = ext.status(app).watches["orders"]
    assert state == ("installed" if columns is None else "error")
    sql("INSERT INTO orders (id, qty) VALUES (2, 2)")
    sql("UPDATE orders SET qty = qty + 1")
    sql("DELETE FROM orders")
    assert sql("SELECT count(*) FROM orders") == [(0,)]
    got = events.wait_for(5)
    assert [(e.op.value, e.pk) for e in got] == [
        ("INSERT", 2),
        ("UPDATE", 1),
        ("UPDATE", 2),
        ("DELETE", 1),
        ("DELETE", 2),
    ]
    assert all(e.changed == {"qty"} for e in got[1:3])
    assert "item" not in got[0].new


def test_start_says_what_to_do_about_each_watch(
    make_app: MakeApp, sql: SQL, caplog: pytest.LogCaptureFixture
) -> None:
    """At start the listener compares the database with the watches: a
    watch of a table that does not exist is told to create it or fix the
    name (installing triggers cannot help); a table without triggers gets
    the command that installs them."""
    caplog.set_level(logging.WARNING, logger="flask_dbnotify")
    sql("CREATE TABLE orders (id int PRIMARY KEY)")
    app, ext = make_app()
    ext.watch("orders")
    ext.watch("ordrs")
    ext.start(app)

    def said() -> list[str]:
        return sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)

    assert poll_until(lambda: len(said()) >= 2 and said(), "two start-up warnings") == [
        "triggers for 'orders' are not installed: run `flask dbnotify install-triggers`",
        "watch 'ordrs' does not match the database: table 'ordrs' does not exist (looked in "
        "the search_path): create it first (run your migrations), or fix the name given to "
        "watch()",
    ]


def test_the_ddl_is_built_without_a_database(make_app: MakeApp, sql: SQL) -> None:
    """install_plan() needs no connection: from the watches and the tables as
    the catalog would describe them, it builds exactly the statements that
    install_sql() reads the database to build."""
    from flask_dbnotify.backends.postgresql.catalog import Catalog, Resolved
    from flask_dbnotify.backends.postgresql.ddl import install_plan

    offline = DBNotify()
    watches = [
        offline.watch("orders"),
        offline.watch('"Mixed Case"', durable=True, columns=["id", "note"]),
    ]
    tables = [
        ("orders", ("id", "item", "qty"), ("id",)),
        ("Mixed Case", ("id", "note", "extra"), ("id",)),
    ]
    resolved = [
        Resolved(w, 10_000 + n, "public", table, columns, pk, ((10_000 + n, "public", table),))
        for n, (w, (table, columns, pk)) in enumerate(zip(watches, tables, strict=True))
    ]
    empty = Catalog(schema_exists=True, functions={}, triggers=[], tables={}, exposed=[])
    built = install_plan(empty, resolved, "public")
    assert any("CREATE TRIGGER" in s and '"Mixed Case"' in s for s in built), built

    # The same tables in a real database: the same statements.
    sql("CREATE TABLE orders (id int PRIMARY KEY, item text, qty int)")
    sql('CREATE TABLE "Mixed Case" (id int PRIMARY KEY, note text, extra int)')
    app, ext = make_app()
    ext.watch("orders")
    ext.watch('"Mixed Case"', durable=True, columns=["id", "note"])
    assert ext.install_sql(app) == built


def test_the_sqlite_ddl_is_built_without_a_database(tmp_path: Path) -> None:
    """The same on SQLite: from the tables as the catalog would describe
    them, the statements install_sql() builds from the database file."""
    from flask_dbnotify.backends.sqlite.ddl import install_plan

    offline = DBNotify()
    watches = [offline.watch("orders", when_changed=["qty"]), offline.watch("Mixed Case")]
    tables = [
        # The last: the column that is the rowid.
        ("orders", [("id", "INTEGER"), ("item", "TEXT"), ("qty", "INTEGER")], ["id"], "id"),
        ("Mixed Case", [("id", "INTEGER"), ("note", "JSON")], ["id"], "id"),
    ]
    built = install_plan([], list(zip(watches, tables, strict=True)))
    assert any("CREATE TRIGGER" in s and '"Mixed Case"' in s for s in built), built

    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT, qty INTEGER)")
        conn.execute('CREATE TABLE "Mixed Case" (id INTEGER PRIMARY KEY, note JSON)')
    app = Flask(__name__)
    app.config.update(DBNOTIFY_DATABASE_URI=f"sqlite:///{path}", DBNOTIFY_AUTOSTART=False)
    ext = DBNotify(app)
    ext.watch("orders", when_changed=["qty"])
    ext.watch("Mixed Case")
    assert ext.install_sql(app) == built


def test_reinstalling_after_uninstall_everything_keeps_delivering(
    backend: Backend, events: Recorder
) -> None:
    """`uninstall-triggers --all` then `install-triggers` while an app keeps
    running (a reset during a deploy): changes after the reinstall arrive."""
    backend.sql(ORDERS)
    app, ext = listening(backend.make_app, "orders")
    for n in range(1, 4):
        backend.sql("INSERT INTO orders VALUES (?, 'before', 1)", (n,))
    events.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    del events.items[:]

    cli_app, cli = backend.make_app()
    cli.watch("orders")
    cli.uninstall_triggers(cli_app, everything=True)
    cli.install_triggers(cli_app)
    backend.sql("INSERT INTO orders VALUES (10, 'after', 1)")
    (event,) = events.wait_for(1, "the insert made after the reinstall")
    assert (event.op, event.pk) == ("INSERT", 10)
    events.assert_no_more(1, marker(ext, app))
