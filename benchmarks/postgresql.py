"""Side-by-side benchmark: the raw psycopg2 limit, Flask-DBNotify, SQLNotify.

Run:  .venv/bin/python benchmarks/postgresql.py [--url postgresql://...] [--rows 100000]

Both listeners run in this process, on their own tables, one after the
other, against the same server:

- raw: a row-level AFTER INSERT trigger doing pg_notify(channel, id), and a
  bare loop: select() on the psycopg2 socket, poll(), drain notifies.
- flask-dbnotify: DBNotify with watch(), a receiver connected with on().
- SQLNotify, the peer (``pip install -e '.[bench]'``), in its async mode.

Figures, each measured in ``--rounds`` rounds (the contenders in a new
order each round) and printed as the median with its spread (min–max):
insert-to-receiver latency (single-row autocommit INSERTs, one at a time;
p50 and p99 of each round), events/s for one bulk INSERT statement (from
the statement's start to the last event delivered, as every script counts),
that statement's cost against the same INSERT on a table without
triggers, and single-row INSERT and UPDATE against the same on that table.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import statistics
import sys
import threading
import time
from typing import Any

import psycopg2

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import (  # noqa: E402
    DEFAULT_URL,
    Arrivals,
    claim_database,
    events_per_second,
    pct,
    print_rates,
    spread,
    start_ours,
)

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
    """(statement seconds, events/s from the statement's start to the last event)."""
    if arrivals is not None:
        arrivals.reset()
    with writer.cursor() as cur:
        start = time.perf_counter()
        cur.execute(BULK.format(table), (rows,))
        wrote = time.perf_counter() - start
    if arrivals is None:
        return wrote, 0.0
    arrivals.wait_count(rows)
    return wrote, events_per_second(rows, start, arrivals.last)


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
    parser.add_argument("--latency-samples", type=int, default=200, help="per round")
    parser.add_argument("--rounds", "--repeat", type=int, default=3)
    args = parser.parse_args()

    writer = psycopg2.connect(args.url)
    writer.autocommit = True
    claim_database(writer, "postgresql.py")
    with writer.cursor() as cur:
        cur.execute(DDL)

    raw_arrivals = Arrivals()
    raw = RawListener(args.url, raw_arrivals)

    ours_arrivals = Arrivals()
    stop_ours = start_ours(args.url, "bench_ours", ours_arrivals)

    contenders: list[tuple[str, str, Arrivals | None]] = [
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
    names = [name for name, _, _ in contenders]
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in [*names, "plain"]}

    def note(name: str, key: str, value: float) -> None:
        figures[name].setdefault(key, []).append(value)

    shuffle = random.Random(16)
    order = [*contenders, ("plain", "bench_plain", None)]
    try:
        for _, table, arrivals in contenders:
            assert arrivals is not None
            latency(writer, table, arrivals, 50)  # warm up
        for _ in range(args.rounds):
            # A new order each round: no contender always follows the same one.
            shuffle.shuffle(order)
            wrote, singles = {}, {}
            for name, table, arrivals in order:
                if arrivals is not None:
                    samples = latency(writer, table, arrivals, args.latency_samples)
                    note(name, "p50", pct(samples, 0.5))
                    note(name, "p99", pct(samples, 0.99))
                wrote[name], rate = bulk(writer, table, arrivals, args.rows)
                if arrivals is not None:
                    note(name, "rate", rate)
                singles[name] = single_writes(writer, table, args.latency_samples)
            note("plain", "bulk ms", wrote["plain"] * 1000)
            for name in ["plain", *names]:
                insert, update = singles[name]
                note(name, "insert ms", insert * 1000)
                note(name, "update ms", update * 1000)
                note(name, "insert x", insert / singles["plain"][0])
                note(name, "update x", update / singles["plain"][1])
                if name != "plain":
                    note(name, "write", wrote[name] / wrote["plain"])
                    limit = figures[names[0]]["rate"][-1]
                    note(name, "rate ratio", figures[name]["rate"][-1] / limit)
    finally:
        stop_ours()
        raw.close()
        if peer is not None:
            peer.close()
    report(args, figures, names)


def report(args: Any, figures: dict[str, dict[str, list[float]]], names: list[str]) -> None:
    plain = figures["plain"]
    print(f"PostgreSQL; {args.rounds} rounds, each figure median (min–max) over them")
    print(
        f"{args.rows:,}-row INSERT; events/s from the statement's start to the last event; "
        f"plain INSERT without triggers: {spread(plain['bulk ms'])} ms"
    )
    print_rates(figures, names, "raw loop")
    print()
    print(f"insert to receiver, ms ({args.latency_samples} single-row INSERTs a round)")
    print(f"{'':18} {'p50':>21} {'p99':>21}")
    for name in names:
        r = figures[name]
        print(f"{name:18} {spread(r['p50'], '.3f'):>21} {spread(r['p99'], '.3f'):>21}")
    print()
    print(f"single-row writes in autocommit, median of {args.latency_samples} each a round")
    print(f"{'':18} {'INSERT ms':>21} {'vs plain':>21} {'UPDATE ms':>21} {'vs plain':>21}")
    for name in ["plain", *names]:
        r = figures[name]
        print(
            f"{name:18} {spread(r['insert ms'], '.3f'):>21} "
            f"{spread(r['insert x'], '.2f', 'x'):>21} {spread(r['update ms'], '.3f'):>21} "
            f"{spread(r['update x'], '.2f', 'x'):>21}"
        )


if __name__ == "__main__":
    main()
