"""What writers pay: each capture on its own table, measured side by side.

Run:  .venv/bin/python benchmarks/write_cost.py [--url ...] [--rounds 12]
      [--compare /path/to/another/checkout] [--listen-elsewhere] [--async-commit]

One table per contender, all written in the same rounds, one contender
after the other in a new order each round, so that a busy moment of the
machine falls on all of them alike (on a shared machine, runs a minute
apart differ more than the contenders do); the listeners, which run in
this process, drain between rounds. Each round makes 200 single-row
autocommit INSERTs per table, the tables taking turns 20 statements at a
time, then 200 single-row autocommit UPDATEs (of rows the first round
inserted) alike, and one 50,000-row INSERT per table. Figures: medians over
the rounds; ratios are each round's ratio to the table without a trigger
(and to the raw row trigger) in that round, as median [lowest-highest].

- plain: no trigger.
- raw: a row-level trigger doing pg_notify(channel, id): the limit.
- fast / durable: Flask-DBNotify's watches (its listener running).
- SQLNotify (peer, ``pip install -e '.[bench]'``), its listener running.
- with ``--compare``: the other checkout's fast and durable triggers,
  installed in the schema ``dbnotify_compare`` (to see what a change to the
  triggers costs writers).

With ``--listen-elsewhere`` no listener runs in this process: another
process LISTENs and drops what arrives (the peer is left out). The writes
then pay what the database and the triggers cost, without a listener's
work in the writer's process (a listener in the writer's process delays
the writer by its work on each event: the GIL). With ``--async-commit``
the writer's session sets ``synchronous_commit = off``: a commit does not
wait for the disk, whose delays on a shared machine swamp the triggers'
work (the server's configuration is left alone).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import psycopg2
from flask import Flask

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import DEFAULT_URL, Arrivals, claim_database  # noqa: E402
from postgresql import PeerSQLNotify, RawListener  # noqa: E402

from flask_dbnotify import DBNotify  # noqa: E402

COLUMNS = "(id bigserial PRIMARY KEY, name text, qty int, at timestamptz)"
#: name -> "insert" / "update" / "bulk" -> one figure per round (seconds).
Samples = dict[str, dict[str, list[float]]]
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


DRAIN = """
import select, sys, psycopg2
conn = psycopg2.connect(sys.argv[1])
conn.autocommit = True
conn.cursor().execute("LISTEN dbnotify; LISTEN bench_raw")
print("listening", flush=True)
while True:
    if select.select([conn], [], [], 1)[0]:
        conn.poll()
        conn.notifies.clear()
"""
SINGLE = {
    "insert": "INSERT INTO {} (name, qty, at) VALUES ('s', %s, now())",
    "update": "UPDATE {} SET qty = qty + 1 WHERE id = %s",
}
BULK = (
    "INSERT INTO {} (name, qty, at) SELECT 'item ' || g, g, now() FROM generate_series(1, 50000) g"
)


def create(cur: Any, tables: dict[str, str], args: argparse.Namespace) -> None:
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
        "CREATE TRIGGER bench_raw_notify AFTER INSERT OR UPDATE ON bench_raw "
        "FOR EACH ROW EXECUTE FUNCTION bench_raw_notify()"
    )
    if args.compare:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.compare)}
        subprocess.run([sys.executable, "-c", INSTALL, args.url], env=env, check=True)


class Listeners:
    """Ours, the raw loop's and the peer's, in this process; or, elsewhere,
    one process that drains the channels."""

    def __init__(self, url: str, elsewhere: bool) -> None:
        self.app = Flask("write_cost")
        self.app.config.update(DBNOTIFY_DATABASE_URI=url, DBNOTIFY_AUTOSTART=False)
        self.ext = DBNotify(self.app)
        self.ours, self.raw_arrivals, self.peer_arrivals = Arrivals(), Arrivals(), Arrivals()
        for table in ("wc_fast", "wc_durable"):
            self.ext.watch(table, durable=table == "wc_durable")
            self.ext.on(table, "insert")(lambda event: self.ours.add((event.table, event.pk)))
        self.ext.install_triggers(self.app)
        self.elsewhere = elsewhere
        if elsewhere:
            self.drain = subprocess.Popen(
                [sys.executable, "-c", DRAIN, url], stdout=subprocess.PIPE, text=True
            )
            assert self.drain.stdout is not None and self.drain.stdout.readline()
            return
        self.ext.start(self.app)
        self.raw = RawListener(url, self.raw_arrivals)
        self.peer = PeerSQLNotify(url, self.peer_arrivals)

    def reset(self) -> None:
        for arrivals in (self.ours, self.raw_arrivals, self.peer_arrivals):
            arrivals.reset()

    def wait(self) -> None:
        """Let the listeners drain before the next round, so that their
        work does not slow its writes."""
        if self.elsewhere:
            time.sleep(1)
            return
        # INSERT events only (each listener counts those); the UPDATEs
        # were delivered before the bulk INSERT, which committed after them.
        self.ours.wait_count(2 * 50_200)
        self.raw_arrivals.wait_count(50_400)
        self.peer_arrivals.wait_count(50_200)

    def close(self) -> None:
        if self.elsewhere:
            self.drain.kill()
            self.drain.wait()
            return
        self.ext.stop(self.app)
        self.raw.close()
        self.peer.close()


def run_rounds(cur: Any, tables: dict[str, str], listeners: Listeners, rounds: int) -> Samples:
    """name -> what -> one figure per round (seconds)."""
    shuffle = random.Random(9)
    samples: Samples = {name: {"insert": [], "update": [], "bulk": []} for name in tables}
    order = list(tables.items())
    for _ in range(rounds):
        listeners.reset()
        # A new order each round: no contender always follows the same one.
        shuffle.shuffle(order)
        for op, statement in SINGLE.items():
            times: dict[str, list[float]] = {name: [] for name in tables}
            # The tables take turns, 20 statements each: a slow moment of
            # the disk falls on every contender alike, and a listener's
            # work on a contender's events (in this process) still mostly
            # delays that contender's writes.
            for turn in range(0, 200, 20):
                shuffle.shuffle(order)
                for name, table in order:
                    for i in range(turn, turn + 20):
                        start = time.perf_counter()
                        cur.execute(statement.format(table), (i + 1,))
                        times[name].append(time.perf_counter() - start)
            for name in tables:
                samples[name][op].append(statistics.median(times[name]))
        for name, table in order:
            start = time.perf_counter()
            cur.execute(BULK.format(table))
            samples[name]["bulk"].append(time.perf_counter() - start)
        listeners.wait()
    return samples


def ratio(samples: Samples, name: str, base: str, what: str) -> str:
    """Median [lowest-highest] of the per-round ratios of name to base."""
    ratios = [a / b for a, b in zip(samples[name][what], samples[base][what], strict=True)]
    return f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


def report(samples: Samples, args: argparse.Namespace) -> None:
    how = ", ".join(
        text
        for flag, text in (
            (args.listen_elsewhere, "listeners in another process"),
            (args.async_commit, "synchronous_commit off"),
        )
        if flag
    )
    print(f"PostgreSQL writes, {args.rounds} rounds side by side; medians, ratios per round")
    if how:
        print(f"({how})")
    for what, unit, scale in (("insert", "us", 1e6), ("update", "us", 1e6), ("bulk", "ms", 1e3)):
        title = {"insert": "1-row INSERT", "update": "1-row UPDATE", "bulk": "50k-row INSERT"}
        print(f"{title[what]:18} {unit:>8} {'vs plain':>20} {'vs raw':>20}")
        for name in samples:
            value = statistics.median(samples[name][what]) * scale
            print(
                f"  {name:16} {value:8.1f} {ratio(samples, name, 'plain', what):>20} "
                f"{ratio(samples, name, 'raw', what):>20}"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--compare", help="another checkout of Flask-DBNotify")
    parser.add_argument("--listen-elsewhere", action="store_true")
    parser.add_argument("--async-commit", action="store_true")
    args = parser.parse_args()

    writer = psycopg2.connect(args.url)
    writer.autocommit = True
    claim_database(writer, "write_cost.py")
    cur = writer.cursor()
    if args.async_commit:
        cur.execute("SET synchronous_commit = off")
    tables = {"plain": "wc_plain", "raw": "bench_raw", "fast": "wc_fast", "durable": "wc_durable"}
    if args.compare:
        tables |= {"compare fast": "wc_cmp_fast", "compare durable": "wc_cmp_durable"}
    if not args.listen_elsewhere:
        tables["SQLNotify (peer)"] = "bench_peer"
    create(cur, tables, args)
    listeners = Listeners(args.url, args.listen_elsewhere)
    try:
        samples = run_rounds(cur, tables, listeners, args.rounds)
    finally:
        listeners.close()
    report(samples, args)


if __name__ == "__main__":
    main()
