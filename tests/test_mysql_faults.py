"""MySQL/MariaDB under real faults and in real processes: the server
restarted (shut down, and crashed) while a writer commits; the listener's
session killed from another session; pooled connections that a restart
closed; every process of the app stopped while writes go on, with an
exactly-once receiver; a process SIGKILLed in the middle of a 5,000-row
transaction's delivery; and gunicorn with two workers.

MySQL has no NOTIFY: every change is journaled by triggers and each
listener polls the journal with a connection of its own. So a listener
that loses its connection goes on from where it was (``gap=False``):
nothing lost, nothing repeated; and once receivers find what was written
while no process ran. Server restarts use a throwaway mariadbd of this
module's own (the shared server is never restarted).

Timings are printed (run with ``-s`` to see them); they are asserted only
against generous upper bounds.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from flask import Flask
from sqlalchemy.engine import make_url

from flask_dbnotify import ChangeEvent, DBNotify

from ._helpers import (
    WAIT,
    Backend,
    Lifecycle,
    Lines,
    MySQLDB,
    Recorder,
    app_factory,
    assert_once,
    free_port,
    local_ports,
    marker,
    not_here,
    poll_until,
)
from ._mariadb import ThrowawayMariaDB, connect
from .apps import once_app
from .test_gunicorn import APP, Server, app_env, no_control_socket, require

pytestmark = pytest.mark.backends("mysql")  # this module is about the MySQL backend

ROOT = Path(__file__).resolve().parent.parent
ORDERS = "CREATE TABLE orders (id BIGINT PRIMARY KEY, item VARCHAR(40), qty INT)"
RECORD = "tests.apps.once_app.record"
LONG = 30.0  # 5,000 events through a once receiver, on a slow machine


# -- a writer, and what arrived ----------------------------------------------------


class Writer:
    """Another client committing rows of ``orders`` with primary keys
    ``first``, ``first + 1``, ... in its own thread, one row per
    transaction, one every ``every`` seconds, until :meth:`stop`. A commit
    that fails (a server going down) is not retried: the writer reconnects
    and goes on with the next key; the rows whose outcome it does not know
    are in ``unknown``, and only the table says whether they committed."""

    def __init__(self, url: str, every: float = 0.002, first: int = 1) -> None:
        self.url, self.every = url, every
        self.next_pk = first  #: the key of the next row tried
        self.committed: list[int] = []  #: rows whose commit returned
        self.unknown: list[int] = []  #: rows whose transaction failed somewhere
        self.errors: list[str] = []
        self.sessions: list[int] = []  #: the writer's connection ids, on the server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn: Any = None
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                pk = None
                try:
                    if conn is None:
                        conn = connect(self.url, connect_timeout=3, read_timeout=int(WAIT))
                        self.sessions.append(conn.thread_id())
                    pk, self.next_pk = self.next_pk, self.next_pk + 1
                    with conn.cursor() as cur:
                        cur.execute("INSERT INTO orders VALUES (%s, 'row', 1)", (pk,))
                    self.committed.append(pk)
                except pymysql.MySQLError as exc:
                    if pk is not None:
                        self.unknown.append(pk)
                    self.errors.append(str(exc))
                    if conn is not None:
                        try:
                            conn.close()
                        except pymysql.MySQLError:
                            pass
                    conn = None
                    self._stop.wait(0.02)  # the pace of retries against a server that is down
                if self.every:
                    self._stop.wait(max(0.0, self.every - (time.monotonic() - began)))
        finally:
            if conn is not None:
                try:
                    conn.close()
                except pymysql.MySQLError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), f"the writer still runs {WAIT}s after stop()"


def row_pks(events: Recorder) -> list[int]:
    """Primary keys of the row events received so far, in order."""
    return [item.pk for item in list(events.items) if isinstance(item, ChangeEvent)]


def table_pks(url: str) -> list[int]:
    db = MySQLDB(url)
    try:
        return [pk for (pk,) in db("SELECT id FROM orders ORDER BY id")]
    finally:
        db.close()


def watching_orders(url: str, **config: Any) -> tuple[Flask, DBNotify, list[Any]]:
    """An app on ``url`` watching ``orders`` (created here), triggers
    installed, not started; and the list of what to close afterwards."""
    writer = MySQLDB(url)
    writer(ORDERS)
    writer.close()
    factory, made = app_factory(url, "mysql_faults", **config)
    app, ext = factory()
    ext.watch("orders")
    ext.install_triggers(app)
    return app, ext, made


# -- a server of this module's own, restarted -------------------------------------


@pytest.fixture(scope="module")
def restarted_server() -> Iterator[ThrowawayMariaDB]:
    """A mariadbd of this module's own, which tests stop, crash and start."""
    try:
        server = ThrowawayMariaDB()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        not_here(f"server restart tests NOT RUN: no throwaway mariadbd: {exc}")
    yield server
    server.cleanup()


def running(server: ThrowawayMariaDB) -> bool:
    return server.proc is not None and server.proc.poll() is None


def crash(server: ThrowawayMariaDB) -> None:
    """SIGKILL mariadbd, as in a crash (what a commit returned for survives:
    the log reaches the OS at each commit)."""
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(WAIT)


_databases = itertools.count(1)


@pytest.fixture()
def restarted_url(restarted_server: ThrowawayMariaDB) -> Iterator[str]:
    """A fresh database on the restarted server (started again if a test
    left it down), dropped afterwards."""
    if not running(restarted_server):
        restarted_server.start()
    name = f"restarted_{next(_databases)}"
    admin = connect(restarted_server.url)
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    admin.close()
    yield make_url(restarted_server.url).set(database=name).render_as_string(hide_password=False)
    if not running(restarted_server):
        restarted_server.start()
    admin = connect(restarted_server.url)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    admin.close()


@pytest.mark.parametrize("mode", ["shutdown", "crash"])
def test_listener_rides_out_a_server_restart_losing_and_repeating_nothing(
    restarted_server: ThrowawayMariaDB, restarted_url: str, events: Recorder, mode: str
) -> None:
    """The server goes down (a clean shutdown, or SIGKILL as in a crash)
    while a writer commits a row every 2 ms, and comes back once the
    writer has failed a few times; the writer goes on. The listener says
    listener_disconnected, reconnects by itself within about the reconnect
    cap with ``gap=False``, and every row that committed (the table says
    which did) arrives exactly once, in commit order: none lost in the
    outage, none delivered twice after it."""
    url = restarted_url
    app, ext, made = watching_orders(url, DBNOTIFY_RECONNECT_MAX_DELAY=0.5)
    writer: Writer | None = None
    try:
        with Lifecycle().connected() as life:
            ext.start(app)
            writer = Writer(url)
            poll_until(lambda: len(row_pks(events)) >= 200, "200 rows delivered before the stop")
            t_stop = time.monotonic()
            if mode == "crash":
                crash(restarted_server)
            else:
                restarted_server.stop()
            _, lost, t_lost = life.wait_for_name("disconnected")
            poll_until(lambda: len(writer.errors) >= 3, "3 failed writes while the server is down")
            restarted_server.start()
            t_up = time.monotonic()
            failed_at = writer.next_pk
            _, again, t_again = life.wait_for_name("connected", 2)
            poll_until(
                lambda: (pks := row_pks(events)) and pks[-1] > failed_at + 200,
                "200 rows committed after the restart delivered",
            )
            writer.stop()
            last = writer.next_pk
            db = MySQLDB(url)
            db("INSERT INTO orders VALUES (?, 'last', 1)", (last,))
            db.close()
            poll_until(lambda: last in row_pks(events), "the last row delivered")
    finally:
        if writer is not None:
            writer.stop()
        for made_app, made_ext in made:
            made_ext.close(made_app)
    committed = table_pks(url)
    in_doubt = sorted(set(writer.unknown) & set(committed))
    print(
        f"\nserver {mode}: listener_disconnected {t_lost - t_stop:.3f}s after the stop; "
        f"the server took {t_up - t_stop:.2f}s to be back; listener_connected "
        f"{t_again - t_up:.3f}s after that; {len(committed)} rows committed, "
        f"{len(writer.unknown)} writes failed ({len(in_doubt)} of them committed all the same); "
        f"the first error: {writer.errors[0]!r}"
    )
    assert isinstance(lost["error"], Exception), lost
    assert again == {"reconnect": True, "gap": False}, again
    assert t_again - t_up < 3, "no reconnection within about the 0.5s reconnect cap"
    assert set(writer.committed) <= set(committed), "a row whose commit returned is missing"
    assert_once(row_pks(events), committed, "the listener")
    assert [name for name, _ in life.names()] == ["connected", "disconnected", "connected"]
    assert ext.listener_state(app).reconnects == 1


def pool_sessions(admin: Any, database: str) -> int:
    """Sessions on ``database`` but the admin's own (one is the listener's)."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM information_schema.PROCESSLIST "
            "WHERE DB = %s AND ID <> CONNECTION_ID()",
            (database,),
        )
        return int(cur.fetchone()[0])


def test_notify_after_a_server_restart_gets_a_live_connection(
    restarted_server: ThrowawayMariaDB, restarted_url: str
) -> None:
    """A restart closes the connections the app's pool holds; the next
    ``notify()`` must get a live one (as on PostgreSQL, where each is
    pinged before it is lent), not fail with the dead one's error, and the
    message must be journaled."""
    factory, made = app_factory(restarted_url, "mysql_pool")
    app, ext = factory()
    try:
        ext.install_triggers(app)
        ext.notify("shop", "before", app=app)  # the pool now holds a connection
        restarted_server.stop()
        restarted_server.start()
        ext.notify("shop", "after", app=app)
        bodies = [body for (body,) in MySQLDB(restarted_url)("SELECT body FROM dbnotify_journal")]
        assert len(bodies) == 2 and "after" in bodies[1], bodies
    finally:
        for made_app, made_ext in made:
            made_ext.close(made_app)


def test_first_event_of_a_new_kind_after_a_restart_is_delivered(
    restarted_server: ThrowawayMariaDB, restarted_url: str, events: Recorder
) -> None:
    """Requests on several threads sent messages, so the app's pool holds
    several connections; the server restarts and the listener reconnects.
    The first row event after it, of a kind the listener has not decoded
    before (its shape is looked up through the pool), is delivered, not
    skipped with "could not dispatch" because the pool lent dead
    connections."""
    url = restarted_url
    app, ext, made = watching_orders(url, DBNOTIFY_RECONNECT_MAX_DELAY=0.2)
    database = str(make_url(url).database)
    admin = connect(restarted_server.url)
    try:
        with Lifecycle().connected() as life:
            ext.start(app)

            def requests() -> bool:
                barrier = threading.Barrier(3)

                def request() -> None:
                    barrier.wait(WAIT)
                    for _ in range(20):
                        ext.notify("shop", "request", app=app)

                threads = [threading.Thread(target=request) for _ in range(3)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(WAIT)
                return pool_sessions(admin, database) >= 3  # the listener's and two pooled

            poll_until(requests, "two pooled connections after concurrent notify() calls")
            restarted_server.stop()
            restarted_server.start()
            life.wait_for_name("connected", 2)
            writer = connect(url)
            with writer.cursor() as cur:
                cur.execute("INSERT INTO orders VALUES (1, 'first row event', 1)")
            # On the writer's connection, not through the pool: a marker
            # that arrives after anything pending.
            ext.notify("marker", "end", connection=writer, app=app)
            writer.close()
            poll_until(
                lambda: "end" in events.items,
                "the marker sent after the row (the listener is not stuck)",
            )
            assert row_pks(events) == [1], (
                f"the row committed before the marker was not delivered: {events.items[-5:]!r}"
            )
    finally:
        with contextlib.suppress(pymysql.MySQLError):
            admin.close()
        for made_app, made_ext in made:
            made_ext.close(made_app)


# -- the listener's session killed -------------------------------------------------


def listener_session(admin: Any, database: str, others: Collection[int]) -> int:
    """The connection id of the listener's session on ``database``: the
    one (but ``others`` and the admin's own) that keeps running queries,
    its QUERY_ID moving between every two looks at PROCESSLIST (MariaDB),
    however idle the app. Bounded."""
    history: list[dict[int, int]] = []
    deadline = time.monotonic() + WAIT
    while True:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT ID, QUERY_ID FROM information_schema.PROCESSLIST "
                "WHERE DB = %s AND ID <> CONNECTION_ID()",
                (database,),
            )
            history.append({int(i): int(q) for i, q in cur.fetchall() if int(i) not in others})
        recent = history[-4:]
        if len(recent) == 4:
            busy = [
                sid
                for sid in recent[-1]
                if all(
                    sid in a and sid in b and a[sid] < b[sid] for a, b in itertools.pairwise(recent)
                )
            ]
            if len(busy) == 1:
                return busy[0]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no single session polling the journal within {WAIT}s: {history[-4:]}"
            )
        time.sleep(0.1)  # the listener polls at least every 0.05s


def test_killed_listener_session_reconnects_losing_and_repeating_nothing(
    backend: Backend, events: Recorder
) -> None:
    """While a writer commits a row every 2 ms, the listener's session is
    killed three times from another session (``KILL``): each time
    listener_disconnected, then listener_connected with ``gap=False``
    right after; every row arrives exactly once, in commit order, and
    listener_state() counts three reconnects."""
    backend.sql(ORDERS)
    app, ext = backend.make_app(DBNOTIFY_RECONNECT_MAX_DELAY=0.1)
    ext.watch("orders")
    ext.install_triggers(app)
    database = str(make_url(backend.url).database)
    admin = connect(backend.url)
    writer: Writer | None = None
    kills: list[float] = []
    try:
        with Lifecycle().connected() as life:
            ext.start(app)
            writer = Writer(backend.url)
            for n in range(2, 5):
                delivered = len(row_pks(events))
                poll_until(
                    lambda d=delivered: len(row_pks(events)) >= d + 100,
                    f"100 more rows delivered before kill {n - 1}",
                )
                session = listener_session(admin, database, writer.sessions)
                t_kill = time.monotonic()
                with admin.cursor() as cur:
                    cur.execute(f"KILL {session}")
                _, _, t_again = life.wait_for_name("connected", n)
                kills.append(t_again - t_kill)
            delivered = len(row_pks(events))
            poll_until(
                lambda: len(row_pks(events)) >= delivered + 100,
                "100 more rows delivered after the last kill",
            )
            writer.stop()
            last = writer.next_pk
            backend.sql("INSERT INTO orders VALUES (?, 'last', 1)", (last,))
            poll_until(lambda: last in row_pks(events), "the last row delivered")
            events.assert_no_more(len(events.items), marker(ext, app))
    finally:
        if writer is not None:
            writer.stop()
        admin.close()
    print(f"\nKILL of the listener's session: listener_connected after {kills} s")
    assert not writer.errors, writer.errors[:3]
    assert_once(row_pks(events), table_pks(backend.url), "the listener")
    names = [name for name, _ in life.names()]
    assert names == ["connected"] + ["disconnected", "connected"] * 3, names
    reconnects = [kwargs for name, kwargs in life.names() if name == "connected"][1:]
    assert reconnects == [{"reconnect": True, "gap": False}] * 3, reconnects
    assert ext.listener_state(app).reconnects == 3


# -- housekeeping ------------------------------------------------------------------


def refuse_poison(event: ChangeEvent) -> None:
    """A once receiver that fails for good on a row whose item is 'poison'."""
    if (event.new or {}).get("item") == "poison":
        raise RuntimeError("poison")


def test_housekeeping_never_delivers_an_old_event_again(backend: Backend, events: Recorder) -> None:
    """A once receiver fails for good on row 1, so housekeeping keeps its
    journal row (for inspection) while it prunes the later rows every
    listener has read (retention 1 s here), but for the newest: the
    journal's newest id never goes down, so the listener cannot take the
    pruned journal for a new one. Row 1 reaches the ordinary receivers
    once, not again after the prune."""
    backend.sql(ORDERS)
    app, ext = backend.make_app(DBNOTIFY_PAYLOAD_RETENTION=1, DBNOTIFY_ONCE_ATTEMPTS=1)
    ext.on("orders", once=True)(refuse_poison)
    ext.install_triggers(app)
    ext.start(app)
    backend.sql("INSERT INTO orders VALUES (1, 'poison', 1)")
    backend.sql("INSERT INTO orders VALUES (2, 'fine', 1)")
    backend.sql("INSERT INTO orders VALUES (3, 'fine', 1)")
    poll_until(lambda: row_pks(events) == [1, 2, 3], "rows 1 to 3 delivered")
    ((kept,),) = backend.sql("SELECT id FROM dbnotify_journal WHERE body LIKE '%poison%'")
    newest = max(backend.journal_ids())
    poll_until(
        lambda: backend.journal_ids() == [kept, newest],
        "housekeeping to prune every journal row but the failed event's and the newest",
    )
    backend.sql("INSERT INTO orders VALUES (4, 'after', 1)")
    poll_until(
        lambda: row_pks(events) == [1, 2, 3, 4],
        "row 4, and no old event delivered again after housekeeping",
    )
    events.assert_no_more(len(events.items), marker(ext, app))


# -- processes of tests/apps/once_app.py ------------------------------------------


class OnceApp:
    """One process of tests/apps/once_app.py, its JSON lines parsed as they
    are read; its stderr in a file."""

    def __init__(
        self,
        name: str,
        url: str,
        receivers: list[str],
        config: dict[str, Any],
        stderr: Path,
        victim: bool = False,
    ) -> None:
        self.name, self.stderr = name, stderr
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        env.pop("ONCE_APP_VICTIM", None)
        if victim:
            env["ONCE_APP_VICTIM"] = "1"
        with open(stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from tests.apps.once_app import main; main()",
                    url,
                    ",".join(receivers),
                    json.dumps(config),
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self.lines = Lines(self.proc.stdout, name)
        self.items: list[dict[str, Any]] = []
        self.ready = self.exited = False

    def _take(self, line: str) -> None:
        item = json.loads(line)
        if item.get("ready"):
            self.ready = True
        self.items.append(item)

    def pump(self) -> None:
        """Parse whatever lines are ready, without waiting."""
        if self.exited:
            return
        self.lines.drain()
        while b"\n" in self.lines.buf:
            self._take(self.lines.readline("a line"))

    def handled(self, receiver: str = "record") -> list[dict[str, Any]]:
        return [item for item in self.items if item.get("r") == receiver]

    def stop(self) -> None:
        """End of stdin: the app stops and exits 0; read what it printed."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        for line in self.lines.rest():
            if line:
                self._take(line)
        code = self.proc.wait(WAIT)
        self.exited = True
        assert code == 0, f"{self.name} exited with {code}: {self.stderr.read_text()[-3000:]}"

    def kill(self) -> None:
        self.pump()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)
        for line in self.lines.rest():
            if line:
                self._take(line)
        self.exited = True

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def __repr__(self) -> str:
        kinds = Counter(
            str(item.get("r", "failed" if "failed" in item else "other")) for item in self.items
        )
        return f"<{self.name} pid={self.proc.pid} {dict(kinds)}>"


def wait_until(
    apps: Collection[OnceApp], check: Callable[[], object], what: str, timeout: float = WAIT
) -> None:
    """Read the apps' lines until ``check()`` is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        left = deadline - time.monotonic()
        live = [app for app in apps if not app.exited]
        if left <= 0:
            raise AssertionError(f"{what}: not within {timeout:.1f}s; {list(apps)}")
        for app in live:
            if app.proc.poll() is not None:
                app.pump()
                raise AssertionError(
                    f"{app.name} exited ({app.proc.returncode}) while waiting for {what}: "
                    f"{app.stderr.read_text()[-3000:]}"
                )
        if live:
            select.select([app.lines.fd for app in live], [], [], min(left, 0.05))
        for app in live:
            app.pump()


class OnceApps:
    """Starts once_app processes (each waited for until ready); all are
    killed at the end."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url, self.tmp_path = url, tmp_path
        self.started: list[OnceApp] = []

    def start(
        self, names: str, receivers: list[str], config: dict[str, Any], victim: bool = False
    ) -> list[OnceApp]:
        apps = [
            OnceApp(
                name, self.url, receivers, config, self.tmp_path / f"{name}.stderr", victim=victim
            )
            for name in names
        ]
        self.started += apps
        wait_until(apps, lambda: all(app.ready for app in apps), f"{names} ready")
        return apps

    def handled(self, receiver: str = "record") -> list[dict[str, Any]]:
        return [item for app in self.started for item in app.handled(receiver)]

    def close(self) -> None:
        for app in self.started:
            app.close()


@pytest.fixture()
def once_apps(backend: Backend, tmp_path: Path) -> Iterator[OnceApps]:
    """An ``orders`` table on the test's MySQL database, and what starts
    processes of tests/apps/once_app.py on it."""
    backend.sql(ORDERS)
    apps = OnceApps(backend.url, tmp_path)
    yield apps
    apps.close()


def install(url: str, receivers: list[str]) -> None:
    """install-triggers for the app with these receivers, from this process
    (no listener): the once receivers are registered at "now"."""
    app, ext = once_app.build(url, receivers)
    try:
        ext.install_triggers(app)
    finally:
        ext.close(app)


def journal_ids(backend: Backend) -> set[int]:
    """Ids of the journaled row events (of ``orders``, the only table watched)."""
    return {i for (i,) in backend.sql("SELECT id FROM dbnotify_journal WHERE shape IS NOT NULL")}


def claims(backend: Backend) -> dict[int, tuple[str, int, str | None]]:
    """``event id -> (state, attempts, claimed_by)`` of the record receiver's claims."""
    rows = backend.sql(
        "SELECT event_id, state, attempts, claimed_by FROM dbnotify_claims WHERE receiver = ?",
        (RECORD,),
    )
    return {int(i): (state, int(n), by) for i, state, n, by in rows}


def settled_claims(backend: Backend) -> dict[int, tuple[str, int, str | None]]:
    """The claims once none is 'running' (a receiver prints its line just
    before its claim is marked done)."""
    return poll_until(
        lambda: (
            (found := claims(backend))
            and all(state != "running" for state, _, _ in found.values())
            and found
        ),
        "every claim of the once receiver finished",
    )


def repeated(values: list[Any]) -> list[Any]:
    return sorted(v for v, n in Counter(values).items() if n > 1)


def test_rows_written_while_every_process_is_stopped_are_handled_once(
    backend: Backend, once_apps: OnceApps
) -> None:
    """Two processes of the app run a once receiver while a writer commits
    a row every 2 ms; both stop, and the writer commits 300 more rows
    while no process runs; two new processes start. Every row committed
    after install-triggers (before, during and after the stop) is handled
    by the once receiver exactly once across the four processes, the rows
    of the stop by the new ones; every claim is done after one attempt."""
    install(backend.url, ["plain", "record"])
    before = once_apps.start("AB", ["plain", "record"], {})
    writer = Writer(backend.url)
    try:
        wait_until(before, lambda: len(once_apps.handled()) >= 100, "100 rows handled before")
        for app in before:
            assert app.proc.stdin is not None
            app.proc.stdin.close()  # both stop at once
        for app in before:
            app.stop()
        stopped_at = writer.next_pk
        poll_until(lambda: writer.next_pk > stopped_at + 300, "300 rows committed while none runs")
        restarted_at = writer.next_pk
        after = once_apps.start("CD", ["plain", "record"], {})
        wait_until(
            after,
            lambda: any(item["pk"] > restarted_at + 100 for item in once_apps.handled()),
            "rows committed after the restart handled",
        )
    finally:
        writer.stop()
    assert not writer.errors, writer.errors[:3]
    last = writer.next_pk
    backend.sql("INSERT INTO orders VALUES (?, 'last', 1)", (last,))
    expected = journal_ids(backend)
    wait_until(
        after,
        lambda: {item["id"] for item in once_apps.handled()} >= expected,
        "every journaled row handled by the once receiver",
    )
    got = [item["id"] for item in once_apps.handled()]
    by_pk = {item["pk"]: item for item in once_apps.handled()}
    during = list(range(stopped_at, restarted_at))
    print(
        f"\n{stopped_at - 1} rows before the stop, {len(during)} while stopped, "
        f"{last - restarted_at + 1} after; handled by "
        + ", ".join(f"{app.name}: {len(app.handled())}" for app in once_apps.started)
    )
    assert not repeated(got), f"handled more than once: {repeated(got)[:20]}"
    assert set(got) == expected, f"not journaled: {sorted(set(got) - expected)[:20]}"
    assert sorted(by_pk) == table_pks(backend.url)
    stranded = [pk for pk in during if by_pk[pk]["pid"] not in {a.proc.pid for a in after}]
    assert not stranded, f"rows of the stop handled by a stopped process: {stranded[:10]}"
    settled = settled_claims(backend)
    assert set(settled) == expected
    counts = Counter((state, attempts) for state, attempts, _ in settled.values())
    assert counts == {("done", 1): len(expected)}, counts


def test_process_killed_inside_a_large_transaction_handles_nothing_twice(
    backend: Backend, once_apps: OnceApps
) -> None:
    """One transaction commits 5,000 rows; the process running the once
    receiver is SIGKILLed in the middle of their delivery (its receiver
    hangs on row 2,500). A process started after it takes over the dead
    process's claims once their lease (1 s here) runs out: every one of
    the 5,000 events is handled exactly once across both processes (the
    one it was inside, again, by the new one) and every claim ends done."""
    total, stuck = 5000, 2500
    config = {"DBNOTIFY_ONCE_LEASE": 1.0}
    install(backend.url, ["record"])
    (victim,) = once_apps.start("V", ["record"], config, victim=True)
    db = MySQLDB(backend.url)
    try:
        db("BEGIN")
        db(
            "INSERT INTO orders VALUES "
            + ", ".join(
                f"({pk}, '{'block' if pk == stuck else 'bulk'}', 1)" for pk in range(1, total + 1)
            )
        )
        db("COMMIT")
    finally:
        db.close()
    wait_until(
        [victim],
        lambda: any(item["pk"] == stuck for item in victim.handled("attempt")),
        f"the victim inside row {stuck}",
    )
    victim.kill()
    done_before = len(victim.handled())
    expected = journal_ids(backend)
    assert len(expected) == total
    left_running = [i for i, (state, _, _) in claims(backend).items() if state == "running"]
    assert 0 < done_before < total, f"not in the middle: {done_before} handled"
    t_heir = time.monotonic()
    (heir,) = once_apps.start("H", ["record"], config)
    wait_until(
        [heir],
        lambda: {item["id"] for item in once_apps.handled()} >= expected,
        f"all {total} events handled",
        timeout=LONG,
    )
    took = time.monotonic() - t_heir
    backend.sql("INSERT INTO orders VALUES (?, 'marker', 1)", (total + 1,))
    wait_until([heir], lambda: any(i["pk"] == total + 1 for i in heir.handled()), "the marker")
    print(
        f"\nvictim killed after handling {done_before} of {total} events, "
        f"{len(left_running)} claims left running; the heir handled the rest "
        f"({len(heir.handled()) - 1}) within {took:.2f}s of its start"
    )
    got = [item["id"] for item in once_apps.handled() if item["pk"] <= total]
    assert not repeated(got), f"handled more than once: {repeated(got)[:20]}"
    assert set(got) == expected
    assert [item["pk"] for item in victim.handled()] == list(range(1, done_before + 1))
    settled = settled_claims(backend)
    assert {state for state, _, _ in settled.values()} == {"done"}, Counter(
        state for state, _, _ in settled.values()
    )
    ((stuck_id,),) = backend.sql("SELECT id FROM dbnotify_journal WHERE body LIKE '%block%'")
    assert settled[stuck_id][1] == 2, f"the hung event's claim: {settled[stuck_id]}"


# -- gunicorn -------------------------------------------------------------------------


def session_holders(admin: Any, database: str, pids: list[int]) -> dict[int, list[int]]:
    """For each session on ``database`` that this process does not hold,
    by its client port: which of ``pids`` holds its socket."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT HOST FROM information_schema.PROCESSLIST "
            "WHERE DB = %s AND ID <> CONNECTION_ID()",
            (database,),
        )
        ports = [int(host.rsplit(":", 1)[1]) for (host,) in cur.fetchall() if ":" in host]
    ours = local_ports(os.getpid())
    held = {pid: local_ports(pid) for pid in pids}
    return {port: [pid for pid in pids if port in held[pid]] for port in ports if port not in ours}


class Gunicorn(Server):
    """``gunicorn -w 2`` serving workers_app on MySQL (see test_gunicorn.py)."""

    def __init__(
        self, url: str, worker_class: str, preload: bool, stderr: Path, capture: str = "triggers"
    ) -> None:
        env = app_env(url)
        env.update(DBNOTIFY_TEST_APP_CAPTURE=capture)
        port = free_port()
        argv = [str(require("gunicorn")), "-w", "2", "-k", worker_class]
        argv += ["-b", f"127.0.0.1:{port}", *(["--preload"] if preload else [])]
        argv += [*no_control_socket(), "--graceful-timeout", "5", f"{APP}:app"]
        super().__init__(argv, env, port, stderr)


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_gunicorn_workers_each_receive_each_row_once(
    backend: Backend, tmp_path: Path, worker_class: str, preload: bool
) -> None:
    """gunicorn -w 2 on MySQL, with and without --preload: each worker
    connects a listener of its own before any request, the master none
    (and holds no session); each committed row reaches each worker exactly
    once, in order, and the master never; SIGTERM ends it all without a
    traceback and every session of theirs closes."""
    backend.sql(ORDERS)
    installer, installer_ext = backend.make_app()
    installer_ext.watch("orders")
    installer_ext.install_triggers(installer)
    database = str(make_url(backend.url).database)
    admin = connect(backend.url)
    t0 = time.monotonic()
    server = Gunicorn(backend.url, worker_class, preload, tmp_path / "gunicorn.err")
    try:
        server.wait(lambda _: len(server.pids("listener connected")) >= 2, "2 listeners connected")
        t_listening = time.monotonic() - t0
        workers = set(server.pids("listener connected"))
        assert len(workers) == 2, f"a worker connected twice: {server.lines}"
        assert server.master not in workers, "the gunicorn master started a listener"
        imported = server.pids("imported")
        if preload:
            assert imported == [server.master], server.lines
        else:
            assert sorted(imported) == sorted(workers), server.lines

        rows = 50
        for pk in range(1, rows + 1):
            backend.sql("INSERT INTO orders VALUES (?, 'x', 1)", (pk,))
        backend.sql("BEGIN")
        for pk in range(rows + 1, 2 * rows + 1):
            backend.sql("INSERT INTO orders VALUES (?, 'in one transaction', 1)", (pk,))
        backend.sql("COMMIT")
        marker_pk = 2 * rows + 1  # once each worker has it, it has everything before
        backend.sql("INSERT INTO orders VALUES (?, 'marker', 1)", (marker_pk,))
        server.wait(
            lambda _: all(marker_pk in server.received().get(pid, []) for pid in workers),
            f"row {marker_pk} in both workers",
        )
        got = server.received()
        assert got == {pid: list(range(1, marker_pk + 1)) for pid in workers}, {
            pid: (len(pks), repeated(pks)) for pid, pks in got.items()
        }
        holders = session_holders(admin, database, [server.master, *workers])
        assert all(len(pids) == 1 for pids in holders.values()), holders
        held_by = {pids[0] for pids in holders.values()}
        assert held_by == workers, f"sessions (client port -> holder): {holders}"
        response = server.get("/")
        assert response.split(b"\r\n", 1)[0].endswith(b"200 OK"), response[:200]

        took = server.stop(signal.SIGTERM)
        assert server.received() == got, "a row arrived twice, or in the master"
        poll_until(
            lambda: not session_holders(admin, database, []),
            "every session of gunicorn's closed after it stopped",
        )
    finally:
        server.kill()
        admin.close()
    print(
        f"\ngunicorn -k {worker_class} {'--preload' if preload else '(no --preload)'} on MySQL: "
        f"workers listening {t_listening:.3f}s after start; stopped {took:.3f}s after SIGTERM"
    )


@pytest.mark.backends("binlog")
def test_gunicorn_workers_share_one_leader_of_the_binary_log(
    backend: Backend, tmp_path: Path
) -> None:
    """gunicorn -w 2 --preload (gthread) with binary-log capture: exactly
    one worker follows the log, the master never; each row reaches each
    worker once, in order. When the leading worker is killed, the other
    worker leads, and rows committed meanwhile reach it once each."""
    backend.sql(ORDERS)
    installer, installer_ext = backend.make_app()
    installer_ext.watch("orders")
    installer_ext.install_triggers(installer)
    server = Gunicorn(backend.url, "gthread", True, tmp_path / "gunicorn.err", "binlog")
    try:
        server.wait(lambda _: len(server.pids("listener connected")) >= 2, "2 listeners connected")
        server.wait(lambda _: bool(server.pids("leads the binary log")), "a worker to lead")
        workers = set(server.pids("listener connected"))
        (leader,) = server.pids("leads the binary log")
        assert leader in workers and leader != server.master, server.lines
        for pk in range(1, 21):
            backend.sql("INSERT INTO orders VALUES (?, 'x', 1)", (pk,))
        server.wait(
            lambda _: all(20 in server.received().get(pid, []) for pid in workers),
            "row 20 in both workers",
        )
        assert server.received() == {pid: list(range(1, 21)) for pid in workers}
        assert server.pids("leads the binary log") == [leader], "a second leader"

        os.kill(leader, signal.SIGKILL)
        (other,) = workers - {leader}
        for pk in range(21, 41):
            backend.sql("INSERT INTO orders VALUES (?, 'after the kill', 1)", (pk,))
        server.wait(
            lambda _: server.pids("leads the binary log")[1:] != [],
            "another process to lead after the leader was killed",
        )
        server.wait(lambda _: 40 in server.received().get(other, []), "row 40 in the other worker")
        assert server.received()[other] == list(range(1, 41)), server.received()[other]
        assert leader not in server.pids("leads the binary log")[1:]
    finally:
        server.kill()
