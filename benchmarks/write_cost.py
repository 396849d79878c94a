"""What writers pay: each capture on its own table, measured side by side.

Run:  .venv/bin/python benchmarks/write_cost.py [--url ...] [--rounds 12]
      [--compare /path/to/another/checkout]

One table per contender, all written in the same rounds, one contender
after the other in a new order each round, so that a busy moment of the
machine falls on all of them alike (on a shared machine, runs a minute
apart differ more than the contenders do); the listeners, which run in
this process, drain between rounds. Each round makes 200 single-row autocommit INSERTs per
table and one 50,000-row INSERT; figures are medians over the rounds, as
ratios to the table without a trigger and to the raw row trigger.

- plain: no trigger.
- raw: a row-level trigger doing pg_notify(channel, id): the limit.
- fast / durable: Flask-DBNotify's watches (its listener running).
- SQLNotify (peer, ``pip install -e '.[bench]'``), its listener running.
- with ``--compare``: the other checkout's fast and durable triggers,
  installed in the schema ``dbnotify_compare`` (to see what a change to the
  triggers costs writers).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

import psycopg2
from flask import Flask

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import DEFAULT_URL, Arrivals  # noqa: E402
from postgresql import PeerSQLNotify, RawListener  # noqa: E402

from flask_dbnotify import DBNotify  # noqa: E402

COLUMNS = "(id bigserial PRIMARY KEY, name text, qty int, at timestamptz)"
INSTALL = """
import sys
from flask import Flask
from flask_dbnotify import DBNotify
app = Flask("compare")
app.config.update(DBNOTIFY_DATABASE_URI=sys.argv[1], DBNOTIFY_AUTOSTART=False,
                  DBNOTIFY_SCHEMA="dbnotify_compare")
ext = DBNotify(app)
ext.watch("wc_cmp_fast")
ext.watch("wc_cmp_durable", durable=True)
ext.install_triggers(app)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--compare", help="another checkout of Flask-DBNotify")
    args = parser.parse_args()

    writer = psycopg2.connect(args.url)
    writer.autocommit = True
    cur = writer.cursor()
    tables = {"plain": "wc_plain", "raw": "bench_raw", "fast": "wc_fast", "durable": "wc_durable"}
    if args.compare:
        tables |= {"compare fast": "wc_cmp_fast", "compare durable": "wc_cmp_durable"}
    tables["SQLNotify (peer)"] = "bench_peer"
    cur.execute(
        "DROP TABLE IF EXISTS bench_raw, bench_peer, "
        + ", ".join(t for t in tables.values() if t.startswith("wc_"))
        + " CASCADE"
    )
    for table in tables.values():
        cur.execute(f"CREATE TABLE {table} {COLUMNS}")
    cur.execute(
        "CREATE OR REPLACE FUNCTION bench_raw_notify() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM pg_notify('bench_raw', NEW.id::text); RETURN NULL; END$$; "
        "CREATE TRIGGER bench_raw_notify AFTER INSERT ON bench_raw "
        "FOR EACH ROW EXECUTE FUNCTION bench_raw_notify()"
    )
    if args.compare:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.compare)}
        subprocess.run([sys.executable, "-c", INSTALL, args.url], env=env, check=True)

    app = Flask("write_cost")
    app.config.update(DBNOTIFY_DATABASE_URI=args.url, DBNOTIFY_AUTOSTART=False)
    ext = DBNotify(app)
    ours = Arrivals()
    for table in ("wc_fast", "wc_durable"):
        ext.watch(table) if table == "wc_fast" else ext.watch(table, durable=True)
        ext.on(table, "insert")(lambda event: ours.add((event.table, event.pk)))
    ext.install_triggers(app)
    ext.start(app)
    raw_arrivals, peer_arrivals = Arrivals(), Arrivals()
    raw = RawListener(args.url, raw_arrivals)
    peer = PeerSQLNotify(args.url, peer_arrivals)

    shuffle = random.Random(9)
    single: dict[str, list[float]] = {name: [] for name in tables}
    bulk: dict[str, list[float]] = {name: [] for name in tables}
    try:
        order = list(tables.items())
        for _ in range(args.rounds):
            for arrivals in (ours, raw_arrivals, peer_arrivals):
                arrivals.reset()
            # A new order each round: no contender always follows the same one.
            shuffle.shuffle(order)
            for name, table in order:
                samples = []
                for i in range(200):
                    start = time.perf_counter()
                    cur.execute(
                        f"INSERT INTO {table} (name, qty, at) VALUES ('s', %s, now())", (i,)
                    )
                    samples.append(time.perf_counter() - start)
                single[name].append(statistics.median(samples))
            for name, table in order:
                start = time.perf_counter()
                cur.execute(
                    f"INSERT INTO {table} (name, qty, at) "
                    "SELECT 'item ' || g, g, now() FROM generate_series(1, 50000) g"
                )
                bulk[name].append(time.perf_counter() - start)
            # The listeners run in this process: let them drain before the
            # next round, so that their work does not slow its writes.
            ours.wait_count(2 * 50_200)
            raw_arrivals.wait_count(50_200)
            peer_arrivals.wait_count(50_200)
    finally:
        ext.stop(app)
        raw.close()
        peer.close()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    plain_s, plain_b = med(single["plain"]), med(bulk["plain"])
    raw_s, raw_b = med(single["raw"]), med(bulk["raw"])
    print(f"PostgreSQL writes, {args.rounds} rounds side by side; medians")
    print(
        f"{'':18} {'1-row INSERT us':>15} {'vs plain':>9} {'vs raw':>7} "
        f"{'50k-row ms':>11} {'vs plain':>9} {'vs raw':>7}"
    )
    for name in tables:
        s, b = med(single[name]), med(bulk[name])
        print(
            f"{name:18} {s * 1e6:15.1f} {s / plain_s:8.2f}x {s / raw_s:6.2f}x "
            f"{b * 1000:11.0f} {b / plain_b:8.2f}x {b / raw_b:6.2f}x"
        )


if __name__ == "__main__":
    main()
