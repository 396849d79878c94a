"""Attacks on what install-triggers creates on MySQL/MariaDB, run as real
low-privilege accounts of the shared server.

The trust model these tests check:

* Our tables (``dbnotify_*``, COMMENT 'flask-dbnotify') are granted to no
  one: an account without grants on them cannot read, write or even see
  them, and cannot touch our triggers (DROP TRIGGER needs the TRIGGER
  privilege on the watched table).
* Our triggers run with their DEFINER's rights (the installer): a role
  that may write one watched table needs no grant on the journal, and
  gains exactly one thing from that, journal rows for the rows it writes
  itself, in that table's shape. The values and ``@dbnotify_context``
  are embedded as JSON values by the server: no crafted value or
  context makes an event of another table, a message, or another
  writer's row. A context is the writer's own claim (as on PostgreSQL):
  it is never proof of who wrote.
* Anyone who may write a watched table may delay what the listener
  delivers only for its own rows (the rollback test).
* We drop only what we made: ``uninstall-triggers --all`` and ``status``
  must not take a trigger another account made for ours.
* Names are quoted, values are parameters; what ``install-triggers --sql``
  prints runs in the ``mariadb`` client whatever the session's sql_mode.

``low`` logs in with no grants at all; ``writer`` may SELECT, INSERT, UPDATE
and DELETE one table (``orders``); ``owner`` has every privilege on a
database of its own (CREATE, TRIGGER, ...) and nothing on the app's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pymysql
import pytest
import sqlalchemy as sa
from flask import Flask

from flask_dbnotify import DBNotify

from ._helpers import WAIT, Recorder, app_factory, listening, marker
from ._mariadb import connect

MakeApp = Callable[..., tuple[Flask, DBNotify]]
#: The server's answers to what an account may not do.
DENIED = {
    1044,  # access denied to database
    1142,  # command denied for table
    1143,  # command denied for column
    1227,  # needs a privilege (SUPER, ...)
    1370,  # command denied for routine
}
ORDERS = "CREATE TABLE orders (id INT PRIMARY KEY, status TEXT, note VARCHAR(200))"


class Account:
    """A MariaDB account of the test's own, 'name'@'127.0.0.1' with a
    password; its connections are closed, and it is dropped, afterwards."""

    def __init__(self, server: str, name: str) -> None:
        self.name = name
        self.url = sa.make_url(server).set(username=name, password="pw-" + name)
        self.conns: list[Any] = []

    def connect(self, database: str | None = "") -> Any:
        """An autocommit connection (``database=""``: none selected)."""
        conn = connect(self.url.render_as_string(hide_password=False), database=database)
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def run(conn: Any, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(statement, params)
        return list(cur.fetchall()) if cur.description else []


def refused(conn: Any, statement: str, params: Any = None) -> int:
    """The error code the server answers ``statement`` with (it must fail)."""
    with pytest.raises(pymysql.MySQLError) as caught:
        run(conn, statement, params)
    code: int = caught.value.args[0]
    return code


@pytest.fixture()
def root(mysql_url: str) -> Iterator[Any]:
    """The installer's own connection (root), on the app's database."""
    conn = connect(mysql_url)
    run(conn, ORDERS)
    run(conn, "CREATE TABLE payments (id INT PRIMARY KEY, amount INT)")
    yield conn
    conn.close()


@pytest.fixture()
def accounts(mysql_server: str, root: Any) -> Iterator[Callable[[str], Account]]:
    """Make accounts (and, for ``owner``, a database of its own); all are
    dropped at the end, whatever the test did."""
    made: list[Account] = []

    def make(kind: str) -> Account:
        account = Account(mysql_server, f"dbn_sec_{os.getpid()}_{kind}")
        run(root, f"DROP USER IF EXISTS '{account.name}'@'127.0.0.1'")
        run(
            root,
            f"CREATE USER '{account.name}'@'127.0.0.1' IDENTIFIED BY %s",
            (account.url.password,),
        )
        made.append(account)
        return account

    yield make
    for account in made:
        account.close()
        run(root, f"DROP USER IF EXISTS '{account.name}'@'127.0.0.1'")


@pytest.fixture()
def make_app(mysql_url: str) -> Iterator[MakeApp]:
    factory, made = app_factory(mysql_url, "mysql_security")
    yield factory
    for app, ext in made:
        ext.close(app)


@pytest.fixture()
def own_database(mysql_server: str) -> Iterator[str]:
    """A second database on the server (not the app's), dropped afterwards."""
    name = f"dbn_sec_{os.getpid()}_own"
    admin = connect(mysql_server)
    run(admin, f"DROP DATABASE IF EXISTS `{name}`")
    run(admin, f"CREATE DATABASE `{name}`")
    yield name
    run(admin, f"DROP DATABASE IF EXISTS `{name}`")
    admin.close()


def database_of(url: str) -> str:
    return str(sa.make_url(url).database)


def writer_of(accounts: Callable[[str], Account], root: Any, table: str = "orders") -> Account:
    writer = accounts("writer")
    database = run(root, "SELECT DATABASE()")[0][0]
    run(
        root,
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{database}`.`{table}` "
        f"TO '{writer.name}'@'127.0.0.1'",
    )
    return writer


OUR_TABLES = (
    "dbnotify_journal",
    "dbnotify_shapes",
    "dbnotify_listeners",
    "dbnotify_receivers",
    "dbnotify_claims",
)


# -- no grants ---------------------------------------------------------------------


def test_an_account_without_grants_reaches_none_of_our_objects(
    make_app: MakeApp, root: Any, accounts: Callable[[str], Account], mysql_url: str
) -> None:
    """An account that may only log in cannot enter the app's database,
    read or write any table of ours, see or drop our triggers, or call
    anything of ours (we make no routine)."""
    app, ext = make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    database = database_of(mysql_url)
    low = accounts("low")
    with pytest.raises(pymysql.MySQLError) as caught:
        low.connect(database)
    assert caught.value.args[0] in DENIED
    conn = low.connect()
    for table in OUR_TABLES:
        assert refused(conn, f"SELECT * FROM `{database}`.`{table}`") in DENIED
        assert refused(conn, f"DELETE FROM `{database}`.`{table}`") in DENIED
    assert (
        refused(
            conn,
            f"INSERT INTO `{database}`.`dbnotify_journal` (created_at, body) VALUES (1, 'x')",
        )
        in DENIED
    )
    assert (
        run(
            conn,
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s",
            (database,),
        )
        == []
    )
    assert (
        run(
            conn,
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
            (database,),
        )
        == []
    )
    triggers = [
        name
        for (name,) in run(
            root,
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS "
            "WHERE TRIGGER_SCHEMA = DATABASE()",
        )
    ]
    assert len(triggers) == 3
    for name in triggers:
        assert refused(conn, f"DROP TRIGGER `{database}`.`{name}`") in DENIED
    assert (
        refused(
            conn,
            f"CREATE TRIGGER `{database}`.dbnotify_x AFTER INSERT ON `{database}`.orders "
            "FOR EACH ROW SET @x = 1",
        )
        in DENIED
    )
    assert run(
        root,
        "SELECT count(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = DATABASE()",
    ) == [(0,)]


# -- a writer of one table ---------------------------------------------------------


def test_a_writer_needs_no_grant_on_our_tables_and_gains_no_access(
    make_app: MakeApp,
    root: Any,
    accounts: Callable[[str], Account],
    mysql_url: str,
    events: Recorder,
) -> None:
    """A writer of ``orders`` writes it (the triggers journal its rows with
    the installer's rights) and its events arrive; it still cannot read
    the journal or the shapes (other tables' events), write the journal,
    the shapes or the listeners' positions, nor drop or add triggers on
    the table it writes."""
    app, ext = listening(make_app, "orders", "payments")
    database = database_of(mysql_url)
    writer = writer_of(accounts, root)
    conn = writer.connect(database)
    run(conn, "INSERT INTO orders VALUES (1, 'new', NULL)")
    run(conn, "UPDATE orders SET status = 'paid' WHERE id = 1")
    run(conn, "DELETE FROM orders WHERE id = 1")
    got = events.wait_for(3)
    assert [(e.table, e.op.value, e.pk) for e in got] == [
        ("orders", "INSERT", 1),
        ("orders", "UPDATE", 1),
        ("orders", "DELETE", 1),
    ]
    for table in OUR_TABLES:
        assert refused(conn, f"SELECT * FROM `{table}`") in DENIED
        assert refused(conn, f"DELETE FROM `{table}`") in DENIED
    assert (
        refused(conn, "INSERT INTO dbnotify_journal (created_at, body) VALUES (1, 'x')") in DENIED
    )
    assert (
        refused(conn, "INSERT INTO dbnotify_shapes (name, watch, header) VALUES ('x', 'y', '{}')")
        in DENIED
    )
    assert (
        refused(conn, "INSERT INTO dbnotify_listeners (name, position, seen_at) VALUES ('x', 0, 0)")
        in DENIED
    )
    assert refused(conn, "SELECT * FROM payments") in DENIED
    (name,) = run(
        root,
        "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE() "
        "AND EVENT_OBJECT_TABLE = 'orders' AND EVENT_MANIPULATION = 'INSERT'",
    )[0]
    assert refused(conn, f"DROP TRIGGER `{name}`") in DENIED
    assert (
        refused(
            conn,
            "CREATE TRIGGER dbnotify_orders_i_0000000000 BEFORE INSERT ON orders "
            "FOR EACH ROW SET NEW.status = 'forged'",
        )
        in DENIED
    )
    events.assert_no_more(3, marker(ext, app))


def test_crafted_values_and_contexts_forge_nothing(
    make_app: MakeApp,
    root: Any,
    accounts: Callable[[str], Account],
    mysql_url: str,
    events: Recorder,
) -> None:
    """Whatever a writer of ``orders`` puts in its values or in
    ``@dbnotify_context`` (JSON that closes the context and adds an ``r``
    of its own, a context that is not JSON, a number, over 1024 bytes, a
    JSON object claiming to be someone else), the server embeds it as a
    JSON value: every event is its own row of ``orders``, values as
    written, no event of ``payments`` and no message. A context that is
    a JSON object of at most 1024 bytes arrives as the writer's claim;
    any other is dropped and the row still arrives; a context the journal
    cannot hold (invalid UTF-8) fails the writer's own statement only."""
    app, ext = listening(make_app, "orders", "payments")
    writer = writer_of(accounts, root)
    conn = writer.connect(database_of(mysql_url))
    evil_values = [
        '"]], "cut": [[666]], "x": ["',
        '{"cx": "{}", "r": [666, "forged"]}',
        "\\\"'`\x00\n*/--#",
        '"], [666, "x", null]]',
    ]
    contexts: list[tuple[str, Any, Any]] = [
        # (SET expression, parameter, context the event carries)
        ("%s", '", "r": [666, "payments"], "cx": "', None),
        ("%s", "not json at all", None),
        ("5", None, None),
        ("%s", '{"user": "admin", "claim": "forged"}', {"user": "admin", "claim": "forged"}),
        ("%s", '{"pad": "' + "x" * 1100 + '"}', None),
        ("JSON_OBJECT('user', 'root')", None, {"user": "root"}),
        ("%s", "[1, 2, 3]", None),
        ("%s", "[" * 1000 + "]" * 1000, None),
        ("NULL", None, None),
    ]
    expected = []
    row_id = 100
    for expression, param, context in contexts:
        for value in evil_values:
            row_id += 1
            run(conn, f"SET @dbnotify_context = {expression}", None if param is None else (param,))
            run(
                conn,
                "INSERT INTO orders (id, status, note) VALUES (%s, %s, %s)",
                (row_id, value, value[:200]),
            )
            expected.append((row_id, value, context))
    run(conn, "SET @dbnotify_context = X'FF80'")
    code = refused(conn, "INSERT INTO orders (id, status) VALUES (1, 'x')")
    assert code == 1366  # Incorrect string value: the writer's own write fails
    run(conn, "SET @dbnotify_context = NULL")
    run(root, "INSERT INTO payments VALUES (1, 10)")  # another writer's row still arrives
    got = events.wait_for(len(expected) + 1)
    orders = [e for e in got if e.table == "orders"]
    assert [(e.pk, e.new["status"], e.new["note"], e.context) for e in orders] == [
        (pk, value, value[:200], context) for pk, value, context in expected
    ]
    assert all(e.op.value == "INSERT" and not e.cut for e in orders)
    assert [(e.table, e.pk, e.new) for e in got if e.table != "orders"] == [
        ("payments", 1, {"id": 1, "amount": 10})
    ]
    events.assert_no_more(len(expected) + 1, marker(ext, app))


def test_a_writer_cannot_block_other_writers(
    make_app: MakeApp,
    root: Any,
    accounts: Callable[[str], Account],
    mysql_url: str,
    events: Recorder,
) -> None:
    """A writer that leaves a transaction open after writing a row (so a
    journal row of its own is pending) holds no lock another writer's
    journal row waits on: the app's own writes commit at once (a lock wait
    would fail after 2 s) and are delivered."""
    app, ext = listening(make_app, "orders")
    writer = writer_of(accounts, root)
    conn = writer.connect(database_of(mysql_url))
    conn.begin()
    run(conn, "SET @dbnotify_context = %s", ("x" * 5000,))
    run(conn, "INSERT INTO orders VALUES (1, 'held', NULL)")
    run(conn, "UPDATE orders SET status = 'held again' WHERE id = 1")
    other = connect(mysql_url)
    try:
        run(other, "SET SESSION innodb_lock_wait_timeout = 2")
        other.begin()
        run(other, "INSERT INTO orders VALUES (2, 'other', NULL)")
        run(other, "UPDATE orders SET status = 'other paid' WHERE id = 2")
        other.commit()
    finally:
        other.close()
    got = events.wait_for(2)
    assert [(e.pk, e.op.value) for e in got] == [(2, "INSERT"), (2, "UPDATE")]
    conn.commit()
    got = events.wait_for(4)
    assert [(e.pk, e.op.value, e.context) for e in got[2:]] == [
        (1, "INSERT", None),
        (1, "UPDATE", None),
    ]


def test_rolled_back_writes_do_not_delay_other_writers_events(
    make_app: MakeApp,
    root: Any,
    accounts: Callable[[str], Account],
    mysql_url: str,
    events: Recorder,
) -> None:
    """A writer of ``orders`` rolls back 201 writes between committed ones
    (each leaves a journal id that never comes: a hole the listener looks
    for until HOLE_TIMEOUT, 300 s). Another writer's transaction that got
    its journal id before the listener read a later one, and commits
    after, must still be delivered within seconds: the rollbacks are
    the writer's own business. (The listener looks for the oldest
    LOOK_FOR = 200 holes only, so today the other writer's event waits
    until the attacker's holes expire, 5 minutes; past MAX_HOLES the
    oldest, the victim's included, are given up and never delivered.)"""
    app, ext = listening(make_app, "orders")
    writer = writer_of(accounts, root)
    conn = writer.connect(database_of(mysql_url))
    for n in range(201):
        conn.begin()
        run(conn, "INSERT INTO orders VALUES (%s, 'rolled back', NULL)", (10000 + n,))
        conn.rollback()
        run(conn, "INSERT INTO orders VALUES (%s, 'kept', NULL)", (10000 + n,))
    victim = connect(mysql_url)
    try:
        victim.begin()
        run(victim, "INSERT INTO orders VALUES (1, 'victim', NULL)")
        run(conn, "INSERT INTO orders VALUES (20000, 'after the victim', NULL)")
        # The listener has read the row after the victim's: the victim's id is a hole.
        got = events.wait_for(202)
        assert got[-1].pk == 20000
        victim.commit()
    finally:
        victim.close()
    got = events.wait_for(203, "the victim's event, within seconds of its commit")
    assert got[-1].pk == 1


# -- what we take for ours ---------------------------------------------------------


def test_uninstall_all_drops_no_trigger_another_account_made(
    make_app: MakeApp,
    root: Any,
    accounts: Callable[[str], Account],
    mysql_url: str,
    own_database: str,
) -> None:
    """An account with CREATE and TRIGGER on a database of its own (none on
    the app's) makes a trigger named ``dbnotify_*`` whose body merely
    mentions the app's journal (creating it needs no right on the
    journal). ``status`` must not list it as an orphan of ours and
    ``uninstall-triggers --all``, run by the installer (who sees every
    trigger), must not drop it: we drop only what we made. Today both
    do: our_triggers() recognises a trigger by its name prefix and a
    substring of its body, which any account can write."""
    app, ext = make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    database = database_of(mysql_url)
    owner = accounts("owner")
    run(root, f"GRANT ALL PRIVILEGES ON `{own_database}`.* TO '{owner.name}'@'127.0.0.1'")
    conn = owner.connect(own_database)
    run(conn, "CREATE TABLE t (id INT PRIMARY KEY)")
    run(
        conn,
        "CREATE TRIGGER dbnotify_t_i_0123456789 AFTER INSERT ON t FOR EACH ROW "
        f"SET @audit = 'not yours: `{database}`.`dbnotify_journal`'",
    )
    run(conn, "INSERT INTO t VALUES (1)")  # it is a working trigger of the owner's
    assert refused(conn, f"SELECT * FROM `{database}`.dbnotify_journal") in DENIED
    theirs = f"`{own_database}`.`dbnotify_t_i_0123456789`"
    assert not [s for s in ext.uninstall_sql(app, everything=True) if theirs in s]
    assert not [o for o in ext.status(app).orphaned if "dbnotify_t_i_0123456789" in o]
    ext.uninstall_triggers(app, everything=True)
    assert run(
        root,
        "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s",
        (own_database,),
    ) == [("dbnotify_t_i_0123456789",)]


def test_uninstall_all_leaves_another_apps_triggers_alone(
    make_app: MakeApp, root: Any, mysql_url: str, mysql_server: str
) -> None:
    """Two apps on one server: one on database ``D``, one on database
    ``Z`D`` (a backtick in a database name is legal). The second app's
    triggers name its journal ```Z``D`.`dbnotify_journal```, which
    contains the first app's ```D`.`dbnotify_journal```: the first app's
    ``uninstall-triggers --all`` and ``status`` must not take them for
    its own (today they do: the body is matched by substring)."""
    database = database_of(mysql_url)
    other = f"Z`{database}"
    admin = connect(mysql_server)
    try:
        run(admin, "DROP DATABASE IF EXISTS `" + other.replace("`", "``") + "`")
        run(admin, "CREATE DATABASE `" + other.replace("`", "``") + "`")
        run(admin, "CREATE TABLE `" + other.replace("`", "``") + "`.items (id INT PRIMARY KEY)")
        factory, made = app_factory(
            sa.make_url(mysql_url).set(database=other).render_as_string(hide_password=False),
            "other_app",
        )
        try:
            other_app, other_ext = factory()
            other_ext.watch("items")
            other_ext.install_triggers(other_app)
            theirs = run(
                admin,
                "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s",
                (other,),
            )
            assert len(theirs) == 3
            app, ext = make_app()
            ext.watch("orders")
            ext.install_triggers(app)
            assert not [
                s for s in ext.uninstall_sql(app, everything=True) if "items" in s or "Z``" in s
            ]
            assert not ext.status(app).orphaned
        finally:
            for made_app, made_ext in made:
                made_ext.close(made_app)
    finally:
        run(admin, "DROP DATABASE IF EXISTS `" + other.replace("`", "``") + "`")
        admin.close()


def test_uninstall_all_drops_only_our_marked_tables_in_the_apps_database(
    make_app: MakeApp, root: Any, mysql_url: str, own_database: str
) -> None:
    """A table named like ours and carrying our comment in another
    database, and a table named like ours without the comment, are never
    dropped by ``uninstall-triggers --all``: only the app's database is
    looked in, and only marked tables are taken."""
    app, ext = make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    run(
        root,
        f"CREATE TABLE `{own_database}`.dbnotify_journal (id INT PRIMARY KEY) "
        "COMMENT 'flask-dbnotify'",
    )
    run(root, "ALTER TABLE dbnotify_claims COMMENT = 'not flask-dbnotify'")
    statements = ext.uninstall_sql(app, everything=True)
    assert not [s for s in statements if own_database in s]
    assert not [s for s in statements if "dbnotify_claims" in s]
    ext.uninstall_triggers(app, everything=True)
    left = run(
        root,
        "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES "
        "WHERE TABLE_NAME LIKE 'dbnotify%%' AND TABLE_SCHEMA IN (DATABASE(), %s)",
        (own_database,),
    )
    assert set(left) == {
        (database_of(mysql_url), "dbnotify_claims"),
        (own_database, "dbnotify_journal"),
    }


# -- names and SQL -------------------------------------------------------------------

#: Legal MariaDB names that break naive quoting, in SQL or in the client.
HOSTILE_TABLE = "$$or`d'e\"r\\s */ -- ;#\\q\\! ü\nx"
HOSTILE_COLUMNS = ("k`e'y\"\\", "va`l'ue\"\\N */;--#\n\u00e9\u4e2d")


def hostile_table(root: Any) -> None:
    key, val = ("`" + c.replace("`", "``") + "`" for c in HOSTILE_COLUMNS)
    table = "`" + HOSTILE_TABLE.replace("`", "``") + "`"
    run(root, f"CREATE TABLE {table} ({key} INT PRIMARY KEY, {val} TEXT)")


def test_hostile_names_are_watched_and_delivered(
    make_app: MakeApp, root: Any, events: Recorder
) -> None:
    """A table and columns whose names hold backticks, quotes,
    backslashes, comment markers, semicolons, a newline and non-ASCII
    letters are watched, installed and delivered with their names intact
    (no statement is broken by them)."""
    hostile_table(root)
    app, ext = listening(make_app, HOSTILE_TABLE)
    key, val = HOSTILE_COLUMNS
    table = "`" + HOSTILE_TABLE.replace("`", "``") + "`"
    qk, qv = ("`" + c.replace("`", "``") + "`" for c in HOSTILE_COLUMNS)
    run(root, f"INSERT INTO {table} ({qk}, {qv}) VALUES (1, %s)", ("a'b\\c",))
    run(root, f"UPDATE {table} SET {qv} = 'x' WHERE {qk} = 1")
    got = events.wait_for(2)
    assert [(e.table, e.op.value, e.new) for e in got] == [
        (HOSTILE_TABLE, "INSERT", {key: 1, val: "a'b\\c"}),
        (HOSTILE_TABLE, "UPDATE", {key: 1, val: "x"}),
    ]
    assert ext.status(app).watches == {HOSTILE_TABLE: "installed"}


@pytest.mark.parametrize(
    "sql_mode",
    [
        "STRICT_TRANS_TABLES,NO_ENGINE_SUBSTITUTION",
        "ANSI,NO_BACKSLASH_ESCAPES",
        "ANSI_QUOTES",
    ],
)
def test_printed_install_sql_runs_in_the_mariadb_client(
    make_app: MakeApp, root: Any, mysql_url: str, events: Recorder, sql_mode: str
) -> None:
    """What ``flask dbnotify install-triggers --sql`` prints, for the
    hostile table above and ``orders``, is run by the ``mariadb`` client
    in a session of ``sql_mode``: it runs without an error, makes an
    install ``status`` calls installed, and the triggers it made journal
    every operation correctly. (The UPDATE trigger is a compound
    statement, ``BEGIN IF ... THEN INSERT ...; END IF; END``: printed
    with ';' only, the client cuts it at its first ';' and leaves a
    partial install; a ';' or '$$' inside a quoted name must not matter.)"""
    client = shutil.which("mariadb") or shutil.which("mysql")
    if client is None:
        pytest.skip("NOT RUN: no mariadb client")
    hostile_table(root)
    app, ext = make_app()
    ext.watch(HOSTILE_TABLE)
    ext.watch("orders")
    printed = app.test_cli_runner().invoke(args=["dbnotify", "install-triggers", "--sql"])
    assert printed.exit_code == 0, printed.output
    script = f"SET SESSION sql_mode = '{sql_mode}';\n" + printed.output
    url = sa.make_url(mysql_url)
    done = subprocess.run(
        [
            client,
            "--no-defaults",
            f"--host={url.host}",
            f"--port={url.port or 3306}",
            f"--user={url.username}",
            f"--database={url.database}",
            "--batch",
        ],
        input=script.encode(),
        capture_output=True,
        timeout=WAIT * 3,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert ext.status(app).watches == {HOSTILE_TABLE: "installed", "orders": "installed"}
    ext.start(app)
    table = "`" + HOSTILE_TABLE.replace("`", "``") + "`"
    qk, qv = ("`" + c.replace("`", "``") + "`" for c in HOSTILE_COLUMNS)
    run(root, f"INSERT INTO {table} ({qk}, {qv}) VALUES (1, %s)", ("a\\'b",))
    run(root, "INSERT INTO orders VALUES (1, 'new', NULL)")
    run(root, "UPDATE orders SET status = 'paid' WHERE id = 1")
    run(root, f"DELETE FROM {table}")
    got = events.wait_for(4)
    key, val = HOSTILE_COLUMNS
    assert [(e.table, e.op.value, e.pk) for e in got] == [
        (HOSTILE_TABLE, "INSERT", 1),
        ("orders", "INSERT", 1),
        ("orders", "UPDATE", 1),
        (HOSTILE_TABLE, "DELETE", 1),
    ]
    assert got[0].new == {key: 1, val: "a\\'b"}
    assert got[2].changed == frozenset({"status"})


def test_the_listener_and_once_store_take_values_as_parameters(mysql_url: str, root: Any) -> None:
    """Receiver names, worker names, channels and errors are the app's
    values, never SQL: hostile ones (quotes, backslashes, ``%s``) go
    through every statement of the once store and of messages as they
    are, and change nothing else."""
    from flask_dbnotify.backends.mysql import MySQLBackend

    app_factory_, made = app_factory(mysql_url, "params")
    try:
        app, ext = app_factory_()
        ext.watch("orders")
        ext.install_triggers(app)
    finally:
        for made_app, made_ext in made:
            made_ext.close(made_app)
    backend = MySQLBackend.from_url(sa.make_url(mysql_url), 5.0)
    try:
        hostile = "r'); DROP TABLE orders; -- %s %(x)s \\' `"
        backend.once.register([hostile])
        run(root, "INSERT INTO orders VALUES (1, 'new', NULL)")
        found, cursor = backend.once.scan(hostile, ["orders"], 10)
        assert [e.pk for e in found] == [1]
        (event,) = found
        assert backend.once.claim(hostile, [event.id], hostile) == {event.id}
        backend.once.finish(hostile, event.id, hostile, None)
        backend.once.advance(hostile, cursor)
        assert run(root, "SELECT receiver, state, last_error, claimed_by FROM dbnotify_claims") == [
            (hostile, "failed", hostile, None)
        ]
        backend.once.forget(hostile)
        assert run(root, "SELECT count(*) FROM dbnotify_receivers") == [(0,)]
        assert run(root, "SELECT count(*) FROM orders") == [(1,)]
    finally:
        backend.close()


def test_a_database_name_with_a_percent_sign_is_refused(mysql_server: str) -> None:
    """The app's database may be named ``shop_100%s`` (legal in MySQL), but
    our statements name it next to PyMySQL's ``%s`` parameters, where a
    name holding ``%(payload)s`` would put notify()'s payload inside the
    quoted name: such a URL is refused when the app is set up, with the
    reason, and nothing is created."""
    name = f"dbn_sec_{os.getpid()}_100%s"
    admin = connect(mysql_server)
    try:
        run(admin, f"DROP DATABASE IF EXISTS `{name}`")
        run(admin, f"CREATE DATABASE `{name}`")
        url = sa.make_url(mysql_server).set(database=name)
        app = Flask("percent")
        app.config.update(
            DBNOTIFY_DATABASE_URI=url.render_as_string(hide_password=False),
            DBNOTIFY_AUTOSTART=False,
        )
        with pytest.raises(ValueError, match=r"holds a %: Flask-DBNotify cannot use it"):
            DBNotify(app)
        assert run(admin, f"SHOW TABLES FROM `{name}`") == []
    finally:
        run(admin, f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()
