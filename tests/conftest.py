"""Fixtures: a real PostgreSQL database per test, a SQLite file per test,
the ``backend`` fixture that gives a test one of each in turn, apps, and
recorders. Helpers the fixtures and tests share are in tests/_helpers.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from flask import Flask
from psycopg2 import sql as pgsql
from sqlalchemy.engine import make_url

from flask_dbnotify import DBNotify, notification_received, row_changed

from ._helpers import (
    SQL,
    WAIT,
    Backend,
    Lines,
    Proxy,
    Recorder,
    SQLiteDB,
    app_factory,
    not_here,
)
from ._mariadb import Found as FoundMariaDB
from ._mariadb import ThrowawayMariaDB, find_or_start_mariadb
from ._mariadb import connect as mysql_connect
from ._postgres import (
    LOGICAL_SETTINGS,
    Found,
    ThrowawayServer,
    find_or_start_postgres,
    start_private_postgres,
)

#: The run's servers, found or started once each: label -> Found or why not.
_servers: dict[str, Any] = {}


def _find(config: pytest.Config, label: str, find: Callable[[], Any]) -> Any:
    """The run's server of ``label``, found (or started) once with
    ``find()``, said in one line; the RuntimeError saying why there is none."""
    if label not in _servers:
        try:
            found = find()
        except RuntimeError as exc:
            found = exc
        _servers[label] = found
        if isinstance(found, RuntimeError):
            line = f"{label} for the tests: NONE: {found}"
        else:
            config.add_cleanup(found.cleanup)
            line = f"{label} for the tests: {found.summary}"
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line)
    return _servers[label]


def _find_postgres(config: pytest.Config) -> Found | RuntimeError:
    found: Found | RuntimeError = _find(config, "PostgreSQL", find_or_start_postgres)
    return found


def _find_mariadb(config: pytest.Config) -> FoundMariaDB | RuntimeError:
    found: FoundMariaDB | RuntimeError = _find(config, "MySQL/MariaDB", find_or_start_mariadb)
    return found


def pytest_collection_finish(session: pytest.Session) -> None:
    # At the start of the run, so its first lines say which server it uses.
    wanted = ("pg_server", "backend")  # backend: its postgresql half
    if any(set(wanted) & set(getattr(item, "fixturenames", ())) for item in session.items):
        _find_postgres(session.config)
    if any(
        {"mysql_server", "backend"} & set(getattr(item, "fixturenames", ()))
        for item in session.items
    ):
        _find_mariadb(session.config)


@pytest.fixture(scope="session")
def pg_server(pytestconfig: pytest.Config) -> Iterator[str]:
    """URL of a scratch database on a real server, dropped at the end."""
    found = _find_postgres(pytestconfig)
    if isinstance(found, RuntimeError):
        not_here(f"PostgreSQL tests NOT RUN, no server: {found}")
    url = found.url
    name = f"dbnotify_test_{os.getpid()}"
    admin = psycopg2.connect(url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    test_url = make_url(url).set(database=name).render_as_string(hide_password=False)
    try:
        yield test_url
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture()
def pg_url(pg_server: str) -> str:
    """The scratch database, emptied: no schemas but a fresh ``public``."""
    conn = psycopg2.connect(pg_server)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT nspname FROM pg_namespace WHERE nspname !~ '^(pg_|information_schema)'")
        for (schema,) in cur.fetchall():
            cur.execute(pgsql.SQL("DROP SCHEMA {} CASCADE").format(pgsql.Identifier(schema)))
        cur.execute("CREATE SCHEMA public")
    conn.close()
    return pg_server


@pytest.fixture()
def sql(pg_url: str) -> Iterator[SQL]:
    runner = SQL(pg_url)
    yield runner
    runner.close()


@pytest.fixture()
def make_app(pg_url: str) -> Iterator[Callable[..., tuple[Flask, DBNotify]]]:
    """Build ``(app, dbnotify)`` on PostgreSQL; autostart is off unless asked for."""
    factory, made = app_factory(pg_url, "test_app")
    yield factory
    for app, ext in made:
        ext.close(app)


# -- SQLite ------------------------------------------------------------------------


@pytest.fixture()
def sqlite_path(tmp_path: Path) -> str:
    """The test's SQLite database file (not created yet)."""
    return str(tmp_path / "app.db")


@pytest.fixture()
def sqlite_db(sqlite_path: str) -> Iterator[SQLiteDB]:
    """Another writer on the test's SQLite file."""
    runner = SQLiteDB(sqlite_path)
    yield runner
    runner.close()


@pytest.fixture()
def sqlite_app(sqlite_path: str) -> Iterator[Callable[..., tuple[Flask, DBNotify]]]:
    """Build ``(app, dbnotify)`` on the test's SQLite file; autostart is off
    unless asked for. Also for checks that need no database server (argument
    validation, config errors): nothing is written until a test asks."""
    factory, made = app_factory("sqlite:///" + sqlite_path, "sqlite_app")
    yield factory
    for app, ext in made:
        ext.close(app)


# -- MySQL / MariaDB -----------------------------------------------------------------


@pytest.fixture(scope="session")
def mysql_server(pytestconfig: pytest.Config) -> str:
    """URL of the run's MySQL/MariaDB server (no database)."""
    found = _find_mariadb(pytestconfig)
    if isinstance(found, RuntimeError):
        not_here(f"MySQL tests NOT RUN, no server: {found}")
    return found.url


@pytest.fixture()
def mysql_url(mysql_server: str) -> Iterator[str]:
    """A scratch database of the test's own, dropped afterwards."""
    name = f"dbnotify_test_{os.getpid()}"
    admin = mysql_connect(mysql_server)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield make_url(mysql_server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


_binlog_databases: list[str] = []


@pytest.fixture(scope="session")
def binlog_server() -> Iterator[ThrowawayMariaDB]:
    """A private mariadbd with the row-based binary log (full images and
    metadata), started once per run: the shared server's log is off, and
    is never reconfigured."""
    try:
        server = ThrowawayMariaDB(binlog=True)
    except RuntimeError as exc:
        not_here(f"binary-log tests NOT RUN: no server with a binary log: {exc}")
    yield server
    server.cleanup()


@pytest.fixture()
def binlog_url(binlog_server: ThrowawayMariaDB) -> Iterator[str]:
    """A fresh database on the binary-log server (``dbnotify_binlog_<n>``),
    dropped afterwards."""
    name = f"dbnotify_binlog_{len(_binlog_databases) + 1}"
    _binlog_databases.append(name)
    admin = mysql_connect(binlog_server.url)
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield make_url(binlog_server.url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


# -- either database -----------------------------------------------------------------


#: What the ``backend`` fixture runs a test on, unless the test (or its
#: module) is marked ``@pytest.mark.backends(...)`` with fewer.
BACKENDS = ("postgresql", "wal", "sqlite", "mysql", "binlog")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run the backend fixture on these only (why, in a comment)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    metafunc.parametrize("backend", marker.args if marker else BACKENDS, indirect=True)


@pytest.fixture()
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A fresh database of each kind in turn (a scratch PostgreSQL database
    with triggers; one on the logical server with WAL capture; a SQLite file
    in tmp_path), with apps on it and a writer of its own; see
    :class:`Backend`. Apps are closed and connections dropped afterwards."""
    config = {}
    if request.param == "postgresql":
        url, path = request.getfixturevalue("pg_url"), None
    elif request.param == "mysql":
        url, path = request.getfixturevalue("mysql_url"), None
    elif request.param == "binlog":
        url, path = request.getfixturevalue("binlog_url"), None
        config = {"DBNOTIFY_CAPTURE": "binlog"}
    elif request.param == "wal":
        url, path = request.getfixturevalue("logical_url"), None
        slot = "slot_" + str(make_url(url).database)
        config = {"DBNOTIFY_CAPTURE": "wal", "DBNOTIFY_SLOT": slot}
    else:
        path = str(tmp_path / "app.db")
        url = "sqlite:///" + path
    factory, made = app_factory(url, f"{request.param}_app", **config)
    runner = Backend(request.param, url, factory, path)
    yield runner
    for app, ext in made:
        ext.close(app)
    runner.close()


@pytest.fixture(params=["msgspec", "json"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Journal rows of SQLite and MySQL read with msgspec (the fast extra, which the tests
    install) and with json's scanner (without it): the same values."""
    from flask_dbnotify import _payload
    from flask_dbnotify.backends import shaped

    if request.param == "msgspec" and _payload._fast is None:
        pytest.fail("msgspec is not installed: pip install -e '.[test]'")
    monkeypatch.setattr(shaped, "_FAST", request.param == "msgspec")
    return str(request.param)


@pytest.fixture()
def events() -> Iterator[Recorder]:
    """Every row event, plus ``notification_received`` payloads."""
    rec = Recorder()
    with row_changed.connected_to(rec), notification_received.connected_to(rec):
        yield rec


@pytest.fixture(scope="module")
def private_server() -> Iterator[ThrowawayServer]:
    """A PostgreSQL server of the test module's own, which tests may stop,
    start, or hold transactions open on (never the shared one)."""
    try:
        server = start_private_postgres()
    except RuntimeError as exc:
        not_here(f"private PostgreSQL server NOT STARTED: {exc}")
    yield server
    server.destroy()


@pytest.fixture()
def proxy(pg_url: str) -> Iterator[Proxy]:
    """A TCP proxy in front of the test database's server, for a listener
    connection that tests cut or stall."""
    url = make_url(pg_url)
    running = Proxy((url.host or "127.0.0.1", url.port or 5432))
    yield running
    running.close()


@pytest.fixture()
def spawn() -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Lines]]]:
    """Start ``sys.executable ARGS`` with pipes; its stdout read through
    Lines (which shows its stderr if it exits early); killed and reaped
    afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    root = Path(__file__).resolve().parent.parent

    def start(*args: str, name: str = "child") -> tuple[subprocess.Popen[bytes], Lines]:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        return proc, Lines(proc.stdout, name, proc.stderr)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


# -- logical decoding (WAL capture) ---------------------------------------------

_logical_databases: list[str] = []  # made so far


@pytest.fixture(scope="session")
def logical_server() -> Iterator[ThrowawayServer]:
    """A private server with wal_level=logical, started once per run."""
    try:
        server = start_private_postgres(LOGICAL_SETTINGS)
    except RuntimeError as exc:
        not_here(f"WAL tests NOT RUN: no server with wal_level=logical: {exc}")
    yield server
    server.destroy()


@pytest.fixture()
def logical_url(logical_server: ThrowawayServer) -> Iterator[str]:
    """A fresh database on the logical server (``dbnotify_wal_<n>``),
    dropped afterwards with the replication slots in it. Slots are
    cluster-wide: a test names its slots after its database."""
    name = f"dbnotify_wal_{len(_logical_databases) + 1}"
    _logical_databases.append(name)
    admin = psycopg2.connect(logical_server.url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    try:
        yield make_url(logical_server.url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(active_pid, %s) FROM pg_replication_slots "
                "WHERE database = %s AND active_pid IS NOT NULL",
                (int(WAIT * 1000), name),
            )
            cur.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = %s",
                (name,),
            )
            cur.execute(pgsql.SQL("DROP DATABASE {} WITH (FORCE)").format(pgsql.Identifier(name)))
        admin.close()


@pytest.fixture()
def wal_sql(logical_url: str) -> Iterator[SQL]:
    runner = SQL(logical_url)
    yield runner
    runner.close()


@pytest.fixture()
def wal_app(logical_url: str) -> Iterator[Callable[..., tuple[Flask, DBNotify]]]:
    """``(app, dbnotify)`` in WAL mode, its slot named after the database."""
    database = make_url(logical_url).database
    factory, made = app_factory(logical_url, "wal_app")

    def make(**config: object) -> tuple[Flask, DBNotify]:
        return factory(**{"DBNOTIFY_CAPTURE": "wal", "DBNOTIFY_SLOT": f"slot_{database}", **config})

    yield make
    for app, ext in made:
        ext.close(app)
