"""Fixtures: a real PostgreSQL database per test, apps, and recorders."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import psycopg2
import psycopg2.errors
import pytest
from flask import Flask
from psycopg2 import sql as pgsql
from sqlalchemy.engine import make_url

from flask_dbnotify import DBNotify, notification_received, row_changed

from ._postgres import Found, ThrowawayServer, find_or_start_postgres, start_private_postgres

WAIT = 10.0  # seconds any single wait in a test may take
T = TypeVar("T")


def not_here(reason: str) -> NoReturn:
    """For a test that needs what this machine lacks: fail under CI, where
    everything must run, else skip; ``reason`` says NOT RUN and why."""
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


_postgres: list[Found | RuntimeError] = []


def _find_postgres(config: pytest.Config) -> Found | RuntimeError:
    """The run's server, found or started once, said in one line."""
    if not _postgres:
        try:
            found: Found | RuntimeError = find_or_start_postgres()
        except RuntimeError as exc:
            found = exc
        _postgres.append(found)
        if isinstance(found, Found):
            config.add_cleanup(found.cleanup)
            line = f"PostgreSQL for the tests: {found.summary}"
        else:
            line = f"PostgreSQL for the tests: NONE: {found}"
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line)
    return _postgres[0]


def pytest_collection_finish(session: pytest.Session) -> None:
    # At the start of the run, so its first lines say which server it uses.
    if any("pg_server" in getattr(item, "fixturenames", ()) for item in session.items):
        _find_postgres(session.config)


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


class SQL:
    """Another writer: its own autocommit connection."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True

    def __call__(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def close(self) -> None:
        self.conn.close()


def xml_supported(sql: SQL) -> bool:
    """Whether the server was built with libxml (the throwaway one is not)."""
    try:
        sql("SELECT '<a/>'::xml")
    except psycopg2.errors.FeatureNotSupported:
        return False
    return True


@pytest.fixture()
def sql(pg_url: str) -> Iterator[SQL]:
    runner = SQL(pg_url)
    yield runner
    runner.close()


@pytest.fixture()
def make_app(pg_url: str) -> Iterator[Callable[..., tuple[Flask, DBNotify]]]:
    """Build ``(app, dbnotify)``; autostart is off unless asked for."""
    made: list[tuple[Flask, DBNotify]] = []

    def factory(**config: Any) -> tuple[Flask, DBNotify]:
        app = Flask(f"test_app_{len(made)}")
        app.config["DBNOTIFY_DATABASE_URI"] = pg_url
        app.config["DBNOTIFY_AUTOSTART"] = False
        app.config.update(config)
        ext = DBNotify(app)
        made.append((app, ext))
        return app, ext

    yield factory
    for app, ext in made:
        ext.close(app)


class Recorder:
    """Collects what a signal delivers; waits are bounded."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def add(self, item: Any) -> None:
        with self._cond:
            self.items.append(item)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        self.add(kwargs.get("event", kwargs.get("payload", kwargs)))

    def wait_for(self, count: int, what: str = "events", timeout: float = WAIT) -> list[Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.items) >= count, timeout):
                raise AssertionError(
                    f"expected {count} {what} within {timeout}s, got {len(self.items)}: "
                    f"{self.items[:5]!r}"
                )
            return list(self.items)

    def assert_no_more(self, count: int, marker: Callable[[], None] | None = None) -> None:
        """Assert exactly ``count`` items arrived. ``marker`` sends something
        that must arrive after anything pending, so waiting for it proves
        nothing else is in flight."""
        if marker is not None:
            marker()
            self.wait_for(count + 1, "items and the marker")
            extra = self.items[count:-1]
        else:
            extra = self.items[count:]
        assert not extra, f"unexpected extra items: {extra!r}"


@pytest.fixture()
def events() -> Iterator[Recorder]:
    """Every row event, plus ``notification_received`` payloads."""
    rec = Recorder()
    with row_changed.connected_to(rec), notification_received.connected_to(rec):
        yield rec


def listening(
    factory: Callable[..., tuple[Flask, DBNotify]], *targets: Any, **options: Any
) -> tuple[Flask, DBNotify]:
    """An app from ``factory`` watching ``targets``, triggers installed,
    listener running."""
    app, ext = factory()
    for target in targets:
        ext.watch(target, **options)
    ext.install_triggers(app)
    ext.start(app)
    return app, ext


def captured_notifications(
    url: str, send: Callable[[], object], timeout: float = WAIT
) -> list[str]:
    """The payloads on the listener's channel that ``send()`` causes, as a
    plain LISTENing session sees them (a marker on another channel, sent
    after, tells when all have arrived)."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("LISTEN dbnotify; LISTEN test_done")
        send()
        with conn.cursor() as cur:
            cur.execute("SELECT pg_notify('test_done', '')")
        payloads: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            # Our own marker may already be in: psycopg2 collects
            # notifications after each query.
            for note in conn.notifies:
                if note.channel == "test_done":
                    return payloads
                payloads.append(note.payload)
            conn.notifies.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"the marker did not arrive within {timeout}s ({len(payloads)} so far)"
                )
            select.select([conn], [], [], left)
            conn.poll()
    finally:
        conn.close()


def marker(ext: DBNotify, app: Flask) -> Callable[[], None]:
    """Something sent after the writes under test; it arrives after anything pending."""
    return lambda: ext.notify("marker", "end", app=app)


def poll_until(check: Callable[[], T], what: str, timeout: float = WAIT) -> T:
    """Call ``check`` until it returns something true; fail after ``timeout``.
    For state no signal announces (catalog rows, counters)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true within {timeout}s (last: {result!r})")
        time.sleep(0.02)


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
def proxy(pg_url: str) -> Iterator[Any]:
    """A TCP proxy in front of the test database's server (tests/test_faults.py
    has the Proxy), for a listener connection that tests cut or stall."""
    from .test_faults import Proxy

    url = make_url(pg_url)
    running = Proxy((url.host or "127.0.0.1", url.port or 5432))
    yield running
    running.close()


@pytest.fixture()
def spawn() -> Iterator[Callable[..., Any]]:
    """Start ``sys.executable ARGS`` with pipes, read through test_sqlite's
    Lines; killed and reaped afterwards."""
    from .test_sqlite import Lines

    procs: list[subprocess.Popen[bytes]] = []
    root = Path(__file__).resolve().parent.parent

    def start(*args: str, name: str = "child") -> tuple[subprocess.Popen[bytes], Any]:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        return proc, Lines(proc, name)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
