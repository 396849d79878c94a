"""Installing, inspecting and removing triggers: API, CLI and the catalog."""

from __future__ import annotations

import logging
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
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

from ._helpers import SQL, Recorder, marker, poll_until

MakeApp = Callable[..., tuple[Flask, DBNotify]]

ORDERS = "CREATE TABLE orders (id int PRIMARY KEY, item text, qty int)"


def triggers(sql: SQL) -> list[tuple[str, str]]:
    """(trigger, table) of every dbnotify trigger in the database."""
    return [
        (name, table)
        for name, table in sql(
            "SELECT t.tgname, c.relname FROM pg_trigger t "
            "JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE NOT t.tgisinternal ORDER BY c.relname, t.tgname"
        )
        if name.startswith("dbnotify")
    ]


def our_objects(sql: SQL) -> list[str]:
    """Every trigger, function, table, sequence or index whose name starts with dbnotify."""
    rows = sql(
        "SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal "
        "UNION ALL SELECT 'function ' || proname FROM pg_proc "
        "UNION ALL SELECT 'relation ' || relname FROM pg_class"
    )
    return sorted(name for (name,) in rows if name.split(" ", 1)[1].startswith("dbnotify"))


def test_install_is_idempotent(make_app: MakeApp, sql: SQL, events: Recorder) -> None:
    """Installing twice leaves one set of working triggers."""
    sql(ORDERS)
    app, ext = make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    first = triggers(sql)
    ext.install_triggers(app)
    assert triggers(sql) == first
    assert len(first) == 4  # insert, update, delete, and truncate
    assert ext.status(app).watches == {"orders": "installed"}
    ext.start(app)
    sql("INSERT INTO orders VALUES (1, 'a', 1)")
    assert [e.pk for e in events.wait_for(1)] == [1]
    events.assert_no_more(1, marker(ext, app))


def test_install_is_all_or_nothing(make_app: MakeApp, sql: SQL) -> None:
    """If one watch cannot be installed, nothing is installed."""
    sql(ORDERS)
    app, ext = make_app()
    ext.watch("orders")
    ext.watch("no_such_table")
    with pytest.raises(WatchError, match="no_such_table"):
        ext.install_triggers(app)
    assert our_objects(sql) == []
    assert ext.status(app).watches == {"orders": "missing", "no_such_table": "error"}


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
    assert our_objects(sql) == []
    assert ext.status(app).watches == {"orders": "missing", "locked": "missing"}


def test_install_sql_changes_nothing_and_works_when_run(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """install_sql() and `install-triggers --sql` only print; the printed
    script, run as is, installs working triggers."""
    sql(ORDERS)
    app, ext = make_app()
    ext.watch("orders", columns=["qty"], when_changed=["qty"])
    statements = ext.install_sql(app)
    assert statements and all(isinstance(s, str) for s in statements)
    result = app.test_cli_runner().invoke(args=["dbnotify", "install-triggers", "--sql"])
    assert result.exit_code == 0, result.output
    assert all(s in result.output for s in statements)
    assert our_objects(sql) == []
    assert ext.status(app).watches == {"orders": "missing"}

    sql(result.output)  # the whole script, as psql would run it
    assert ext.status(app).watches == {"orders": "installed"}
    ext.start(app)
    sql("INSERT INTO orders VALUES (1, 'a', 1)")
    sql("UPDATE orders SET item = 'b'")
    sql("UPDATE orders SET qty = 2")
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


def test_status_follows_the_watch_definition(make_app: MakeApp, sql: SQL, events: Recorder) -> None:
    """missing -> installed -> outdated when the watch changes; installing
    the new definition replaces the old triggers (no double events)."""
    sql(ORDERS)
    app, ext = make_app()
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
        other_app, other = make_app()
        other.watch("orders", **options)
        status = other.status(other_app)
        assert status.watches == {"orders": "outdated"}, options
        assert status.details["orders"]

    new_app, new = make_app()
    new.watch("orders", columns=["qty"])
    new.install_triggers(new_app)
    assert new.status(new_app).watches == {"orders": "installed"}
    assert ext.status(app).watches == {"orders": "outdated"}
    assert len(triggers(sql)) == 4
    new.start(new_app)
    sql("INSERT INTO orders VALUES (1, 'a', 1)")
    (event,) = events.wait_for(1)
    events.assert_no_more(1, marker(new, new_app))
    assert event.new == {"id": 1, "qty": 1}


def test_status_reports_errors_with_details(make_app: MakeApp, sql: SQL) -> None:
    """A watch the database cannot satisfy has status 'error' and says why."""
    sql(ORDERS)
    sql("CREATE TABLE nokey (a int)")
    app, ext = make_app()
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


def test_status_lists_orphaned_objects(make_app: MakeApp, sql: SQL) -> None:
    """Triggers on tables no watch covers, and functions left by a dropped
    table, are listed as orphaned."""
    sql("CREATE TABLE a (id int PRIMARY KEY)")
    sql("CREATE TABLE b (id int PRIMARY KEY)")
    old_app, old = make_app()
    old.watch("a")
    old.watch("b")
    old.install_triggers(old_app)
    b_triggers = [name for name, table in triggers(sql) if table == "b"]
    assert len(b_triggers) == 4

    app, ext = make_app()
    ext.watch("a")
    status = ext.status(app)
    assert status.watches == {"a": "installed"}
    assert len(status.orphaned) == 4
    for name in b_triggers:
        assert any(name in line for line in status.orphaned), status.orphaned

    sql("DROP TABLE b")  # its triggers go, their functions stay
    status = ext.status(app)
    assert len(status.orphaned) == 4
    for name in b_triggers:
        assert any(name in line and "function" in line for line in status.orphaned)
    ext.install_triggers(app)
    assert ext.status(app).orphaned == []


def test_uninstall_stops_delivery(make_app: MakeApp, sql: SQL, events: Recorder) -> None:
    """After uninstall_triggers(), writes deliver nothing and status is missing."""
    sql(ORDERS)
    app, ext = make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    ext.start(app)
    ext.uninstall_triggers(app)
    assert triggers(sql) == []
    assert ext.status(app).watches == {"orders": "missing"}
    sql("INSERT INTO orders VALUES (1, 'a', 1)")
    sql("UPDATE orders SET qty = 2")
    sql("DELETE FROM orders")
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
    installed = our_objects(sql)
    assert "relation dbnotify_journal" in installed
    assert len([o for o in installed if o.startswith("trigger")]) == 8

    app, ext = make_app()
    ext.watch("a")
    ext.uninstall_triggers(app, everything=True)
    assert our_objects(sql) == []
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
    names = [name for name, _ in triggers(sql)]
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
    renamed = {name for name, table in triggers(sql) if table == long_a}
    assert len(renamed) == 4
    assert renamed.isdisjoint(names)
    assert {name for name, table in triggers(sql) if table == long_b} <= set(names)


def test_unknown_table_is_a_watch_error(make_app: MakeApp) -> None:
    """Installing a watch on a missing table names the table."""
    app, ext = make_app()
    ext.watch("nowhere_table")
    with pytest.raises(WatchError, match="nowhere_table"):
        ext.install_triggers(app)


@pytest.mark.parametrize("option", ["columns", "when_changed"])
def test_unknown_column_is_a_watch_error(make_app: MakeApp, sql: SQL, option: str) -> None:
    """A column the table does not have is named in the error."""
    sql(ORDERS)
    app, ext = make_app()
    options: dict[str, Any] = {option: ["qty", "ghost_col"]}
    ext.watch("orders", **options)
    with pytest.raises(WatchError, match="ghost_col"):
        ext.install_triggers(app)
    with pytest.raises(WatchError, match="ghost_col"):
        ext.install_sql(app)


@pytest.mark.parametrize("option", ["columns", "when_changed"])
def test_unknown_column_of_a_model_fails_at_watch(make_app: MakeApp, option: str) -> None:
    """With a model target the typo is caught by watch() itself."""

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(primary_key=True)
        qty: Mapped[int]

    app, ext = make_app()
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
    assert triggers(sql) == []


def cli_status(app: Flask) -> tuple[int, dict[str, str]]:
    """Exit code of `flask dbnotify status`, and the state it shows per name."""
    result = app.test_cli_runner().invoke(args=["dbnotify", "status"])
    states = {}
    lines = result.output.splitlines()
    for line in lines:
        state, _, rest = line.partition(" ")
        if state in ("installed", "outdated", "missing", "error", "orphaned"):
            states[rest.strip().split("  (")[0]] = state
    # After the watches: the database side's health, one "label: value" a line.
    assert any(line.startswith("notification queue: ") for line in lines), result.output
    assert "listeners: " in result.output, result.output
    return result.exit_code, states


def test_cli_install_status_uninstall(make_app: MakeApp, sql: SQL) -> None:
    """`flask dbnotify status` names each watch and its state and exits 1
    unless all are installed; install/uninstall change what it shows."""
    sql(ORDERS)
    sql("CREATE TABLE customers (id int PRIMARY KEY)")
    app, ext = make_app()
    ext.watch("orders")
    ext.watch("customers")
    runner = app.test_cli_runner()
    assert cli_status(app) == (1, {"orders": "missing", "customers": "missing"})

    result = runner.invoke(args=["dbnotify", "install-triggers"])
    assert result.exit_code == 0, result.output
    assert len(triggers(sql)) == 8
    assert cli_status(app) == (0, {"orders": "installed", "customers": "installed"})

    result = runner.invoke(args=["dbnotify", "uninstall-triggers", "--sql"])
    assert result.exit_code == 0, result.output
    assert "DROP TRIGGER" in result.output
    assert len(triggers(sql)) == 8

    result = runner.invoke(args=["dbnotify", "uninstall-triggers"])
    assert result.exit_code == 0, result.output
    assert triggers(sql) == []
    assert cli_status(app) == (1, {"orders": "missing", "customers": "missing"})

    result = runner.invoke(args=["dbnotify", "uninstall-triggers", "--all"])
    assert result.exit_code == 0, result.output
    assert our_objects(sql) == []


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
    customers = [name for name, table in triggers(sql) if table == "customers"]
    assert len(customers) == 4
    assert list(states.values()) == ["orphaned"] * 4
    assert all(any(name in line for line in states) for name in customers), states
    ext.watch("ghost_table")
    code, states = cli_status(app)
    assert code == 1
    assert states["ghost_table"] == "error"
    result = app.test_cli_runner().invoke(args=["dbnotify", "status"])
    assert "does not exist" in result.output


def test_cli_notify_reaches_a_running_listener(make_app: MakeApp) -> None:
    """`flask dbnotify notify CHANNEL JSON` delivers; bad JSON is a usage error."""
    app, ext = make_app()
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


def test_hostile_names_are_quoted_not_pasted(make_app: MakeApp, sql: SQL, events: Recorder) -> None:
    """A table and column named like SQL injections install and deliver,
    and nothing else in the database is touched."""
    table = "x'; DROP TABLE victims; --"
    column = "q'\"); DROP TABLE victims; --"
    sql("CREATE TABLE victims (id int PRIMARY KEY)")
    sql(
        pgsql.SQL("CREATE TABLE {} (id int PRIMARY KEY, {} text, other int)")
        .format(pgsql.Identifier(table), pgsql.Identifier(column))
        .as_string(sql.conn)
    )
    app, ext = make_app()
    ext.watch(table, columns=[column], when_changed=[column])
    ext.install_triggers(app)
    assert ext.status(app).watches == {table: "installed"}
    ext.start(app)
    quoted_table = pgsql.Identifier(table).as_string(sql.conn)
    quoted_column = pgsql.Identifier(column).as_string(sql.conn)
    own = Recorder()
    with row_changed.connected_to(own, sender=table):
        sql(f"INSERT INTO {quoted_table} VALUES (1, %s, 0)", ("'; DROP TABLE victims; --",))
        sql(f"UPDATE {quoted_table} SET other = 1")
        sql(f"UPDATE {quoted_table} SET {quoted_column} = 'safe'")
        sql(f"DELETE FROM {quoted_table}")
        got = own.wait_for(3)
    events.assert_no_more(3, marker(ext, app))
    assert [e.op.value for e in got] == ["INSERT", "UPDATE", "DELETE"]
    assert got[0].new == {"id": 1, column: "'; DROP TABLE victims; --"}
    assert got[1].changed == {column}
    assert sql("SELECT to_regclass('victims') IS NOT NULL") == [(True,)]

    on_channel = Recorder()
    with notification_received.connected_to(on_channel, sender=table):
        ext.notify(table, table, app=app)
        assert on_channel.wait_for(1, "messages on the hostile channel") == [table]

    ext.uninstall_triggers(app, everything=True)
    assert our_objects(sql) == []
    assert sql("SELECT to_regclass('victims') IS NOT NULL") == [(True,)]


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
    from flask_dbnotify.backends.postgresql import Catalog, Resolved, install_plan

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
