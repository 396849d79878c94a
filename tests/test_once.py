"""Exactly-once receivers, ``on(..., once=True)``: across real processes on
PostgreSQL and on SQLite files, each durable event is handled by exactly one
process, even events committed while no process ran; failures are retried
with backoff, then kept and reported once; a dead process's claim is taken
over. The processes run ``tests/apps/once_app.py``."""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from flask_dbnotify import ChangeEvent, DBNotify

from ._helpers import WAIT, Backend, MySQLDB
from .apps import once_app

# Triggers mode and SQLite only: its processes start with triggers mode's
# settings. WAL mode's once receivers are tested in test_wal.py.
pytestmark = pytest.mark.backends("postgresql", "sqlite", "mysql", "binlog")

ROOT = Path(__file__).resolve().parent.parent
LONG = 60.0  # the 1,000-event run may take this long on a slow machine
RECORD = "tests.apps.once_app.record"
KEEPERS = "tests.apps.once_app.keepers"
INSERTS_ONLY = "tests.apps.once_app.inserts_only"
TABLES = {
    "postgresql": "CREATE TABLE orders (id serial PRIMARY KEY, item text, qty int)",
    "sqlite": "CREATE TABLE orders (id INTEGER PRIMARY KEY AUTOINCREMENT, item TEXT, qty INTEGER)",
    "mysql": "CREATE TABLE orders (id serial PRIMARY KEY, item text, qty int)",
    "binlog": "CREATE TABLE orders (id serial PRIMARY KEY, item text, qty int)",
}
#: Quick retries, so failure tests finish in a few seconds.
RETRIES = {"DBNOTIFY_ONCE_ATTEMPTS": 3, "DBNOTIFY_ONCE_RETRY_DELAY": 0.2}


# -- the database ----------------------------------------------------------------


class Database:
    """A writer of its own on the test database (PostgreSQL or a SQLite
    file), autocommit; statements use ``?`` placeholders on both."""

    def __init__(self, kind: str, url: str, path: str | None) -> None:
        self.kind, self.url, self.path = kind, url, path
        #: What every app on it is configured with.
        self.config = {"DBNOTIFY_CAPTURE": "binlog"} if kind == "binlog" else {}
        self.conn: Any
        if kind == "postgresql":
            self.conn = psycopg2.connect(url)
            self.conn.autocommit = True
        elif kind in ("mysql", "binlog"):
            self.conn = MySQLDB(url)
            self.conn("SET SESSION max_recursive_iterations = 100000")  # MariaDB's is 1000
        else:
            assert path is not None
            self.conn = sqlite3.connect(path, timeout=30, isolation_level=None)

    def another(self) -> Database:
        """A second connection (for a writer thread)."""
        return Database(self.kind, self.url, self.path)

    def __call__(self, statement: str, params: Any = ()) -> list[tuple[Any, ...]]:
        if self.kind == "postgresql":
            with self.conn.cursor() as cur:
                cur.execute(statement.replace("?", "%s"), params or None)
                return list(cur.fetchall()) if cur.description else []
        if self.kind in ("mysql", "binlog"):
            return self.conn(statement, params or None)
        return list(self.conn.execute(statement, params).fetchall())

    def transaction(self, *statements: tuple[str, Any]) -> None:
        self("BEGIN")
        for statement, params in statements:
            self(statement, params)
        self("COMMIT")

    def insert(self, item: str, qty: int = 1) -> int:
        return int(
            self("INSERT INTO orders (item, qty) VALUES (?, ?) RETURNING id", (item, qty))[0][0]
        )

    def bulk_insert(self, item: str, count: int) -> None:
        if self.kind in ("mysql", "binlog"):
            self(
                "INSERT INTO orders (item, qty) WITH RECURSIVE g(n) AS "
                "(SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?) SELECT ?, n FROM g",
                (count, item),
            )
            return
        self(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?) "
            "INSERT INTO orders (item, qty) SELECT ?, n FROM g",
            (count, item),
        )

    def journal_ids(self) -> set[int]:
        """Ids of the journaled row events of ``orders``."""
        if self.kind == "postgresql":
            rows = self("SELECT id FROM dbnotify_journal WHERE watch = 'orders'")
        else:
            rows = self("SELECT id FROM dbnotify_journal WHERE shape IS NOT NULL")
        return {row[0] for row in rows}

    def claims(self, receiver: str) -> dict[int, dict[str, Any]]:
        rows = self(
            "SELECT event_id, state, attempts, claimed_by, last_error FROM dbnotify_claims "
            "WHERE receiver = ?",
            (receiver,),
        )
        return {
            r[0]: {"state": r[1], "attempts": r[2], "claimed_by": r[3], "last_error": r[4]}
            for r in rows
        }

    def close(self) -> None:
        self.conn.close()


@pytest.fixture()
def database(backend: Backend) -> Iterator[Database]:
    """An empty database with an ``orders`` table; PostgreSQL, SQLite, MySQL."""
    db = Database(backend.name, backend.url, backend.path)
    db(TABLES[backend.name])
    yield db
    db.close()


def install(db: Database, receivers: list[str], **config: Any) -> None:
    """``install_triggers()`` for the app with these receivers, from this
    process (no listener): registers the once receivers at "now"."""
    app, ext = once_app.build(db.url, receivers, **db.config, **config)
    try:
        ext.install_triggers(app)
    finally:
        ext.close(app)


# -- the processes ---------------------------------------------------------------


class Child:
    """One process running the app; its stdout parsed into ``lines``."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], stderr: Path) -> None:
        self.name, self.proc, self.stderr = name, proc, stderr
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.lines: list[dict[str, Any]] = []
        self.closed = self.ending = False

    def handled(self, receiver: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("r") == receiver]

    def failures(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if "failed" in line]

    def summary(self) -> str:
        kinds = Counter(
            str(line.get("r", "failed" if "failed" in line else "other")) for line in self.lines
        )
        return f"{self.name}: {dict(kinds)}"


class Fleet:
    """Starts app processes; every wait is bounded and reads all of them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        db: Database,
        receivers: list[str],
        config: dict[str, Any],
        victim: bool = False,
    ) -> Child:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        env.pop("ONCE_APP_VICTIM", None)
        if victim:
            env["ONCE_APP_VICTIM"] = "1"
        stderr = self.tmp_path / f"{name}.stderr"
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from tests.apps.once_app import main; main()",
                    db.url,
                    ",".join(receivers),
                    json.dumps({**db.config, **config}),
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        child = Child(name, proc, stderr)
        self.children.append(child)
        self.wait(lambda: any(line.get("ready") for line in child.lines), f"{name} ready")
        return child

    def handled(self, receiver: str) -> list[dict[str, Any]]:
        return [line for child in self.children for line in child.handled(receiver)]

    def wait(self, until: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            open_children = {c.fd: c for c in self.children if not c.closed}
            if left <= 0 or not open_children:
                raise AssertionError(
                    f"{what}: not within {timeout}s; so far "
                    + "; ".join(c.summary() for c in self.children)
                )
            # Short slices: some conditions read the database.
            ready, _, _ = select.select(list(open_children), [], [], min(left, 0.05))
            for fd in ready:
                self._read(open_children[fd])

    def _read(self, child: Child) -> None:
        chunk = os.read(child.fd, 1 << 16)
        if not chunk:
            child.closed = True
            if not child.ending:
                raise AssertionError(
                    f"{child.name} exited unexpectedly (code {child.proc.wait(WAIT)}): "
                    f"{child.stderr.read_text()[-3000:]}"
                )
            return
        child.buf += chunk
        *complete, child.buf = child.buf.split(b"\n")
        for raw in complete:
            child.lines.append(json.loads(raw))

    def stop(self, child: Child) -> None:
        """End of stdin: the app stops and exits 0 (bounded)."""
        assert child.proc.stdin is not None
        child.ending = True
        child.proc.stdin.close()
        self.wait(lambda: child.closed, f"{child.name} to exit")
        code = child.proc.wait(WAIT)
        assert code == 0, f"{child.name} exited {code}: {child.stderr.read_text()[-3000:]}"

    def kill(self, child: Child) -> None:
        child.ending = True
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(WAIT)
        self.wait(lambda: child.closed, f"{child.name} to close its output")

    def close(self) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.kill()
            child.proc.wait(WAIT)
            for pipe in (child.proc.stdin, child.proc.stdout):
                if pipe is not None:
                    pipe.close()


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    made = Fleet(tmp_path)
    yield made
    made.close()


def settled_claims(fleet: Fleet, db: Database, receiver: str) -> dict[int, dict[str, Any]]:
    """The receiver's claims once none is 'running' (a receiver reports an
    event just before its claim is marked done)."""
    fleet.wait(
        lambda: all(c["state"] != "running" for c in db.claims(receiver).values()),
        f"every claim of {receiver} to be finished",
    )
    return db.claims(receiver)


_flushes = itertools.count(1)


def flush(fleet: Fleet, db: Database, children: list[Child]) -> None:
    """Make sure every process has made a once pass since now: a first
    marker reaches each process's ordinary receiver, so the batch holding
    it, and the once pass that follows it, are done when a second marker
    reaches them all. (On PostgreSQL that pass may not see the newest
    events yet, while an older transaction runs anywhere on the server.)"""
    n = next(_flushes)
    for item in (f"flush-{n}a", f"flush-{n}b"):
        db.insert(item)
        for child in children:
            fleet.wait(
                got_item(child, "plain", item), f"{item} at {child.name}'s ordinary receiver"
            )


def got_item(child: Child, receiver: str, item: str) -> Callable[[], bool]:
    return lambda: any(line["item"] == item for line in child.handled(receiver))


def ids(lines: list[dict[str, Any]]) -> list[int]:
    return [line["id"] for line in lines]


def repeated(values: list[Any]) -> list[Any]:
    return [v for v, n in Counter(values).items() if n > 1]


def wait_handled(fleet: Fleet, receiver: str, item: str, count: int = 1) -> None:
    fleet.wait(
        lambda: sum(1 for line in fleet.handled(receiver) if line["item"] == item) >= count,
        f"{count} {item!r} event(s) handled by {receiver}",
    )


# -- many processes, many events -----------------------------------------------


def write_thousand(db: Database) -> None:
    """1,000 events: multi-row statements, single-row transactions, and a
    transaction of two multi-row updates."""
    for _ in range(4):
        db.bulk_insert("bulk", 100)
        for n in range(50):
            db.insert("single", n)
    pks = [row[0] for row in db("SELECT id FROM orders ORDER BY id")]
    assert len(pks) == 600
    update = "UPDATE orders SET qty = qty + 1000 WHERE id BETWEEN ? AND ?"
    db.transaction((update, (pks[0], pks[99])), (update, (pks[100], pks[199])))
    for pk in pks[200:300]:
        db("UPDATE orders SET qty = qty + 1 WHERE id = ?", (pk,))
    for pk in pks[500:600]:
        db("DELETE FROM orders WHERE id = ?", (pk,))


def test_two_processes_handle_each_of_1000_events_exactly_once(
    database: Database, fleet: Fleet
) -> None:
    """Two processes compete for 1,000 events committed by a third writer:
    across both, every event is handled once (none twice, none missed) and
    both take part; ordinary ``on()`` receivers and blinker signals still get
    every event in each process."""
    receivers = ["plain", "record", "signal"]
    install(database, receivers)
    a = fleet.start("A", database, receivers, {})
    b = fleet.start("B", database, receivers, {})
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        db = database.another()
        try:
            write_thousand(db)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            db.close()
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()

    def finished() -> bool:
        if errors:
            raise errors[0]
        return done.is_set() and len({line["id"] for line in fleet.handled("record")}) >= 1000

    try:
        fleet.wait(finished, "1,000 events handled by the once receiver", LONG)
    finally:
        thread.join(LONG)
    flush(fleet, database, [a, b])
    fleet.wait(
        lambda: len({line["id"] for line in fleet.handled("record")}) == 1002,
        "the once receiver to handle the flush markers too",
    )

    expected = database.journal_ids()
    assert len(expected) == 1002  # with the two flush markers
    got = ids(fleet.handled("record"))
    assert not repeated(got), f"handled more than once: {repeated(got)[:20]}"
    missing, unexpected = sorted(expected - set(got)), sorted(set(got) - expected)
    assert not missing and not unexpected, f"missing {missing[:20]}, unexpected {unexpected[:20]}"
    ops = Counter(line["op"] for line in fleet.handled("record"))
    assert ops == {"INSERT": 602, "UPDATE": 300, "DELETE": 100}
    share = {child.name: len(child.handled("record")) for child in (a, b)}
    assert all(share.values()), f"one process did all the work: {share}"
    claims = settled_claims(fleet, database, RECORD)
    assert set(claims) == expected
    assert {(c["state"], c["attempts"]) for c in claims.values()} == {("done", 1)}
    for child in (a, b):
        for receiver in ("plain", "signal"):
            seen = ids(child.handled(receiver))
            assert not repeated(seen), f"{child.name} {receiver} repeated {repeated(seen)[:20]}"
            assert set(seen) == expected, (
                f"{child.name} {receiver} missed {sorted(expected - set(seen))[:20]}"
            )


# -- events committed while no process runs --------------------------------------


def test_events_committed_while_no_process_runs_wait_for_the_next_one(
    database: Database, fleet: Fleet
) -> None:
    """install-triggers registers the receiver: events committed after it
    and before any process starts are handled once by the first process;
    events committed before it are not. Across a restart, the next process
    handles only what came after."""
    install(database, [], durable_watch=True)  # the journal, no receiver yet
    database.bulk_insert("before", 3)
    database.insert("before")
    # With binary-log capture nothing is journaled until a process relays
    # it, after the receiver registers: it gets those too (the MySQL page).
    before = 4 if database.kind == "binlog" else 0
    assert len(database.journal_ids()) == 4 - before  # journaled, yet not for the receiver
    install(database, ["record"], durable_watch=True)
    database.bulk_insert("after", 3)
    single = database.insert("after")
    database("UPDATE orders SET qty = 99 WHERE item = 'after'")
    database("DELETE FROM orders WHERE id = ?", (single,))
    config = {"durable_watch": True}
    a = fleet.start("A", database, ["record"], config)
    wait_handled(fleet, "record", "after", 9)
    if before:
        wait_handled(fleet, "record", "before", before)
    database.insert("marker-a")
    wait_handled(fleet, "record", "marker-a")
    items = Counter(line["item"] for line in a.handled("record"))
    expected = {"after": 9, "marker-a": 1} | ({"before": before} if before else {})
    assert items == expected, f"A handled {dict(items)}"

    fleet.stop(a)
    database.bulk_insert("later", 2)
    database("UPDATE orders SET qty = 7 WHERE item = 'later'")
    b = fleet.start("B", database, ["record"], config)
    wait_handled(fleet, "record", "later", 4)
    database.insert("marker-b")
    wait_handled(fleet, "record", "marker-b")
    items = Counter(line["item"] for line in b.handled("record"))
    assert items == {"later": 4, "marker-b": 1}, f"B handled {dict(items)}"
    got = ids(fleet.handled("record"))
    assert not repeated(got)
    claims = settled_claims(fleet, database, RECORD)
    assert set(claims) == set(got)
    assert {c["state"] for c in claims.values()} == {"done"}


def assert_each_handled_once(fleet: Fleet, database: Database, process: Child, count: int) -> None:
    """After a flush: the once receiver of ``process`` handles each of the
    ``count`` events its ordinary receiver saw exactly once, and each claim
    is done after one attempt."""
    flush(fleet, database, [process])  # two more events, and a once pass since
    expected = set(ids(process.handled("plain")))
    assert len(expected) == count
    fleet.wait(
        lambda: set(ids(process.handled("record"))) >= expected,
        "the once receiver to handle every event",
    )
    got = ids(process.handled("record"))
    assert not repeated(got), f"handled more than once: {repeated(got)}"
    assert set(got) == expected
    claims = settled_claims(fleet, database, RECORD)
    assert set(claims) == expected
    assert {(c["state"], c["attempts"]) for c in claims.values()} == {("done", 1)}


def test_receiver_not_yet_registered_gets_events_committed_after_start(
    database: Database, fleet: Fleet
) -> None:
    """A once receiver added without running install-triggers again (so
    not registered yet) still gets every event committed after ``start()``
    has returned in the first process that runs it, each exactly once."""
    install(database, [], durable_watch=True)
    config = {"durable_watch": True}
    a = fleet.start("A", database, ["plain", "record"], config)
    first = database.insert("first")
    fleet.wait(
        lambda: first in [line["pk"] for line in a.handled("record")],
        "the once receiver to handle the event committed right after start() returned",
    )
    # Every event committed after start(), as the ordinary receiver saw it.
    assert_each_handled_once(fleet, database, a, 3)


# -- failures -------------------------------------------------------------------


def test_failing_receiver_is_retried_with_backoff_until_it_succeeds(
    database: Database, fleet: Fleet
) -> None:
    """A receiver that fails twice runs a third time and then succeeds: the
    event is handled once, the claim is done after 3 attempts, each retry
    waits at least the (doubling) retry delay, and receiver_failed is never
    sent for it."""
    install(database, ["record"])
    a = fleet.start("A", database, ["record"], RETRIES)
    flaky = database.insert("flaky:2")
    wait_handled(fleet, "record", "flaky:2")
    marker = database.insert("marker")
    wait_handled(fleet, "record", "marker")
    attempts = [line for line in a.handled("attempt") if line["pk"] == flaky]
    assert [line["attempt"] for line in attempts] == [1, 2, 3]
    # Lower bounds only: a retry never comes before its delay.
    delay = RETRIES["DBNOTIFY_ONCE_RETRY_DELAY"]
    times = [line["t"] for line in attempts]
    assert times[1] - times[0] >= delay - 0.02, times
    assert times[2] - times[1] >= 2 * delay - 0.02, times
    assert [line["pk"] for line in a.handled("record")] == [flaky, marker]
    assert a.failures() == []
    claim = database.claims(RECORD)[attempts[0]["id"]]
    assert (claim["state"], claim["attempts"]) == ("done", 3), claim


def test_always_failing_receiver_fails_for_good_and_is_reported_once(
    database: Database, fleet: Fleet
) -> None:
    """A receiver that always raises runs exactly DBNOTIFY_ONCE_ATTEMPTS
    times; then its claim is 'failed' with the last error, receiver_failed
    is sent once with the final error, and the journal row is kept. Events
    committed meanwhile are handled while it is being retried; an ordinary
    receiver gets the event once and is not retried."""
    install(database, ["plain", "record"])
    a = fleet.start("A", database, ["plain", "record"], RETRIES)
    poison = database.insert("poison")
    fleet.wait(lambda: bool(a.handled("attempt")), "first attempt at the poison event")
    for n in range(3):
        database.insert("ok", n)
    wait_handled(fleet, "record", "ok", 3)
    fleet.wait(lambda: bool(a.failures()), "receiver_failed for the poison event")
    # Two markers in turn: the second is handled by a pass that began after
    # the first pass had looked for retries due.
    for marker in ("marker-1", "marker-2"):
        database.insert(marker)
        wait_handled(fleet, "record", marker)

    attempts = [line for line in a.handled("attempt") if line["pk"] == poison]
    assert [line["attempt"] for line in attempts] == [1, 2, 3]
    event_id = attempts[0]["id"]
    assert a.failures() == [{"failed": "record", "id": event_id, "error": "poison attempt 3"}]
    ok_before_failure = [
        line["item"]
        for line in a.lines[: a.lines.index(a.failures()[0])]
        if line.get("r") == "record"
    ]
    assert ok_before_failure == ["ok", "ok", "ok"], "events waited for the retries"
    claim = database.claims(RECORD)[event_id]
    assert (claim["state"], claim["attempts"]) == ("failed", 3), claim
    assert "poison attempt 3" in claim["last_error"]
    assert event_id in database.journal_ids()
    assert [line["id"] for line in a.handled("plain") if line["pk"] == poison] == [event_id]


def retention_passed(db: Database, event_ids: set[int]) -> Callable[[], bool]:
    """True once housekeeping has deleted the journal rows of these (done)
    events; on MySQL, but the newest journal row, which it always keeps
    (a listener knows a journal made anew by its newest id going down)."""

    def passed() -> bool:
        left = event_ids & db.journal_ids()
        if db.kind in ("mysql", "binlog"):
            left -= {db("SELECT max(id) FROM dbnotify_journal")[0][0]}
        return not left

    return passed


def test_failed_event_keeps_its_journal_row_through_housekeeping(
    database: Database, fleet: Fleet
) -> None:
    """With a short DBNOTIFY_PAYLOAD_RETENTION, housekeeping deletes the
    journal rows of handled events but keeps the row of a failed one (kept
    for inspection)."""
    config = {**RETRIES, "DBNOTIFY_PAYLOAD_RETENTION": 0.4}
    install(database, ["record"])
    a = fleet.start("A", database, ["record"], config)
    poison = database.insert("poison")
    fleet.wait(lambda: bool(a.failures()), "receiver_failed for the poison event")
    event_id = next(line["id"] for line in a.handled("attempt") if line["pk"] == poison)
    database.insert("ok")
    wait_handled(fleet, "record", "ok")
    done = {line["id"] for line in a.handled("record")}
    fleet.wait(retention_passed(database, done), "housekeeping to delete handled journal rows")
    assert event_id in database.journal_ids(), "the failed event's journal row was deleted"
    assert database.claims(RECORD)[event_id]["state"] == "failed"


def test_retry_outlives_the_journal_retention(database: Database, fleet: Fleet) -> None:
    """An event waiting for a retry longer than DBNOTIFY_PAYLOAD_RETENTION
    is still retried and handled, not dropped by housekeeping."""
    config = {
        "DBNOTIFY_ONCE_ATTEMPTS": 3,
        "DBNOTIFY_ONCE_RETRY_DELAY": 1.0,
        "DBNOTIFY_PAYLOAD_RETENTION": 0.3,
    }
    install(database, ["record"])
    a = fleet.start("A", database, ["record"], config)
    flaky = database.insert("flaky:1")
    fleet.wait(lambda: bool(a.handled("attempt")), "first attempt at the flaky event")
    database.insert("ok")
    wait_handled(fleet, "record", "ok")
    ok = {line["id"] for line in a.handled("record")}
    fleet.wait(retention_passed(database, ok), "housekeeping to delete handled journal rows")
    event_id = a.handled("attempt")[0]["id"]
    fleet.wait(
        lambda: database.claims(RECORD)[event_id]["state"] in ("done", "failed"),
        "the flaky event's claim to be done or failed",
    )
    claim = database.claims(RECORD)[event_id]
    assert [line["pk"] for line in a.handled("record")].count(flaky) == 1, (
        f"the retry never ran; claim: {claim}"
    )
    assert (claim["state"], claim["attempts"]) == ("done", 2), claim


@pytest.fixture()
def pg_database(pg_url: str) -> Iterator[Database]:
    db = Database("postgresql", pg_url, None)
    db(TABLES["postgresql"])
    yield db
    db.close()


def test_open_transaction_elsewhere_does_not_hold_back_once_receivers(
    pg_database: Database, fleet: Fleet
) -> None:
    """PostgreSQL: while another session keeps a transaction open (a long
    migration or batch job, on another table), events committed now are
    still handled by the once receiver, as by an ordinary one, each exactly
    once (also after that transaction ends)."""
    install(pg_database, ["plain", "record"])
    a = fleet.start("A", pg_database, ["plain", "record"], {})
    other = pg_database.another()
    try:
        other("BEGIN")
        other("SELECT pg_current_xact_id()")  # it now holds a transaction id
        first, second = pg_database.insert("first"), pg_database.insert("second")
        wait_handled(fleet, "plain", "second")
        fleet.wait(
            lambda: {first, second} <= {line["pk"] for line in a.handled("record")},
            "the once receiver to handle the events while another transaction is open",
        )
    finally:
        other.close()
    assert_each_handled_once(fleet, pg_database, a, 4)


# -- a process that dies mid-event ----------------------------------------------


def test_claim_of_a_killed_process_is_taken_over_after_the_lease(
    database: Database, fleet: Fleet
) -> None:
    """A process is SIGKILLed while its once receiver is inside an event:
    with DBNOTIFY_ONCE_LEASE=1, another process takes the claim over and
    handles the event, once."""
    config = {"DBNOTIFY_ONCE_LEASE": 1.0}
    install(database, ["record"])
    victim = fleet.start("victim", database, ["record"], config, victim=True)
    blocked = database.insert("block")
    fleet.wait(lambda: bool(victim.handled("attempt")), "the victim to start on the event")
    event_id = victim.handled("attempt")[0]["id"]
    fleet.kill(victim)
    claim = database.claims(RECORD)[event_id]
    assert claim["state"] == "running"
    assert claim["claimed_by"].endswith(f":{victim.proc.pid}"), claim

    heir = fleet.start("heir", database, ["record"], config)
    wait_handled(fleet, "record", "block")
    marker = database.insert("marker")
    wait_handled(fleet, "record", "marker")
    assert victim.handled("record") == []
    assert [line["pk"] for line in heir.handled("record")] == [blocked, marker]
    assert [line["attempt"] for line in heir.handled("attempt")] == [1]
    claim = database.claims(RECORD)[event_id]
    assert (claim["state"], claim["attempts"]) == ("done", 2), claim


# -- filters ---------------------------------------------------------------------


def test_where_and_operations_filters_decide_what_is_claimed(
    database: Database, fleet: Fleet
) -> None:
    """``where=`` and ``operations`` work with once=True: a receiver handles
    and claims only the events that match; the others get no claim."""
    receivers = ["plain", "keepers", "inserts_only"]
    install(database, receivers)
    a = fleet.start("A", database, receivers, {})
    keep, skip = database.insert("keep"), database.insert("skip")
    database("UPDATE orders SET qty = 2 WHERE id = ?", (skip,))
    database("UPDATE orders SET qty = 2 WHERE id = ?", (keep,))
    database("DELETE FROM orders WHERE id = ?", (skip,))
    database("DELETE FROM orders WHERE id = ?", (keep,))
    marker = database.insert("keep")
    fleet.wait(
        lambda: (
            marker in [line["pk"] for line in a.handled("keepers")]
            and marker in [line["pk"] for line in a.handled("inserts_only")]
            and marker in [line["pk"] for line in a.handled("plain")]
        ),
        "the marker, through every receiver",
    )
    event = {(line["op"], line["pk"]): line["id"] for line in a.handled("plain")}
    assert len(event) == 7
    want_keepers = {event[op, pk] for op, pk in event if pk in (keep, marker)}
    want_inserts = {event[op, pk] for op, pk in event if op == "INSERT"}
    assert sorted(ids(a.handled("keepers"))) == sorted(want_keepers)
    assert sorted(ids(a.handled("inserts_only"))) == sorted(want_inserts)
    assert set(database.claims(KEEPERS)) == want_keepers
    assert set(database.claims(INSERTS_ONLY)) == want_inserts


# -- receivers without a stable name ---------------------------------------------


def test_callable_object_receiver_runs_once_across_processes(
    database: Database, fleet: Fleet
) -> None:
    """A callable object as a once receiver is either refused or handled by
    exactly one of two processes; never by both."""
    receivers = ["plain", "counter"]
    try:
        install(database, receivers)
    except ValueError:
        return  # Refused, as a lambda is: fine.
    a = fleet.start("A", database, receivers, {})
    b = fleet.start("B", database, receivers, {})
    flush(fleet, database, [a, b])  # both have made a once pass
    one = database.insert("one")
    wait_handled(fleet, "counter", "one")
    flush(fleet, database, [a, b])
    registered = [row[0] for row in database("SELECT receiver FROM dbnotify_receivers")]
    assert len(registered) == 1, f"one receiver, registered under several names: {registered}"
    handled = [line["pid"] for line in fleet.handled("counter") if line["pk"] == one]
    assert len(handled) == 1, f"the event ran in {len(handled)} processes"


# -- misuse ------------------------------------------------------------------------


def _handler(event: ChangeEvent) -> None:
    pass


def test_once_needs_a_durable_watch() -> None:
    """once=True on a non-durable explicit watch raises, in either order;
    a durable watch, or no watch at all, is accepted."""
    ext = DBNotify()
    ext.watch("orders")
    with pytest.raises(ValueError, match="durable"):
        ext.on("orders", once=True)(_handler)

    ext = DBNotify()
    ext.on("orders", once=True)(_handler)
    with pytest.raises(ValueError, match="durable"):
        ext.watch("orders")
    assert ext.watch("orders", durable=True).durable

    ext = DBNotify()
    ext.on("orders")(_handler)  # an implicit, fast watch
    ext.on("orders", once=True)(_handler)
    assert ext.watches["orders"].durable


def test_once_refuses_lambdas() -> None:
    ext = DBNotify()
    with pytest.raises(ValueError, match="named function"):
        ext.on("orders", once=True)(lambda event: None)


def test_once_refuses_two_receivers_with_one_qualified_name() -> None:
    """Processes know a receiver by ``module.qualname``: the same function
    twice, or two functions with one qualified name, are refused."""
    ext = DBNotify()
    ext.on("orders", once=True)(_handler)
    with pytest.raises(ValueError, match="exists already"):
        ext.on("items", once=True)(_handler)

    def make() -> Callable[[ChangeEvent], None]:
        def handler(event: ChangeEvent) -> None:
            pass

        return handler

    ext.on("orders", once=True)(make())
    with pytest.raises(ValueError, match="exists already"):
        ext.on("orders", once=True)(make())
    ext.on("orders")(make())  # not once: no name needed
