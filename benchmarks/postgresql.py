"""Side-by-side benchmark: the raw psycopg2 limit, Flask-DBNotify, SQLNotify.

Run:  .venv/bin/python benchmarks/postgresql.py [--url postgresql://...] [--rows 100000]

Both listeners run in this process, on their own tables, one after the
other, against the same server:

- raw: a row-level AFTER INSERT trigger doing pg_notify(channel, id), and a
  bare loop: select() on the psycopg2 socket, poll(), drain notifies.
- flask-dbnotify: DBNotify with watch(), a receiver connected with on().
- SQLNotify, the peer (``pip install -e '.[bench]'``), in its async mode.

Figures: insert-to-receiver latency (single-row autocommit INSERTs, one at
a time), events/s delivered for one bulk INSERT statement, and that
statement's cost against the same INSERT on a table without triggers.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
from flask import Flask

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import DEFAULT_URL, Arrivals  # noqa: E402

from flask_dbnotify import DBNotify  # noqa: E402

DDL = """
DROP TABLE IF EXISTS bench_plain, bench_raw, bench_ours, bench_peer CASCADE;
CREATE TABLE bench_plain (id bigserial PRIMARY KEY, name text, qty int, at timestamptz);
CREATE TABLE bench_raw (LIKE bench_plain INCLUDING ALL);
CREATE TABLE bench_ours (LIKE bench_plain INCLUDING ALL);
CREATE TABLE bench_peer (LIKE bench_plain INCLUDING ALL);
CREATE OR REPLACE FUNCTION bench_raw_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('bench_raw', NEW.id::text); RETURN NULL; END $$;
CREATE TRIGGER bench_raw_notify AFTER INSERT OR UPDATE ON bench_raw
FOR EACH ROW EXECUTE FUNCTION bench_raw_notify();
"""
BULK = "INSERT INTO {} (name, qty, at) SELECT 'item ' || g, g, now() FROM generate_series(1, %s) g"


class RawListener:
    """The limit: the least work that gets a notification into Python."""

    def __init__(self, url: str, arrivals: Arrivals) -> None:
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True
        self.conn.cursor().execute("LISTEN bench_raw")
        self.arrivals = arrivals
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        conn = self.conn
        while not self.stop:
            if select.select([conn], [], [], 0.2)[0]:
                conn.poll()
                notes, conn.notifies = conn.notifies, []
                for note in notes:
                    self.arrivals.add(int(note.payload))

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.conn.close()


def latency(writer: Any, table: str, arrivals: Arrivals, n: int) -> list[float]:
    samples = []
    with writer.cursor() as cur:
        for _ in range(n):
            arrivals.reset()
            start = time.perf_counter()
            cur.execute(f"INSERT INTO {table} (name, qty, at) VALUES ('x', 1, now()) RETURNING id")
            (key,) = cur.fetchone()
            arrivals.wait_count(1)
            samples.append((arrivals.times[key] - start) * 1000)
    return samples


def bulk(writer: Any, table: str, arrivals: Arrivals | None, rows: int) -> tuple[float, float]:
    """(statement seconds, seconds from statement start to last event)."""
    if arrivals is not None:
        arrivals.reset()
    with writer.cursor() as cur:
        start = time.perf_counter()
        cur.execute(BULK.format(table), (rows,))
        wrote = time.perf_counter() - start
    if arrivals is None:
        return wrote, wrote
    arrivals.wait_count(rows)
    return wrote, arrivals.last - start


def single_writes(writer: Any, table: str, n: int) -> tuple[float, float]:
    """Median seconds of a one-row INSERT and a one-row UPDATE, autocommit."""
    inserts, updates = [], []
    with writer.cursor() as cur:
        for i in range(n):
            start = time.perf_counter()
            cur.execute(f"INSERT INTO {table} (name, qty, at) VALUES ('s', 1, now()) RETURNING id")
            inserts.append(time.perf_counter() - start)
            (key,) = cur.fetchone()
            start = time.perf_counter()
            cur.execute(f"UPDATE {table} SET qty = qty + %s WHERE id = %s", (i + 1, key))
            updates.append(time.perf_counter() - start)
    return statistics.median(inserts), statistics.median(updates)


def best(fn: Callable[[], tuple[float, float]], repeat: int) -> tuple[float, float]:
    runs = [fn() for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class PeerSQLNotify:
    """SQLNotify, the peer, in its async mode (its sync mode never starts a
    listener): an asyncio loop in a thread of its own, an asyncpg engine,
    whole rows requested with extra_columns, as Flask-DBNotify sends them."""

    def __init__(self, url: str, arrivals: Arrivals) -> None:
        import asyncio

        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy.orm import DeclarativeBase
        from sqlnotify import Notifier, Operation

        class Base(DeclarativeBase):
            pass

        class BenchPeer(Base):
            __tablename__ = "bench_peer"
            id = sa.Column(sa.BigInteger, primary_key=True)
            name = sa.Column(sa.Text)
            qty = sa.Column(sa.Integer)
            at = sa.Column(sa.DateTime(timezone=True))

        async_url = sa.make_url(url).set(drivername="postgresql+asyncpg")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def setup() -> Any:
            notifier = Notifier(db_engine=create_async_engine(async_url), use_logger=False)
            for operation in (Operation.INSERT, Operation.UPDATE):
                notifier.watch(BenchPeer, operation, extra_columns=["name", "qty", "at"])

            @notifier.subscribe(BenchPeer, Operation.INSERT)
            async def received(event: Any) -> None:
                arrivals.add(event["id"])

            await notifier.astart()
            return notifier

        self.notifier = asyncio.run_coroutine_threadsafe(setup(), self.loop).result(60)

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.notifier.astop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--latency-samples", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    writer = psycopg2.connect(args.url)
    writer.autocommit = True
    with writer.cursor() as cur:
        cur.execute(DDL)

    raw_arrivals = Arrivals()
    raw = RawListener(args.url, raw_arrivals)

    ours_arrivals = Arrivals()
    app = Flask("bench")
    app.config.update(DBNOTIFY_DATABASE_URI=args.url, DBNOTIFY_AUTOSTART=False)
    dbnotify = DBNotify(app)

    @dbnotify.on("bench_ours", "insert")
    def received(event: Any) -> None:
        ours_arrivals.add(event.pk)

    dbnotify.install_triggers(app)
    dbnotify.start(app)

    contenders = [
        ("raw psycopg2 loop", "bench_raw", raw_arrivals),
        ("flask-dbnotify", "bench_ours", ours_arrivals),
    ]
    peer = None
    try:
        peer_arrivals = Arrivals()
        peer = PeerSQLNotify(args.url, peer_arrivals)
        contenders.append(("SQLNotify (peer)", "bench_peer", peer_arrivals))
    except ImportError as exc:
        print(f"SQLNotify not measured ({exc}): pip install -e '.[bench]'")

    results: dict[str, dict[str, float]] = {}
    for name, table, arrivals in contenders:
        latency(writer, table, arrivals, 50)  # warm up
        samples = latency(writer, table, arrivals, args.latency_samples)
        runs = [bulk(writer, table, arrivals, args.rows) for _ in range(args.repeat)]
        wrote, delivered = min(r[0] for r in runs), min(r[1] for r in runs)
        results[name] = {
            "p50 ms": statistics.median(samples),
            "p99 ms": pct(samples, 0.99),
            "events/s": args.rows / delivered,
            "write s": wrote,
        }
    plain, _ = best(lambda: bulk(writer, "bench_plain", None, args.rows), args.repeat)
    singles = {"plain": single_writes(writer, "bench_plain", args.latency_samples)}
    for name, table, _ in contenders:
        singles[name] = single_writes(writer, table, args.latency_samples)

    dbnotify.stop(app)
    raw.close()
    if peer is not None:
        peer.close()

    limit = results["raw psycopg2 loop"]
    print(f"PostgreSQL, {args.rows:,}-row INSERT, {args.latency_samples} latency samples")
    print(f"plain INSERT without triggers: {plain * 1000:.0f} ms")
    header = f"{'':20} {'p50 ms':>8} {'p99 ms':>8} {'events/s':>10} {'write':>8}"
    print(header + f" {'p50 ratio':>10} {'rate ratio':>10}")
    for name, r in results.items():
        print(
            f"{name:20} {r['p50 ms']:8.3f} {r['p99 ms']:8.3f} {r['events/s']:10,.0f} "
            f"{r['write s'] / plain:7.2f}x {r['p50 ms'] / limit['p50 ms']:10.2f} "
            f"{r['events/s'] / limit['events/s']:10.2f}"
        )
    print("write = bulk statement time / plain INSERT; ratios are against the raw loop")
    print()
    print(f"single-row writes in autocommit, median ({args.latency_samples} each)")
    base_insert, base_update = singles["plain"]
    print(f"{'':20} {'INSERT ms':>10} {'vs plain':>9} {'UPDATE ms':>10} {'vs plain':>9}")
    for name, (insert, update) in singles.items():
        print(
            f"{name:20} {insert * 1000:10.3f} {insert / base_insert:8.2f}x "
            f"{update * 1000:10.3f} {update / base_update:8.2f}x"
        )


if __name__ == "__main__":
    main()
