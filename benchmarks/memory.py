"""Memory over a million events: does a listener's RSS stay flat?

Run:  .venv/bin/python benchmarks/memory.py [--events 1000000]

One Flask-DBNotify listener (fast watch, an on() receiver that counts)
takes ``--events`` rows in 100,000-row INSERTs; RSS is read from
/proc/self/status after the first batch (warm) and after the last.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any

import psycopg2
from flask import Flask

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import DEFAULT_URL, claim_database  # noqa: E402

from flask_dbnotify import DBNotify  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    args = parser.parse_args()

    writer = psycopg2.connect(args.url)
    writer.autocommit = True
    claim_database(writer, "memory.py")
    cur = writer.cursor()
    cur.execute(
        "DROP TABLE IF EXISTS mem_rows; "
        "CREATE TABLE mem_rows (id bigserial PRIMARY KEY, name text, qty int, at timestamptz)"
    )
    app = Flask("memory")
    app.config.update(DBNOTIFY_DATABASE_URI=args.url, DBNOTIFY_AUTOSTART=False)
    dbnotify = DBNotify(app)
    seen = 0
    cond = threading.Condition()

    @dbnotify.on("mem_rows", "insert")
    def count(event: Any) -> None:
        nonlocal seen
        with cond:
            seen += 1
            cond.notify_all()

    dbnotify.install_triggers(app)
    dbnotify.start(app)
    readings = []
    for done in range(args.batch, args.events + 1, args.batch):
        cur.execute(
            "INSERT INTO mem_rows (name, qty, at) "
            "SELECT 'item ' || g, g, now() FROM generate_series(1, %s) g",
            (args.batch,),
        )
        with cond:
            if not cond.wait_for(lambda n=done: seen >= n, 300):
                raise SystemExit(f"only {seen} of {done} events arrived")
        readings.append((done, rss_mib()))
    dbnotify.stop(app)
    print(f"RSS after each {args.batch:,} events (MiB):")
    print("  " + ", ".join(f"{rss:.1f}" for _, rss in readings))
    first, last = readings[0][1], readings[-1][1]
    print(
        f"growth from {readings[0][0]:,} to {readings[-1][0]:,} events: {last - first:+.1f} MiB "
        f"({(last - first) / first:+.1%})"
    )


if __name__ == "__main__":
    main()
