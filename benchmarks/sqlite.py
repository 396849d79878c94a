"""SQLite side by side: a bare polling loop, Flask-DBNotify, SQLNotify.

Run:  .venv/bin/python benchmarks/sqlite.py [--rows 100000] [--rounds 3]

Writers run in a separate process, as another worker or a cron job would,
with ``PRAGMA synchronous = NORMAL`` (what WAL applications use: a commit
does not wait for fsync, so the figures are the triggers' work rather
than the disk's).

- bare loop: outbox triggers (INSERT INTO outbox (row_id) VALUES (NEW.id),
  on INSERT and UPDATE) and a thread that polls PRAGMA data_version every
  millisecond and reads the outbox past its cursor: the simplest thing
  that works, and the yardstick.
- flask-dbnotify: DBNotify with watch(), a receiver connected with on().
- SQLNotify (the bench extra), in its async mode, INSERT and UPDATE watched.

Every figure is measured in each of ``--rounds`` rounds, the contenders in
a new order each round, and printed as the median with its spread (min–max)
over the rounds; ratios are taken within a round.

- events/s: one ``--rows``-row INSERT transaction, from the start of the
  writing statement to the last event delivered (as every script counts).
- write: that transaction's time against the same one on a table without
  triggers; and single-row INSERT and UPDATE transactions (the median of
  ``--singles`` each), against the same on that table, with no listener
  running.
- latency: commit to receiver across processes (single-row transactions, a
  few ms apart), p50 and p99 of each round.
- idle CPU: what the listener alone burns, in percent of one core.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import (  # noqa: E402
    Arrivals,
    events_per_second,
    idle_cpu,
    pct,
    print_rates,
    spread,
    start_ours,
)

TABLES = """
CREATE TABLE plain (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, at TEXT);
CREATE TABLE bare (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, at TEXT);
CREATE TABLE ours (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, at TEXT);
CREATE TABLE peer (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, at TEXT);
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, row_id INTEGER);
CREATE TRIGGER bare_outbox AFTER INSERT ON bare BEGIN
  INSERT INTO outbox (row_id) VALUES (NEW.id); END;
CREATE TRIGGER bare_outbox_update AFTER UPDATE ON bare BEGIN
  INSERT INTO outbox (row_id) VALUES (NEW.id); END;
"""

WRITER = r"""
import random, sqlite3, statistics, sys, time
path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = sqlite3.connect(path, isolation_level=None, timeout=30)
conn.execute("PRAGMA synchronous = NORMAL")
clock = time.perf_counter

def txn(sql, params=()):
    conn.execute("BEGIN")
    cur = conn.execute(sql, params)
    conn.execute("COMMIT")
    return cur

if mode == "latency":
    table = sys.argv[4]
    for _ in range(n):
        cur = txn(f"INSERT INTO {table} (name, qty, at) VALUES ('x', 1, datetime())")
        print(cur.lastrowid, clock(), flush=True)
        time.sleep(random.uniform(0.003, 0.006))
elif mode == "bulk":
    table = sys.argv[4]
    start = clock()
    txn(f"WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s "
        f"WHERE value < {n}) INSERT INTO {table} (name, qty, at) "
        f"SELECT 'item ' || value, value, datetime() FROM s")
    print(start, clock(), flush=True)
else:  # singles: every table given, in a new order each round
    tables, rounds = sys.argv[4].split(","), int(sys.argv[5])
    for _ in range(rounds):
        random.shuffle(tables)
        for table in tables:
            inserts, updates = [], []
            for i in range(n):
                start = clock()
                sql = f"INSERT INTO {table} (name, qty, at) VALUES ('s', 1, datetime())"
                key = txn(sql).lastrowid
                inserts.append(clock() - start)
                start = clock()
                txn(f"UPDATE {table} SET qty = qty + ? WHERE id = ?", (i + 1, key))
                updates.append(clock() - start)
            print(table, statistics.median(inserts), statistics.median(updates), flush=True)
"""


def write(path: str, mode: str, n: int, *more: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", WRITER, path, mode, str(n), *more],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split() for line in out.splitlines()]


class BareLoop:
    """Polls data_version every millisecond; reads the outbox past a cursor."""

    def __init__(self, path: str, arrivals: Arrivals) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.position = self.conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]
        self.arrivals = arrivals
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        version = None
        while not self.stop.wait(0.001):
            now = self.conn.execute("PRAGMA data_version").fetchone()[0]
            if now == version:
                continue
            version = now
            rows = self.conn.execute(
                "SELECT id, row_id FROM outbox WHERE id > ? ORDER BY id", (self.position,)
            ).fetchall()
            for outbox_id, row_id in rows:
                self.position = outbox_id
                self.arrivals.add(row_id)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.conn.close()


def start_dbnotify(path: str, arrivals: Arrivals) -> Callable[[], None]:
    return start_ours(f"sqlite:///{path}", "ours", arrivals)


def start_peer(path: str, arrivals: Arrivals) -> Callable[[], None]:
    """SQLNotify (the bench extra) on the same file, in its async mode, on
    an asyncio loop in its own thread; returns a stop function."""
    import asyncio

    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.orm import DeclarativeBase
    from sqlnotify import Notifier, Operation

    class Base(DeclarativeBase):
        pass

    class Peer(Base):
        __tablename__ = "peer"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.Text)
        qty = sa.Column(sa.Integer)
        at = sa.Column(sa.Text)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def setup() -> Any:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        notifier = Notifier(db_engine=engine, use_logger=False)
        for operation in (Operation.INSERT, Operation.UPDATE):
            notifier.watch(Peer, operation, extra_columns=["name", "qty", "at"])

        @notifier.subscribe(Peer, Operation.INSERT)
        async def received(event: Any) -> None:
            arrivals.add(event["id"])

        await notifier.astart()
        return notifier

    notifier = asyncio.run_coroutine_threadsafe(setup(), loop).result(60)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(notifier.astop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return stop


def start_bare(path: str, arrivals: Arrivals) -> Callable[[], None]:
    return BareLoop(path, arrivals).close


def latency(path: str, table: str, arrivals: Arrivals, n: int) -> list[float]:
    arrivals.reset()
    sent = write(path, "latency", n, table)
    arrivals.wait_count(n)
    return [(arrivals.times[int(key)] - float(at)) * 1000 for key, at in sent]


def bulk(path: str, table: str, arrivals: Arrivals | None, rows: int) -> tuple[float, float]:
    """(transaction seconds, events/s from the statement's start to the last event)."""
    if arrivals is not None:
        arrivals.reset()
    ((start, committed),) = write(path, "bulk", rows, table)
    wrote = float(committed) - float(start)
    if arrivals is None:
        return wrote, 0.0
    arrivals.wait_count(rows)
    return wrote, events_per_second(rows, float(start), arrivals.last)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=100, help="per round")
    parser.add_argument("--singles", type=int, default=200, help="per table and round")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="dbnotify-bench-")
    path = os.path.join(workdir, "bench.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(TABLES)
    conn.close()

    contenders: list[tuple[str, str, Callable[..., Callable[[], None]]]] = [
        ("bare polling loop", "bare", start_bare),
        ("flask-dbnotify", "ours", start_dbnotify),
    ]
    try:
        import sqlnotify  # noqa: F401
    except ImportError as exc:
        print(f"SQLNotify not measured ({exc}): pip install -e '.[bench]'")
    else:
        contenders.append(("SQLNotify (peer)", "peer", start_peer))
    names = [name for name, _, _ in contenders]
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in names + ["plain"]}

    def note(name: str, key: str, value: float) -> None:
        figures[name].setdefault(key, []).append(value)

    # Idle: each listener alone, against the process without one.
    for _ in range(args.rounds):
        for name, _, start in contenders:
            baseline = idle_cpu(args.idle_seconds)
            stop = start(path, Arrivals())
            note(name, "idle", idle_cpu(args.idle_seconds) - baseline)
            stop()

    arrivals = {name: Arrivals() for name in names}
    stops = [start(path, arrivals[name]) for name, _, start in contenders]
    shuffle = random.Random(16)
    try:
        for name, table, _ in contenders:
            latency(path, table, arrivals[name], 20)  # warm up
        order = [*contenders, ("plain", "plain", None)]
        for _ in range(args.rounds):
            shuffle.shuffle(order)
            wrote: dict[str, float] = {}
            for name, table, _ in order:
                if name != "plain":
                    samples = latency(path, table, arrivals[name], args.latency_samples)
                    note(name, "p50", pct(samples, 0.5))
                    note(name, "p99", pct(samples, 0.99))
                wrote[name], rate = bulk(path, table, arrivals.get(name), args.rows)
                if name != "plain":
                    note(name, "rate", rate)
            note("plain", "bulk ms", wrote["plain"] * 1000)
            for name in names:
                note(name, "write", wrote[name] / wrote["plain"])
                note(name, "rate ratio", figures[name]["rate"][-1] / figures[names[0]]["rate"][-1])
    finally:
        for stop in stops:
            stop()

    # Single-row transactions, no listener running: what the triggers cost.
    tables = {table: name for name, table, _ in contenders} | {"plain": "plain"}
    rounds: dict[str, list[tuple[float, float]]] = {}
    for table, insert, update in write(
        path, "singles", args.singles, ",".join(tables), str(args.rounds)
    ):
        rounds.setdefault(table, []).append((float(insert), float(update)))
    for table, name in tables.items():
        for (insert, update), (base_i, base_u) in zip(rounds[table], rounds["plain"], strict=True):
            note(name, "insert us", insert * 1e6)
            note(name, "update us", update * 1e6)
            note(name, "insert x", insert / base_i)
            note(name, "update x", update / base_u)

    report(args, figures, names)


def report(args: Any, figures: dict[str, dict[str, list[float]]], names: list[str]) -> None:
    plain = figures["plain"]
    print(
        f"SQLite {sqlite3.sqlite_version}, writers in another process (synchronous = NORMAL); "
        f"{args.rounds} rounds, each figure median (min–max) over them"
    )
    print(
        f"{args.rows:,}-row INSERT transaction; events/s from the statement's start to the "
        f"last event; plain transaction without triggers: {spread(plain['bulk ms'])} ms"
    )
    print_rates(figures, names, "bare loop")
    print()
    print(
        f"commit to receiver across processes, ms ({args.latency_samples} single-row "
        "transactions a round); idle CPU in % of one core"
    )
    print(f"{'':18} {'p50':>18} {'p99':>21} {'idle CPU %':>20}")
    for name in names:
        r = figures[name]
        print(
            f"{name:18} {spread(r['p50'], '.2f'):>18} {spread(r['p99'], '.2f'):>21} "
            f"{spread(r['idle'], '.2f'):>20}"
        )
    print()
    print(
        f"single-row transactions, no listener running: median of {args.singles} each "
        "a round, and against the same on the table without triggers"
    )
    print(f"{'':18} {'INSERT us':>18} {'vs plain':>21} {'UPDATE us':>18} {'vs plain':>21}")
    for name in ["plain", *names]:
        r = figures[name]
        print(
            f"{name:18} {spread(r['insert us']):>18} {spread(r['insert x'], '.2f', 'x'):>21} "
            f"{spread(r['update us']):>18} {spread(r['update x'], '.2f', 'x'):>21}"
        )


if __name__ == "__main__":
    main()
