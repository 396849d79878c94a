"""SQLite side by side: a bare polling loop, Flask-DBNotify, SQLNotify.

Run:  .venv/bin/python benchmarks/sqlite.py [--rows 100000]

Writers run in a separate process, as another worker or a cron job would.

- bare loop: an outbox trigger (INSERT INTO outbox (row_id) VALUES (NEW.id))
  and a thread that polls PRAGMA data_version every millisecond and reads
  the outbox past its cursor: the simplest thing that works.
- flask-dbnotify: DBNotify with watch(), a receiver connected with on().

Figures: commit-to-receiver latency across processes (single-row
transactions, a few ms apart), events/s delivered for one 100k-row
transaction (commit to last event), that transaction's cost against the
same table without triggers, and the CPU an idle listener burns.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from flask import Flask

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import Arrivals  # noqa: E402

from flask_dbnotify import DBNotify  # noqa: E402

TABLES = """
CREATE TABLE plain (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, at TEXT);
CREATE TABLE bare (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, at TEXT);
CREATE TABLE ours (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, at TEXT);
CREATE TABLE peer (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, at TEXT);
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, row_id INTEGER);
CREATE TRIGGER bare_outbox AFTER INSERT ON bare BEGIN
  INSERT INTO outbox (row_id) VALUES (NEW.id); END;
"""

WRITER = r"""
import sqlite3, sys, time, random
path, table, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
conn = sqlite3.connect(path, isolation_level=None, timeout=30)
if mode == "single":
    for _ in range(n):
        conn.execute("BEGIN")
        cur = conn.execute(f"INSERT INTO {table} (name, qty, at) VALUES ('x', 1, datetime())")
        conn.execute("COMMIT")
        print(cur.lastrowid, time.perf_counter(), flush=True)
        time.sleep(random.uniform(0.003, 0.006))
else:
    start = time.perf_counter()
    conn.execute("BEGIN")
    conn.execute(f"WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s "
                 f"WHERE value < {n}) INSERT INTO {table} (name, qty, at) "
                 f"SELECT 'item ' || value, value, datetime() FROM s")
    conn.execute("COMMIT")
    print(start, time.perf_counter(), flush=True)
"""


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


def write(path: str, table: str, mode: str, n: int) -> list[tuple[float, float]]:
    out = subprocess.run(
        [sys.executable, "-c", WRITER, path, table, mode, str(n)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [(float(a), float(b)) for a, b in (line.split() for line in out.splitlines())]


def latency(path: str, table: str, arrivals: Arrivals, n: int) -> list[float]:
    arrivals.reset()
    sent = write(path, table, "single", n)
    arrivals.wait_count(n)
    return [(arrivals.times[int(key)] - at) * 1000 for key, at in sent]


def bulk(path: str, table: str, arrivals: Arrivals | None, rows: int) -> tuple[float, float]:
    """(transaction seconds, commit to last event in seconds)."""
    if arrivals is not None:
        arrivals.reset()
    ((start, committed),) = write(path, table, "bulk", rows)
    if arrivals is None:
        return committed - start, 0.0
    arrivals.wait_count(rows)
    return committed - start, arrivals.last - committed


def idle_cpu(seconds: float) -> float:
    """Percent of one core this process burns over ``seconds`` doing nothing."""
    before = time.process_time()
    time.sleep(seconds)
    return (time.process_time() - before) / seconds * 100


def start_peer(path: str, arrivals: Arrivals) -> Any:
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
        notifier.watch(Peer, Operation.INSERT, extra_columns=["name", "qty", "at"])

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="dbnotify-bench-")
    path = os.path.join(workdir, "bench.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(TABLES)
    conn.close()

    baseline = idle_cpu(args.idle_seconds)
    results: dict[str, dict[str, float]] = {}

    bare_arrivals = Arrivals()
    bare = BareLoop(path, bare_arrivals)
    bare_idle = idle_cpu(args.idle_seconds)
    latency(path, "bare", bare_arrivals, 20)
    samples = latency(path, "bare", bare_arrivals, args.latency_samples)
    wrote, delivered = bulk(path, "bare", bare_arrivals, args.rows)
    bare.close()
    results["bare polling loop"] = {
        "p50": statistics.median(samples),
        "p99": sorted(samples)[int(0.99 * len(samples))],
        "rate": args.rows / delivered,
        "write": wrote,
        "idle": bare_idle - baseline,
    }

    ours_arrivals = Arrivals()
    app = Flask("bench")
    app.config.update(DBNOTIFY_DATABASE_URI=f"sqlite:///{path}", DBNOTIFY_AUTOSTART=False)
    dbnotify = DBNotify(app)

    @dbnotify.on("ours", "insert")
    def received(event: Any) -> None:
        ours_arrivals.add(event.pk)

    dbnotify.install_triggers(app)
    dbnotify.start(app)
    ours_idle = idle_cpu(args.idle_seconds)
    latency(path, "ours", ours_arrivals, 20)
    samples = latency(path, "ours", ours_arrivals, args.latency_samples)
    wrote, delivered = bulk(path, "ours", ours_arrivals, args.rows)
    dbnotify.stop(app)
    results["flask-dbnotify"] = {
        "p50": statistics.median(samples),
        "p99": sorted(samples)[int(0.99 * len(samples))],
        "rate": args.rows / delivered,
        "write": wrote,
        "idle": ours_idle - baseline,
    }
    try:
        peer_arrivals = Arrivals()
        stop_peer = start_peer(path, peer_arrivals)
    except ImportError as exc:
        print(f"SQLNotify not measured ({exc}): pip install -e '.[bench]'")
    else:
        peer_idle = idle_cpu(args.idle_seconds)
        latency(path, "peer", peer_arrivals, 20)
        samples = latency(path, "peer", peer_arrivals, args.latency_samples)
        wrote, delivered = bulk(path, "peer", peer_arrivals, args.rows)
        stop_peer()
        results["SQLNotify (peer)"] = {
            "p50": statistics.median(samples),
            "p99": sorted(samples)[int(0.99 * len(samples))],
            "rate": args.rows / delivered,
            "write": wrote,
            "idle": peer_idle - baseline,
        }
    plain, _ = bulk(path, "plain", None, args.rows)

    limit = results["bare polling loop"]
    print(
        f"SQLite {sqlite3.sqlite_version}, writers in another process, "
        f"{args.rows:,}-row transaction, {args.latency_samples} latency samples"
    )
    print(f"plain transaction without triggers: {plain * 1000:.0f} ms")
    print(
        f"{'':20} {'p50 ms':>7} {'p99 ms':>7} {'events/s':>9} {'write':>7} "
        f"{'idle CPU':>9} {'p50 ratio':>10} {'rate ratio':>11}"
    )
    for name, r in results.items():
        print(
            f"{name:20} {r['p50']:7.2f} {r['p99']:7.2f} {r['rate']:9,.0f} "
            f"{r['write'] / plain:6.2f}x {r['idle']:8.2f}% {r['p50'] / limit['p50']:10.2f} "
            f"{r['rate'] / limit['rate']:11.2f}"
        )
    print("write = transaction time / plain; idle = % of one core; ratios vs the bare loop")


if __name__ == "__main__":
    main()
