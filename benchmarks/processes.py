"""Delivery with several listening processes, as under gunicorn workers.

Run:  .venv/bin/python benchmarks/processes.py [--processes 8] [--rows 100000]

Each process runs a Flask-DBNotify listener with a counting on() receiver.
One 100,000-row INSERT is committed; each process reports (on a shared
monotonic clock) when its last event arrived. Printed: the time until the
slowest process had every event, and the events/s per process and in all,
next to the same figures for one process.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time

import psycopg2
from _common import DEFAULT_URL, claim_database

ROOT = os.path.join(os.path.dirname(__file__), "..")

CHILD = r"""
import sys, threading, time
sys.path.insert(0, sys.argv[3])
from flask import Flask
from flask_dbnotify import DBNotify
url, rows = sys.argv[1], int(sys.argv[2])
app = Flask("worker")
app.config.update(DBNOTIFY_DATABASE_URI=url, DBNOTIFY_AUTOSTART=False)
ext = DBNotify(app)
ext.watch("proc_rows", "insert")
seen = 0
done = threading.Event()
@ext.on("proc_rows", "insert")
def count(event):
    global seen
    seen += 1
    if seen == rows:
        print("done", time.monotonic(), flush=True)
        done.set()
ext.start(app)
print("ready", flush=True)
done.wait(600)
ext.stop(app)
"""


def run(url: str, processes: int, rows: int) -> float:
    """Seconds from the INSERT's start until every process had every event."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(rows), ROOT],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            if not select.select([child.stdout], [], [], 60)[0]:
                raise SystemExit("a listener process did not start")
            assert child.stdout.readline().strip() == "ready"
        writer = psycopg2.connect(url)
        writer.autocommit = True
        start = time.monotonic()
        writer.cursor().execute(
            "INSERT INTO proc_rows (name, qty) SELECT 'item ' || g, g "
            "FROM generate_series(1, %s) g",
            (rows,),
        )
        writer.close()
        finished = []
        for child in children:
            assert child.stdout is not None
            if not select.select([child.stdout], [], [], 300)[0]:
                raise SystemExit("a listener process did not get every event")
            word, at = child.stdout.readline().split()
            finished.append(float(at))
        return max(finished) - start
    finally:
        for child in children:
            child.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
    )
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()

    sys.path.insert(0, ROOT)
    from flask import Flask

    from flask_dbnotify import DBNotify

    conn = psycopg2.connect(args.url)
    conn.autocommit = True
    claim_database(conn, "processes.py")
    conn.cursor().execute(
        "DROP TABLE IF EXISTS proc_rows; "
        "CREATE TABLE proc_rows (id bigserial PRIMARY KEY, name text, qty int)"
    )
    conn.close()
    app = Flask("installer")
    app.config.update(DBNOTIFY_DATABASE_URI=args.url, DBNOTIFY_AUTOSTART=False)
    ext = DBNotify(app)
    ext.watch("proc_rows", "insert")
    ext.install_triggers(app)

    one = run(args.url, 1, args.rows)
    many = run(args.url, args.processes, args.rows)
    print(f"PostgreSQL, one {args.rows:,}-row INSERT, {os.cpu_count()} cores")
    print(f"  1 process : every event in {one:.2f} s, {args.rows / one:,.0f} events/s")
    print(
        f"  {args.processes} processes: every event in every process in {many:.2f} s, "
        f"{args.rows / many:,.0f} events/s per process, "
        f"{args.processes * args.rows / many:,.0f} in all ({one / many:.2f}x per process)"
    )


if __name__ == "__main__":
    main()
