"""Helpers shared by the test modules and conftest.py: bounded waits,
recorders, writers on either database, and the tools that watch processes
and connections. Fixtures live in conftest.py; test modules import helpers
from here, never from one another."""

from __future__ import annotations

import datetime as dt
import os
import select
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import psycopg2
import psycopg2.errors
import pytest
import sqlalchemy as sa
from flask import Flask
from psycopg2 import sql as pgsql

from flask_dbnotify import (
    DBNotify,
    ListenerState,
    events_dropped,
    listener_connected,
    listener_disconnected,
)

WAIT = 10.0  # seconds any single wait in a test may take
T = TypeVar("T")


def not_here(reason: str) -> NoReturn:
    """For a test that needs what this machine lacks: fail under CI, where
    everything must run, else skip; ``reason`` says NOT RUN and why."""
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


# -- PostgreSQL writer, recorders, bounded waits -------------------------------


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


class Role:
    """A login role of its own, dropped (with what it owns) afterwards."""

    def __init__(self, admin: SQL, url: str, name: str) -> None:
        self.name = name
        self.admin = admin
        admin(
            pgsql.SQL("CREATE ROLE {} LOGIN").format(pgsql.Identifier(name)).as_string(admin.conn)
        )
        self.url = sa.make_url(url).set(username=name).render_as_string(hide_password=False)
        self.conns: list[Any] = []

    def connect(self) -> Any:
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        self.conns.append(conn)
        return conn

    def run(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        conn = self.conns[0] if self.conns else self.connect()
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def is_superuser(self) -> bool:
        ((value,),) = self.admin("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (self.name,))
        return bool(value)

    def drop(self) -> None:
        for conn in self.conns:
            conn.close()
        ident = pgsql.Identifier(self.name).as_string(self.admin.conn)
        self.admin(f"DROP OWNED BY {ident} CASCADE")
        self.admin(f"DROP ROLE {ident}")


@contextmanager
def roles_on(admin: SQL, url: str) -> Iterator[Callable[[str], Role]]:
    """Makes login roles on the server of ``url`` (through ``admin``),
    named after ``kind``; each is dropped, with what it owns, at the end."""
    made: list[Role] = []

    def make(kind: str) -> Role:
        role = Role(admin, url, f"dbnotify_{kind}_{os.getpid()}_{len(made)}")
        made.append(role)
        return role

    try:
        yield make
    finally:
        for role in made:
            role.drop()


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


# -- the listener's state and lifecycle -----------------------------------------


def wait_for_state(
    ext: DBNotify, app: Flask, check: Callable[[ListenerState], bool], what: str
) -> ListenerState:
    """Poll listener_state() until ``check`` accepts it; fail showing the last one."""
    deadline = time.monotonic() + WAIT
    while True:
        state = ext.listener_state(app)
        if check(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT}s; listener_state() = {state}")
        time.sleep(0.02)


class Lifecycle(Recorder):
    """``listener_connected``, ``listener_disconnected`` and
    ``events_dropped``, in the order receivers saw them, each as
    ``(name, kwargs, monotonic time)``."""

    def _record(self, name: str) -> Callable[..., None]:
        def receiver(sender: Any, **kwargs: Any) -> None:
            self.add((name, kwargs, time.monotonic()))

        return receiver

    @contextmanager
    def connected(self) -> Iterator[Lifecycle]:
        with (
            listener_connected.connected_to(self._record("connected")),
            listener_disconnected.connected_to(self._record("disconnected")),
            events_dropped.connected_to(self._record("dropped")),
        ):
            yield self

    def wait_for_name(self, name: str, nth: int = 1, timeout: float = WAIT) -> tuple[Any, ...]:
        """The ``nth`` item called ``name``, waiting (bounded) for it."""

        def found() -> tuple[Any, ...] | None:
            hits = [item for item in self.items if item[0] == name]
            return hits[nth - 1] if len(hits) >= nth else None

        with self._cond:
            if not self._cond.wait_for(found, timeout):
                raise AssertionError(
                    f"no {name} #{nth} within {timeout}s; got {[i[:2] for i in self.items]!r}"
                )
            item = found()
            assert item is not None
            return item

    def names(self) -> list[tuple[str, dict[str, Any]]]:
        return [(name, kwargs) for name, kwargs, _ in self.items]


# -- a TCP proxy whose links tests cut or stall ---------------------------------


class _Link:
    """One proxied connection."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.lock = threading.Lock()
        self.hole = threading.Event()

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream``.

    :meth:`black_hole` turns every open connection into a black hole: both
    sockets stay open, nothing is relayed or even read, so to each side the
    other has silently gone away (a dead peer, a dropped NAT entry).
    Connections accepted meanwhile are black holes too, unless
    ``new_connections=False`` or until :meth:`forward`. :meth:`refuse`
    closes new connections at once (a server that is down or restarting).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.accepted = 0
        self._forwarding = True
        self._refusing = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept_loop)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="proxy", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            if not select.select([self.server], [], [], 0.05)[0]:
                continue
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            link = _Link(client)
            with self._lock:
                self.accepted += 1
                if self._refusing:
                    link.close()
                    continue
                self._links.append(link)
                if not self._forwarding:
                    link.hole.set()  # held open, never read
                    continue
            try:
                link.upstream = socket.create_connection(self.upstream, timeout=WAIT)
            except OSError:
                link.close()
                continue
            self._spawn(self._pump, link, client, link.upstream)
            self._spawn(self._pump, link, link.upstream, client)

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        while not self._closed.is_set() and not link.hole.is_set():
            try:
                if not select.select([src], [], [], 0.05)[0]:
                    continue
            except (OSError, ValueError):
                return
            with link.lock:
                if link.hole.is_set():
                    break
                try:
                    data = src.recv(65536)
                    if data:
                        dst.sendall(data)
                except OSError:
                    data = b""
                if not data:
                    link.close()
                    return

    def black_hole(self, new_connections: bool = True) -> None:
        with self._lock:
            self._forwarding = not new_connections
            links = list(self._links)
        for link in links:
            with link.lock:  # no relay is half done once this returns
                link.hole.set()

    def cut(self) -> None:
        """Close every open connection, on both sides (a dropped link)."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def refuse(self) -> None:
        """Close connections accepted from now on at once."""
        with self._lock:
            self._refusing = True

    def forward(self) -> None:
        """Relay connections accepted from now on."""
        with self._lock:
            self._forwarding, self._refusing = True, False

    def close(self) -> None:
        self._closed.set()
        # The accept loop first: closing the socket under its select()
        # would fail it (EBADF). It sees _closed within 0.05 s.
        self._threads[0].join(2)
        self.server.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()
        for thread in self._threads:
            thread.join(2)


# -- reading a child process's output ----------------------------------------


class Lines:
    """Reads lines from a pipe with bounded waits. Given the child's
    ``stderr`` pipe too, a child that exits early is reported with it."""

    def __init__(self, stream: Any, name: str, stderr: Any = None) -> None:
        self.fd = stream.fileno()
        self.name = name
        self.stderr = stderr
        self.buf = b""
        self.seen: list[str] = []

    def _fill(self, deadline: float) -> bool:
        """Read what is available before ``deadline``; False at end of file."""
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.fd], [], [], left)[0]:
            return True
        chunk = os.read(self.fd, 65536)
        self.buf += chunk
        return bool(chunk)

    def drain(self) -> None:
        """Take in whatever is ready now, without waiting."""
        self._fill(time.monotonic() + 0.005)

    def readline(self, what: str, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no {what} on {self.name} within {timeout}s; so far: {self.seen!r} "
                    f"+ {self.buf!r}"
                )
            if not self._fill(deadline):
                stderr = self.stderr.read().decode() if self.stderr is not None else ""
                raise AssertionError(
                    f"{self.name} closed before {what}; got {self.seen!r}\n{stderr}"
                )
        raw, _, self.buf = self.buf.partition(b"\n")
        line = raw.decode()
        self.seen.append(line)
        return line

    def wait_for(self, text: str, timeout: float = WAIT) -> str:
        """The first line containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(repr(text), max(0.0, deadline - time.monotonic()))
            if text in line:
                return line

    def rest(self, timeout: float = WAIT) -> list[str]:
        """Every remaining line, up to end of file."""
        deadline = time.monotonic() + timeout
        while self._fill(deadline):
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name} still open after {timeout}s")
        lines = self.buf.decode().splitlines()
        self.buf = b""
        self.seen += lines
        return lines


# -- PostgreSQL sessions and catalog -------------------------------------------

LISTENER_NAME = "flask-dbnotify listener"  # the application_name of listener sessions
MakeApp = Callable[..., tuple[Flask, DBNotify]]


def listener_count(sql: SQL) -> int:
    rows = sql(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = %s",
        (LISTENER_NAME,),
    )
    return int(rows[0][0])


def wait_for_listeners(sql: SQL, count: int, what: str) -> None:
    """Poll pg_stat_activity (bounded) until ``count`` listener sessions exist."""
    deadline = time.monotonic() + WAIT
    while (found := listener_count(sql)) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} listener sessions {what}, found {found}")
        time.sleep(0.02)


def kill_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """End ``proc`` and everything left in its process group: TERM, then
    KILL if it has not ended within ``timeout``; then KILL the group for
    children that outlived it, and reap ``proc``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)


def local_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets that process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def assert_once(got: list[int], expected: Collection[int], who: str) -> None:
    """``got`` holds each of ``expected`` once, nothing else, in commit order."""
    repeated = sorted(pk for pk, n in Counter(got).items() if n > 1)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not (repeated or missing or extra), (
        f"{who}: {len(got)} events for {len(expected)} rows; repeated: {repeated[:10]} "
        f"({len(repeated)}), missing: {missing[:10]} ({len(missing)}), not expected: "
        f"{extra[:10]} ({len(extra)})"
    )
    assert got == sorted(got), f"{who}: not in commit order"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listener_backends(sql: SQL) -> list[tuple[int, str, str]]:
    """``(pid, state, query)`` of every listener session on the test database."""
    return [
        (pid, state, query)
        for pid, state, query in sql(
            "SELECT pid, state, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s ORDER BY pid",
            (LISTENER_NAME,),
        )
    ]


def wait_for_backends(sql: SQL, count: int, what: str) -> list[tuple[int, str, str]]:
    """Poll pg_stat_activity until ``count`` listener sessions remain (a
    closed session leaves the view a moment after its client has gone)."""
    deadline = time.monotonic() + WAIT
    while True:
        rows = listener_backends(sql)
        if len(rows) == count:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} listener sessions {what}, got {rows!r}")
        time.sleep(0.02)


def orders_app(make_app: MakeApp, sql: SQL, **config: Any) -> tuple[Flask, DBNotify]:
    sql("CREATE TABLE orders (id int PRIMARY KEY, note text)")
    app, ext = make_app(**config)
    ext.watch("orders")
    ext.install_triggers(app)
    return app, ext


def pg_triggers(sql: SQL) -> list[tuple[str, str]]:
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


def pg_objects(sql: SQL) -> list[str]:
    """Every trigger, function, table, sequence or index whose name starts with dbnotify."""
    rows = sql(
        "SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal "
        "UNION ALL SELECT 'function ' || proname FROM pg_proc "
        "UNION ALL SELECT 'relation ' || relname FROM pg_class"
    )
    return sorted(name for (name,) in rows if name.split(" ", 1)[1].startswith("dbnotify"))


# -- SQLite ----------------------------------------------------------------------


class SQLiteDB:
    """Another writer on a SQLite file: its own autocommit connection
    (``BEGIN`` ... ``COMMIT`` make a transaction); ``?`` placeholders."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, timeout=WAIT, isolation_level=None)

    def __call__(self, statement: str, params: Any = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(statement, params or ()).fetchall()

    def objects(self) -> list[tuple[str, str]]:
        """``(type, name)`` of every schema object whose name starts with dbnotify."""
        rows = self(
            "SELECT type, name FROM sqlite_schema WHERE name LIKE 'dbnotify%' ORDER BY type, name"
        )
        return [(kind, name) for kind, name in rows]

    def triggers(self) -> list[tuple[str, str]]:
        """``(trigger, table)`` of every dbnotify trigger."""
        rows = self(
            "SELECT name, tbl_name FROM sqlite_schema "
            "WHERE type = 'trigger' AND name LIKE 'dbnotify%' ORDER BY tbl_name, name"
        )
        return [(name, table) for name, table in rows]

    def journal_ids(self) -> list[int]:
        return [journal_id for (journal_id,) in self("SELECT id FROM dbnotify_journal ORDER BY id")]

    def close(self) -> None:
        self.conn.close()


# -- MySQL / MariaDB ---------------------------------------------------------------


class MySQLDB:
    """Another writer on a MySQL/MariaDB database: its own autocommit
    connection (``BEGIN`` ... ``COMMIT`` make a transaction); ``?``
    placeholders, double-quoted identifiers (ANSI_QUOTES), ``||`` (PIPES_AS_CONCAT),
    and scripts of several statements."""

    def __init__(self, url: str) -> None:
        from pymysql.constants import CLIENT

        from ._mariadb import connect

        self.url = url
        self.database = sa.make_url(url).database
        self.conn = connect(url, client_flag=CLIENT.MULTI_STATEMENTS)
        self(
            "SET SESSION sql_mode = "
            "'ANSI_QUOTES,PIPES_AS_CONCAT,STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'"
        )

    def __call__(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        if params is not None:
            statement = statement.replace("%", "%%").replace("?", "%s")
        with self.conn.cursor() as cur:
            cur.execute(statement, params)
            rows = list(cur.fetchall()) if cur.description else []
            while cur.nextset():
                pass
            return rows

    def client(self, text: str) -> None:
        """Run a script with the mariadb (or mysql) command-line client, as a
        user would; fail with what it said."""
        import shutil

        command = shutil.which("mariadb") or shutil.which("mysql")
        if command is None:
            not_here("the mariadb client is not installed (apt-get install mariadb-client)")
        url = sa.make_url(self.url)
        done = subprocess.run(
            [
                command,
                "--host",
                url.host or "127.0.0.1",
                "--port",
                str(url.port or 3306),
                "--user",
                url.username or "root",
                f"--password={url.password or ''}",
                str(url.database),
            ],
            input=text,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert done.returncode == 0, f"the mariadb client failed: {done.stderr}"

    def triggers(self) -> list[tuple[str, str]]:
        """``(trigger, table)`` of every dbnotify trigger in the database."""
        rows = self(
            "SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS "
            "WHERE TRIGGER_SCHEMA = ? AND TRIGGER_NAME LIKE 'dbnotify%' "
            "ORDER BY EVENT_OBJECT_TABLE, TRIGGER_NAME",
            (self.database,),
        )
        return [(name, table) for name, table in rows]

    def objects(self) -> list[str]:
        """``"kind name"`` of every table and trigger named dbnotify*."""
        tables = self(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? "
            "AND TABLE_NAME LIKE 'dbnotify%' ORDER BY TABLE_NAME",
            (self.database,),
        )
        return [f"table {name}" for (name,) in tables] + [
            f"trigger {name}" for name, _ in self.triggers()
        ]

    def close(self) -> None:
        self.conn.close()


def app_factory(
    url: str, prefix: str, **defaults: Any
) -> tuple[MakeApp, list[tuple[Flask, DBNotify]]]:
    """A ``make_app`` building ``(app, dbnotify)`` on ``url`` with autostart
    off unless asked for (and ``defaults`` in its config), and the list of
    what it made (to close afterwards)."""
    made: list[tuple[Flask, DBNotify]] = []

    def factory(**config: Any) -> tuple[Flask, DBNotify]:
        app = Flask(f"{prefix}_{len(made)}")
        app.config["DBNOTIFY_DATABASE_URI"] = url
        app.config["DBNOTIFY_AUTOSTART"] = False
        app.config.update(defaults)
        app.config.update(config)
        ext = DBNotify(app)
        made.append((app, ext))
        return app, ext

    return factory, made


# -- one database of either kind ----------------------------------------------


class Backend:
    """What a behaviour test needs of the database it runs on, PostgreSQL or
    SQLite (the ``backend`` fixture makes one of each):

    * ``name``: ``"postgresql"`` or ``"sqlite"``; ``url``: the database URL;
    * ``make_app(**config)``: ``(app, dbnotify)`` on it, autostart off;
    * ``sql(statement, params)``: another writer, autocommit, ``?``
      placeholders on both (``BEGIN`` ... ``COMMIT`` make a transaction);
    * ``script(text)``: run a script of several statements (what
      ``install-triggers --sql`` prints);
    * ``triggers()``, ``objects()``: what of dbnotify's is in the database;
    * ``engine()``, ``connect()``: a SQLAlchemy engine and a DB-API
      connection with transactions, closed at the end of the test.
    """

    def __init__(self, name: str, url: str, make_app: MakeApp, path: str | None = None) -> None:
        self.name, self.url, self.make_app, self.path = name, url, make_app, path
        self.writer: SQL | SQLiteDB | MySQLDB
        if name == "sqlite":
            self.writer = SQLiteDB(str(path))
        elif name in ("mysql", "binlog"):
            self.writer = MySQLDB(url)
        else:
            self.writer = SQL(url)
        self._closing: list[Callable[[], None]] = []

    @property
    def pg(self) -> bool:
        """PostgreSQL, with either capture."""
        return self.name in ("postgresql", "wal")

    @property
    def mysql(self) -> bool:
        """MySQL or MariaDB, with either capture."""
        return self.name in ("mysql", "binlog")

    @property
    def binlog(self) -> bool:
        """MariaDB with binary-log capture: no trigger of ours."""
        return self.name == "binlog"

    @property
    def journaled(self) -> bool:
        """Every change is journaled (SQLite, MySQL): durable by nature."""
        return self.name in ("sqlite", "mysql", "binlog")

    @property
    def wal(self) -> bool:
        """PostgreSQL with WAL capture: no trigger of ours."""
        return self.name == "wal"

    def sql(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        if isinstance(self.writer, SQL) and params is not None:
            statement = statement.replace("%", "%%").replace("?", "%s")
        return self.writer(statement, params)

    def script(self, text: str) -> None:
        if isinstance(self.writer, MySQLDB):
            self.writer.client(text)
        elif isinstance(self.writer, SQL):
            self.writer(text)  # the whole script, as psql would run it
        else:
            self.writer.conn.executescript(text)  # as the sqlite3 shell would run it

    def triggers(self) -> list[tuple[str, str]]:
        """``(trigger, table)`` of every dbnotify trigger."""
        if isinstance(self.writer, SQL):
            return pg_triggers(self.writer)
        return self.writer.triggers()

    def objects(self) -> list[str]:
        """``"kind name"`` of every object whose name starts with dbnotify."""
        if isinstance(self.writer, SQL):
            return pg_objects(self.writer)
        if isinstance(self.writer, MySQLDB):
            return self.writer.objects()
        return [f"{kind} {name}" for kind, name in self.writer.objects()]

    def table_exists(self, name: str) -> bool:
        if self.pg:
            return self.sql("SELECT to_regclass(?) IS NOT NULL", (quote(name),)) == [(True,)]
        if self.mysql:
            return self.sql(
                "SELECT count(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() "
                "AND TABLE_NAME = ?",
                (name,),
            ) == [(1,)]
        return self.sql("SELECT count(*) FROM sqlite_schema WHERE name = ?", (name,)) == [(1,)]

    def journal_ids(self) -> list[int]:
        return [
            journal_id for (journal_id,) in self.sql("SELECT id FROM dbnotify_journal ORDER BY id")
        ]

    def now(self) -> dt.datetime:
        """The database's clock (SQLite's is this machine's)."""
        if self.pg:
            value: dt.datetime = self.sql("SELECT clock_timestamp()")[0][0]
            return value
        if self.mysql:
            now: dt.datetime = self.sql("SELECT UTC_TIMESTAMP(6)")[0][0]
            return now.replace(tzinfo=dt.UTC)
        return dt.datetime.now(dt.UTC)

    def engine(self, driver: str = "psycopg2") -> sa.Engine:
        """An engine on the database; on PostgreSQL through ``driver``
        (``psycopg2``, or ``psycopg``: psycopg 3)."""
        if self.pg:
            eng = sa.create_engine(sa.make_url(self.url).set(drivername=f"postgresql+{driver}"))
        elif self.mysql:
            eng = sa.create_engine(self.url)
        else:
            eng = sa.create_engine(self.url, connect_args={"timeout": WAIT})
        self._closing.append(eng.dispose)
        return eng

    def connect(self) -> Any:
        """A DB-API connection with transactions (not autocommit)."""
        conn: Any
        if self.mysql:
            from ._mariadb import connect

            conn = connect(self.url)
            conn.autocommit(False)
        else:
            conn = (
                psycopg2.connect(self.url)
                if self.pg
                else sqlite3.connect(str(self.path), timeout=WAIT)
            )
        self._closing.append(conn.close)
        return conn

    def close(self) -> None:
        for close in reversed(self._closing):
            close()
        self.writer.close()


def quote(name: str) -> str:
    """``name`` as a quoted SQL identifier (the same on both databases)."""
    return '"' + name.replace('"', '""') + '"'
