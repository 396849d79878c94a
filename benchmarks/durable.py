"""The price of durability on PostgreSQL: fast vs durable watches.

Run:  .venv/bin/python benchmarks/durable.py [--rows 100000]

Figures, side by side in one run on one server:
- the cost of one 100k-row INSERT on a table with a fast watch, with a
  durable watch, and with no trigger;
- the cost of single-row autocommit INSERTs (median) for the same three;
- insert-to-receiver latency (median) for fast and durable;
- the replay rate after an outage: the listener is stopped, 100k rows are
  committed, and the time from start() to the last replayed event is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import psycopg2
from flask import Flask

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import DEFAULT_URL, Arrivals, claim_database  # noqa: E402

from flask_dbnotify import DBNotify  # noqa: E402

DDL = """
DROP TABLE IF EXISTS dur_plain, dur_fast, dur_durable CASCADE;
CREATE TABLE dur_plain (id bigserial PRIMARY KEY, name text, qty int, at timestamptz);
CREATE TABLE dur_fast (LIKE dur_plain INCLUDING ALL);
CREATE TABLE dur_durable (LIKE dur_plain INCLUDING ALL);
"""
BULK = "INSERT INTO {} (name, qty, at) SELECT 'item ' || g, g, now() FROM generate_series(1, %s) g"


def timed(cur: Any, statement: str, params: Any = None) -> float:
    start = time.perf_counter()
    cur.execute(statement, params)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--singles", type=int, default=300)
    args = parser.parse_args()

    writer = psycopg2.connect(args.url)
    writer.autocommit = True
    claim_database(writer, "durable.py")
    cur = writer.cursor()
    cur.execute(DDL)

    app = Flask("bench")
    app.config.update(DBNOTIFY_DATABASE_URI=args.url, DBNOTIFY_AUTOSTART=False)
    dbnotify = DBNotify(app)
    dbnotify.watch("dur_fast", "insert")
    dbnotify.watch("dur_durable", "insert", durable=True)
    counters = {"dur_fast": Arrivals(), "dur_durable": Arrivals()}

    @dbnotify.on("dur_fast", "insert")
    def fast(event: Any) -> None:
        counters["dur_fast"].add(event.pk)

    @dbnotify.on("dur_durable", "insert")
    def durable(event: Any) -> None:
        counters["dur_durable"].add(event.pk)

    dbnotify.install_triggers(app)
    dbnotify.start(app)

    bulk: dict[str, float] = {}
    single: dict[str, float] = {}
    latency: dict[str, float] = {}
    for table in ("dur_plain", "dur_fast", "dur_durable"):
        counter = counters.get(table)
        runs = []
        for _ in range(3):
            if counter:
                counter.reset()
            runs.append(timed(cur, BULK.format(table), (args.rows,)))
            if counter:
                counter.wait_count(args.rows)
        bulk[table] = min(runs)
        samples, delays = [], []
        for _ in range(args.singles):
            if counter:
                counter.reset()
            start = time.perf_counter()
            cur.execute(f"INSERT INTO {table} (name, qty, at) VALUES ('x', 1, now()) RETURNING id")
            samples.append(time.perf_counter() - start)
            (key,) = cur.fetchone()
            if counter:
                counter.wait_count(1)
                delays.append(counter.times[key] - start)
        single[table] = statistics.median(samples)
        if delays:
            latency[table] = statistics.median(delays)

    # Replay after an outage: nothing is listening while the rows commit.
    dbnotify.stop(app)
    counter = counters["dur_durable"]
    counter.reset()
    cur.execute(BULK.format("dur_durable"), (args.rows,))
    start = time.perf_counter()
    dbnotify.start(app)
    counter.wait_count(args.rows)
    replay = args.rows / (counter.last - start)
    dbnotify.stop(app)

    plain = bulk["dur_plain"]
    print(
        f"PostgreSQL: fast vs durable watches, {args.rows:,}-row INSERT, "
        f"{args.singles} single-row INSERTs"
    )
    print(f"{'':10} {'bulk ms':>9} {'vs plain':>9} {'single ms':>10} {'vs plain':>9} {'p50 ms':>8}")
    for name, table in (("plain", "dur_plain"), ("fast", "dur_fast"), ("durable", "dur_durable")):
        lat = f"{latency[table] * 1000:8.3f}" if table in latency else f"{'-':>8}"
        print(
            f"{name:10} {bulk[table] * 1000:9.0f} {bulk[table] / plain:8.2f}x "
            f"{single[table] * 1000:10.3f} {single[table] / single['dur_plain']:8.2f}x {lat}"
        )
    print(
        f"durable vs fast: bulk {bulk['dur_durable'] / bulk['dur_fast']:.2f}x, "
        f"single {single['dur_durable'] / single['dur_fast']:.2f}x"
    )
    print(f"replay after a {args.rows:,}-event outage: {replay:,.0f} events/s")


if __name__ == "__main__":
    main()
