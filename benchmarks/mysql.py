"""MySQL/MariaDB side by side: a bare polling loop, Flask-DBNotify, and
what the writers pay for each way of capturing changes.

Run:  .venv/bin/python benchmarks/mysql.py [--rows 100000] [--rounds 3]

Everything runs on one throwaway ``mariadbd`` of its own (``mariadbd``
and ``mariadb-install-db`` must be installed; the shared server is never
touched), started with the row-based binary log on, so that the binary
log's cost is measured on the same server: a session that sets
``sql_log_bin = 0`` writes none. ``innodb_flush_log_at_trx_commit = 2``
and ``sync_binlog = 0``, so that the figures are the capture's work rather
than the disk's. No peer library supports MySQL (SQLNotify lists it as
planned): the yardstick is the bare loop.

Listeners (writers in another process):

- bare loop: an outbox trigger (``INSERT INTO outbox (row_id) VALUES
  (NEW.id)``) and a thread polling the outbox past its cursor every
  millisecond: the simplest thing that works (it would lose rows that
  commit out of id order, which Flask-DBNotify does not).
- flask-dbnotify: DBNotify with watch(), a receiver connected with on().
- binlog capture: the same with ``DBNOTIFY_CAPTURE = "binlog"``, in a
  database of its own, its writers writing the binary log.

Figures, each the median (min–max) of ``--rounds`` rounds, the contenders
in a new order each round, ratios taken within a round:

- events/s: one ``--rows``-row INSERT transaction, from the start of the
  writing statement to the last event delivered;
- latency: commit to receiver across processes (single-row transactions a
  few ms apart), p50 and p99;
- idle CPU: what the listener alone burns, in percent of one core, from
  ``--settle`` seconds after its start;
- writers: ``--clients`` processes each running single-row autocommit
  INSERTs for ``--seconds`` (TPS), and one ``--rows``-row INSERT, on a
  table with Flask-DBNotify's triggers, on one with the binary log on
  (no trigger), and on a plain one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

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

from tests._mariadb import ThrowawayMariaDB, connect  # noqa: E402

COLUMNS = "id BIGINT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100), qty INT, at DATETIME(6)"
SCHEMA = [
    f"CREATE TABLE plain ({COLUMNS})",
    f"CREATE TABLE logged ({COLUMNS})",
    f"CREATE TABLE bare ({COLUMNS})",
    f"CREATE TABLE ours ({COLUMNS})",
    "CREATE TABLE outbox (id BIGINT AUTO_INCREMENT PRIMARY KEY, row_id BIGINT)",
    "CREATE TRIGGER bare_outbox AFTER INSERT ON bare FOR EACH ROW "
    "INSERT INTO outbox (row_id) VALUES (NEW.id)",
]
#: Writers: name -> (table, sql_log_bin).
WRITERS = {
    "plain": ("plain", 0),
    "binlog": ("logged", 1),
    "bare outbox": ("bare", 0),
    "flask-dbnotify": ("ours", 0),
}

WRITER = r"""
import random, sys, time, pymysql
port, mode, n, table = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
database, log_bin = sys.argv[5], int(sys.argv[6])
conn = pymysql.connect(host="127.0.0.1", port=port, user="root", database=database,
                       autocommit=True)
cur = conn.cursor()
cur.execute("SET SESSION sql_log_bin = %s", (log_bin,))
clock = time.perf_counter
if mode == "latency":
    for _ in range(n):
        cur.execute(f"INSERT INTO {table} (name, qty, at) VALUES ('x', 1, NOW(6))")
        print(cur.lastrowid, clock(), flush=True)
        time.sleep(random.uniform(0.003, 0.006))
else:
    cur.execute("SET SESSION max_recursive_iterations = %s", (n + 1,))
    start = clock()
    cur.execute(
        f"INSERT INTO {table} (name, qty, at) WITH RECURSIVE s(v) AS "
        "(SELECT 1 UNION ALL SELECT v + 1 FROM s WHERE v < %s) "
        "SELECT CONCAT('item ', v), v, NOW(6) FROM s", (n,))
    print(start, clock(), flush=True)
"""


class Contender(NamedTuple):
    """A listener measured: its table, the database it is in, whether its
    writers write the binary log, and what starts it."""

    name: str
    table: str
    database: str
    log_bin: int
    start: Callable[[Arrivals], Callable[[], None]]


def write(port: int, mode: str, n: int, who: Contender) -> list[list[str]]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            WRITER,
            str(port),
            mode,
            str(n),
            who.table,
            who.database,
            str(who.log_bin),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split() for line in out.splitlines()]


class BareLoop:
    """Polls the outbox past its cursor every millisecond."""

    def __init__(self, url: str, arrivals: Arrivals) -> None:
        self.conn = connect(url)
        self.cur = self.conn.cursor()
        self.cur.execute("SELECT coalesce(max(id), 0) FROM outbox")
        self.position = self.cur.fetchone()[0]
        self.arrivals = arrivals
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.001):
            self.cur.execute(
                "SELECT id, row_id FROM outbox WHERE id > %s ORDER BY id LIMIT 5000",
                (self.position,),
            )
            for outbox_id, row_id in self.cur.fetchall():
                self.position = outbox_id
                self.arrivals.add(row_id)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.conn.close()


def latency(port: int, who: Contender, arrivals: Arrivals, n: int) -> list[float]:
    arrivals.reset()
    sent = write(port, "latency", n, who)
    arrivals.wait_count(n)
    return [(arrivals.times[int(key)] - float(at)) * 1000 for key, at in sent]


def bulk(port: int, who: Contender, arrivals: Arrivals, rows: int) -> float:
    arrivals.reset()
    ((start, _),) = write(port, "bulk", rows, who)
    arrivals.wait_count(rows)
    return events_per_second(rows, float(start), arrivals.last)


def client(port: int, table: str, log_bin: int, seconds: float, queues: Any) -> None:
    import pymysql

    ready, start, out = queues
    conn = pymysql.connect(
        host="127.0.0.1", port=port, user="root", database="bench", autocommit=True
    )
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_log_bin = %s", (log_bin,))
        ready.put(True)
        start.wait()
        done = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            cur.execute(f"INSERT INTO {table} (name, qty, at) VALUES ('x', 1, NOW(6))")
            done += 1
    conn.close()
    out.put(done)


def tps(port: int, table: str, log_bin: int, clients: int, seconds: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    queues = (ctx.Queue(), ctx.Event(), ctx.Queue())
    procs = [
        ctx.Process(target=client, args=(port, table, log_bin, seconds, queues))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        queues[0].get(timeout=60)  # every client connected
    queues[1].set()
    total = sum(queues[2].get(timeout=seconds + 60) for _ in procs)
    for proc in procs:
        proc.join(30)
    return total / seconds


def bulk_write(url: str, table: str, log_bin: int, rows: int) -> float:
    conn = connect(url)
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_log_bin = %s", (log_bin,))
        cur.execute("SET SESSION max_recursive_iterations = %s", (rows + 1,))
        started = time.perf_counter()
        cur.execute(
            f"INSERT INTO {table} (name, qty, at) "
            "WITH RECURSIVE s(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM s WHERE v < %s) "
            "SELECT CONCAT('item ', v), v, NOW(6) FROM s",
            (rows,),
        )
        took = time.perf_counter() - started
    conn.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=100, help="per round")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--settle", type=float, default=2.0, help="after start, before idle")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    server = ThrowawayMariaDB(binlog=True)
    try:
        run(server, args)
    finally:
        server.cleanup()


def run(server: ThrowawayMariaDB, args: Any) -> None:
    admin = connect(server.url)
    with admin.cursor() as cur:
        cur.execute("SET SESSION sql_log_bin = 0")
        cur.execute("CREATE DATABASE bench")
        cur.execute("CREATE DATABASE bench_binlog")
        cur.execute(f"CREATE TABLE bench_binlog.ours ({COLUMNS})")
        cur.execute("SELECT VERSION()")
        (version,) = cur.fetchone()
    admin.close()
    url = server.url + "bench"
    conn = connect(url)
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_log_bin = 0")
        for statement in SCHEMA:
            cur.execute(statement)
    conn.close()
    binlog_url = server.url + "bench_binlog"

    contenders = [
        Contender("bare polling loop", "bare", "bench", 0, lambda a: BareLoop(url, a).close),
        Contender("flask-dbnotify", "ours", "bench", 0, lambda a: start_ours(url, "ours", a)),
        Contender(
            "binlog capture",
            "ours",
            "bench_binlog",
            1,
            lambda a: start_ours(binlog_url, "ours", a, DBNOTIFY_CAPTURE="binlog"),
        ),
    ]
    names = [who.name for who in contenders]
    figures: dict[str, dict[str, list[float]]] = {n: {} for n in [*names, *WRITERS]}

    def note(name: str, key: str, value: float) -> None:
        figures[name].setdefault(key, []).append(value)

    for _ in range(args.rounds):
        for who in contenders:
            baseline = idle_cpu(args.idle_seconds)
            stop = who.start(Arrivals())
            time.sleep(args.settle)  # starting is not idling (the leader's first steps)
            note(who.name, "idle", idle_cpu(args.idle_seconds) - baseline)
            stop()

    arrivals = {name: Arrivals() for name in names}
    stops = [who.start(arrivals[who.name]) for who in contenders]
    shuffle = random.Random(17)
    try:
        for who in contenders:
            latency(server.port, who, arrivals[who.name], 20)  # warm up
        order = list(contenders)
        for _ in range(args.rounds):
            shuffle.shuffle(order)
            for who in order:
                samples = latency(server.port, who, arrivals[who.name], args.latency_samples)
                note(who.name, "p50", pct(samples, 0.5))
                note(who.name, "p99", pct(samples, 0.99))
                note(who.name, "rate", bulk(server.port, who, arrivals[who.name], args.rows))
            for name in names:
                note(name, "rate ratio", figures[name]["rate"][-1] / figures[names[0]]["rate"][-1])
    finally:
        for stop in stops:
            stop()

    # The writers' side, with no listener running.
    order = list(WRITERS)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        rates = {n: tps(server.port, *WRITERS[n], args.clients, args.seconds) for n in order}
        times = {n: bulk_write(url, *WRITERS[n], args.rows) for n in order}
        for name in WRITERS:
            note(name, "tps", rates[name])
            note(name, "tps x", rates[name] / rates["plain"])
            note(name, "bulk ms", times[name] * 1000)
            note(name, "write", times[name] / times["plain"])
    report(version, args, figures, names)


def report(
    version: str, args: Any, figures: dict[str, dict[str, list[float]]], names: list[str]
) -> None:
    print(
        f"MariaDB {version}, a throwaway server (flush at commit 2); writers in another "
        f"process; {args.rounds} rounds, each figure median (min–max) over them"
    )
    print(
        f"{args.rows:,}-row INSERT transaction; events/s from the statement's start "
        "to the last event"
    )
    figures["bare polling loop"]["write"] = figures["bare outbox"]["write"]
    figures["binlog capture"]["write"] = figures["binlog"]["write"]
    print_rates(figures, names, "bare loop")
    print()
    print("commit to receiver across processes, ms; idle CPU in % of one core")
    print(f"{'':18} {'p50':>18} {'p99':>21} {'idle CPU %':>20}")
    for name in names:
        r = figures[name]
        print(
            f"{name:18} {spread(r['p50'], '.2f'):>18} {spread(r['p99'], '.2f'):>21} "
            f"{spread(r['idle'], '.2f'):>20}"
        )
    print()
    print(
        f"writers: {args.clients} clients' single-row INSERTs for {args.seconds:g} s; "
        f"one {args.rows:,}-row INSERT"
    )
    print(f"{'':18} {'TPS':>24} {'vs plain':>18} {'bulk ms':>24} {'vs plain':>18}")
    for name in WRITERS:
        r = figures[name]
        print(
            f"{name:18} {spread(r['tps']):>24} {spread(r['tps x'], '.2f'):>18} "
            f"{spread(r['bulk ms']):>24} {spread(r['write'], '.2f'):>18}"
        )


if __name__ == "__main__":
    main()
