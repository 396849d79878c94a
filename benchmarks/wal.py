"""Capture modes side by side: triggers (fast, durable) against WAL capture.

Run:  .venv/bin/python benchmarks/wal.py [--rounds 5] [--seconds 10]
      [--singles 100] [--rows 100000] [--bulk-rounds 3]

It starts a throwaway PostgreSQL of its own (``wal_level = logical``,
``synchronous_commit = on`` and ``fsync = on``, so that every commit pays
its flush to disk as in production; ``--fsync off`` to compare), removed
at the end. One table of the same shape per contender:

- plain:   no watch;
- fast:    a watch in triggers mode;
- durable: a durable watch in triggers mode;
- wal:     a watch in WAL mode (``DBNOTIFY_CAPTURE = "wal"``);
- slot:    the raw limit of WAL capture, for writers: a publication and a
           pgoutput slot that a bare psycopg2 consumer (another process)
           streams, confirming each message and doing nothing else.

Two apps run in this process, one per capture mode, both started, so that
their listeners (and the WAL leader, which is this process) work during
every measurement, as in production. The WAL app keeps its objects in a
schema of its own, so that each listener reads only its own journal (both
still hear every notification on the one channel). Three parts:

1. Writers' throughput: pgbench, 8 clients (``-n -c 8 -j 2``), a
   single-row INSERT per transaction, ``--seconds`` per contender and
   round; TPS as the median over ``--rounds``, and its ratio to plain.
   Every slot's WAL sender decodes all the WAL, whatever it publishes, so
   a slot is streamed only while its own contender runs: the WAL app is
   stopped for the others (its slot is then moved past their writes, as
   a stopped app's would have to be read through), the bare consumer
   runs for its own only.
   Delivery is measured too: the share of the committed rows this process
   had received when pgbench ended, and when and how fast the rest came.
   Every backlog is drained before the next contender runs, but for WAL
   capture's, which takes minutes (its leader relays about a thousand
   transactions a second on a 2-core machine): after CATCH_UP seconds its
   rate so far is kept, the app is stopped and its slot moved past the
   backlog (``pg_replication_slot_advance``); ``--drain`` waits instead.
2. Commit-to-receiver latency of single-row autocommit INSERTs, one at a
   time: from the moment the writer's commit returned to the moment an
   ``on()`` receiver ran, in this process and in another process (a child
   running the same two apps, which does not lead: it starts after this
   process leads the slot). Both stamp ``time.time()``.
3. One ``--rows``-row INSERT statement: the statement's time, and events/s
   from the statement's start to the last event received (as every script
   counts), here and in the child.

Part 2 runs ``--rounds`` rounds of ``--singles`` commits per contender,
part 3 ``--bulk-rounds`` rounds. In every
round the contenders run one after the other in a new order, so that a
busy moment of the shared machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras
from flask import Flask

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flask_dbnotify import DBNotify, events_dropped  # noqa: E402

TABLES = {
    "plain": "bw_plain",
    "fast": "bw_fast",
    "durable": "bw_durable",
    "wal": "bw_wal",
    "slot": "bw_slot",
}
WATCHED = ("fast", "durable", "wal")
COLUMNS = "(id bigserial PRIMARY KEY, name text, qty int, at timestamptz)"
SLOT = "dbnotify_bench_wal"
#: The bare consumer's publication and slot.
RAW = "dbnotify_bench_raw"
SINGLE = "INSERT INTO {} (name, qty, at) VALUES ('s', 1, now()) RETURNING id"
BULK = "INSERT INTO {} (name, qty, at) SELECT 'item ' || g, g, now() FROM generate_series(1, %s) g"
PGBENCH = "INSERT INTO {} (name, qty, at) VALUES ('p', 1, now());\n"
#: Seconds a backlog left after a pgbench run may take to drain (without
#: --drain): past that, its delivery rate so far is what is printed.
CATCH_UP = 5.0
#: A flush of the child's that holds more events than this says only how
#: many and when the last arrived (a bulk statement), not each one.
DETAIL = 64


class Times:
    """When each event arrived (``time.time()``), per contender; a waiter
    is woken only for what it waits for, so that a busy stream of events
    does not keep waking it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.times: dict[tuple[str, int], float] = {}
        self.count: dict[str, int] = dict.fromkeys(WATCHED, 0)
        self.last: dict[str, float] = dict.fromkeys(WATCHED, 0.0)
        #: Events a listener dropped (its queue full), counted for the
        #: contender being measured: only its table is written meanwhile.
        self.dropped: dict[str, int] = dict.fromkeys(WATCHED, 0)
        self.current = ""
        self._want: tuple[str, int, int | None] | None = None

    def add(self, name: str, pk: int | None, at: float, n: int = 1) -> None:
        with self.cond:
            if pk is not None:
                self.times[(name, pk)] = at
            self.count[name] += n
            self.last[name] = max(self.last[name], at)
            self._wake(name, pk)

    def drop(self, n: int) -> None:
        with self.cond:
            if self.current in self.dropped:
                self.dropped[self.current] += n
                self._wake(self.current, None)

    def _wake(self, name: str, pk: int | None) -> None:
        want = self._want
        if want is not None and want[0] == name:
            if (want[1] and pk == want[1]) or (want[2] and self.done(name) >= want[2]):
                self.cond.notify_all()

    def done(self, name: str) -> int:
        """Events received or dropped."""
        return self.count[name] + self.dropped[name]

    def wait_key(self, name: str, pk: int, timeout: float) -> float:
        with self.cond:
            self._want = (name, pk, None)
            try:
                if not self.cond.wait_for(lambda: (name, pk) in self.times, timeout):
                    raise SystemExit(f"{name} row {pk} did not arrive in {timeout} s")
                return self.times[(name, pk)]
            finally:
                self._want = None

    def wait_count(self, name: str, n: int, timeout: float) -> bool:
        with self.cond:
            self._want = (name, 0, n)
            try:
                return self.cond.wait_for(lambda: self.done(name) >= n, timeout)
            finally:
                self._want = None

    def reset(self) -> None:
        with self.cond:
            self.times.clear()
            self.count = dict.fromkeys(WATCHED, 0)
            self.last = dict.fromkeys(WATCHED, 0.0)
            self.dropped = dict.fromkeys(WATCHED, 0)


def make_apps(url: str, record: Any, dropped: Any) -> list[tuple[Flask, DBNotify]]:
    """The two apps: triggers mode (fast and durable watches) and WAL mode;
    ``record(name, pk, at)`` called by each watch's ``on()`` receiver,
    ``dropped(count)`` when either listener drops events."""
    triggers = Flask("bench_triggers")
    triggers.config.update(
        DBNOTIFY_DATABASE_URI=url, DBNOTIFY_AUTOSTART=False, DBNOTIFY_CHECK_TRIGGERS=False
    )
    t_ext = DBNotify(triggers)
    t_ext.watch(TABLES["fast"])
    t_ext.watch(TABLES["durable"], durable=True)
    wal = Flask("bench_wal")
    wal.config.update(
        DBNOTIFY_DATABASE_URI=url,
        DBNOTIFY_AUTOSTART=False,
        DBNOTIFY_CHECK_TRIGGERS=False,
        DBNOTIFY_CAPTURE="wal",
        DBNOTIFY_SLOT=SLOT,
        # A journal of its own, as an app alone on its database would
        # have: the other app's listener does not read the relay's rows.
        DBNOTIFY_SCHEMA="bench_wal",
    )
    w_ext = DBNotify(wal)
    w_ext.watch(TABLES["wal"])
    for name, ext in (("fast", t_ext), ("durable", t_ext), ("wal", w_ext)):

        def receiver(event: Any, name: str = name) -> None:
            record(name, event.pk, time.time())

        ext.on(TABLES[name], "insert")(receiver)
    for app in (triggers, wal):
        events_dropped.connect_via(app)(lambda sender, count, **extra: dropped(count))
    return [(triggers, t_ext), (wal, w_ext)]


# -- the other process ----------------------------------------------------------


def child(url: str) -> None:
    """Run both apps; write, every few milliseconds, what arrived since."""
    lock = threading.Lock()
    pending: list[tuple[str, int, float]] = []

    def record(name: str, pk: int, at: float) -> None:
        with lock:
            pending.append((name, pk, at))

    def dropped(count: int) -> None:
        os.write(1, json.dumps({"dropped": count}).encode() + b"\n")

    apps = make_apps(url, record, dropped)
    for app, ext in apps:
        ext.start(app)
    os.write(1, b'{"ready": true}\n')
    done = threading.Event()

    def flush() -> None:
        while not done.wait(0.002):
            with lock:
                if not pending:
                    continue
                batch = pending[:]
                pending.clear()
            lines = []
            if len(batch) <= DETAIL:
                lines = [json.dumps({"n": name, "pk": pk, "t": at}) for name, pk, at in batch]
            else:
                for name in WATCHED:
                    mine = [at for n, _, at in batch if n == name]
                    if mine:
                        lines.append(json.dumps({"n": name, "c": len(mine), "t": max(mine)}))
            os.write(1, ("\n".join(lines) + "\n").encode())

    thread = threading.Thread(target=flush, daemon=True)
    thread.start()
    sys.stdin.read()
    done.set()
    for app, ext in apps:
        ext.close(app)


def consume(url: str) -> None:
    """The bare consumer: stream RAW, confirm every message, nothing else."""
    conn = psycopg2.connect(url, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    cur = conn.cursor()
    cur.start_replication(
        slot_name=RAW,
        decode=False,
        options={"proto_version": "1", "publication_names": RAW},
    )
    os.write(1, b"ready\n")
    cur.consume_stream(lambda msg: msg.cursor.send_feedback(flush_lsn=msg.data_start))


class Consumer:
    """The bare consumer's process, for the slot contender's run."""

    def __init__(self, url: str, cur: Any) -> None:
        # What was written since it last ran is not its to read.
        cur.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (RAW,))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--consume", url],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != b"ready\n":
            raise SystemExit("the bare consumer did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


class Child:
    """The child process, its arrivals read into ``times``."""

    def __init__(self, url: str) -> None:
        self.times = Times()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", url],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(60):
            raise SystemExit("the child process did not start in 60 s")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "ready" in msg:
                self.ready.set()
            elif "dropped" in msg:
                self.times.drop(msg["dropped"])
            elif "c" in msg:
                self.times.add(msg["n"], None, msg["t"], msg["c"])
            else:
                self.times.add(msg["n"], msg["pk"], msg["t"])

    def close(self) -> None:
        proc = self.proc
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- the measurement ------------------------------------------------------------


def start_server(args: argparse.Namespace) -> Any:
    from tests._postgres import ThrowawayServer, start_private_postgres

    settings = {
        "wal_level": "logical",
        "max_replication_slots": "20",
        "max_wal_senders": "20",
        "synchronous_commit": "on",
        # The throwaway server turns these off; production has them on.
        "fsync": args.fsync,
        "full_page_writes": args.fsync,
    }
    if args.bindir:
        return ThrowawayServer(Path(args.bindir), settings)
    return start_private_postgres(settings)


def pgbench(server: Any, script: str, seconds: int) -> tuple[float, int]:
    """pgbench's TPS (without connection time) and transactions done."""
    binary = server.bindir / "pgbench"
    if not binary.is_file():
        binary = Path(shutil.which("pgbench") or "/usr/bin/pgbench")
    out = subprocess.run(
        [str(binary), "-n", "-c", "8", "-j", "2", "-T", str(seconds), "-f", script]
        + ["-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", "postgres"],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
    ).stdout
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    if tps is None or done is None:
        raise SystemExit(f"cannot read pgbench's output:\n{out}")
    return float(tps.group(1)), int(done.group(1))


def slot_pid(cur: Any) -> int | None:
    cur.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (SLOT,))
    row = cur.fetchone()
    return None if row is None else row[0]


def wait_leader(cur: Any) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pid = slot_pid(cur)
        if pid is not None:
            return pid
        time.sleep(0.05)
    raise SystemExit("no process leads the slot after 30 s")


def stop_wal(wal_app: tuple[Flask, DBNotify], cur: Any) -> None:
    """Stop the WAL app, and wait until its slot is free."""
    app, ext = wal_app
    ext.close(app)
    deadline = time.monotonic() + 30
    while slot_pid(cur) is not None:
        if time.monotonic() > deadline:
            raise SystemExit("the slot is still in use 30 s after the app stopped")
        time.sleep(0.05)


def start_wal(wal_app: tuple[Flask, DBNotify], cur: Any) -> int:
    """Move the stopped WAL app's slot to now (what was written meanwhile,
    or what it had not relayed, is not read), start the app; return its
    leader's backend pid."""
    app, ext = wal_app
    cur.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (SLOT,))
    ext.start(app)
    return wait_leader(cur)


def skip_backlog(wal_app: tuple[Flask, DBNotify], cur: Any, here: Times) -> int:
    """Stop the WAL app, move its slot past what it had not relayed, and
    start it again; return its leader's backend pid once nothing more
    arrives."""
    stop_wal(wal_app, cur)
    leader = start_wal(wal_app, cur)
    # What the relay had journaled but the listener not delivered arrives
    # after start(): wait for quiet.
    while True:
        seen = here.count["wal"]
        time.sleep(0.5)
        if here.count["wal"] == seen:
            return leader


def per_second(rows: int, took: list[float]) -> str:
    """Events/s over the median time, or that they were all there first."""
    median = statistics.median(took)
    return f"{rows / median:,.0f}" if median > 0 else "at commit"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="throughput and latency rounds")
    parser.add_argument("--seconds", type=int, default=10, help="pgbench seconds per run")
    parser.add_argument("--singles", type=int, default=100, help="commits per contender/round")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--bulk-rounds", type=int, default=3)
    parser.add_argument(
        "--drain", action="store_true", help="wait for every backlog (WAL: minutes)"
    )
    parser.add_argument("--fsync", choices=("on", "off"), default="on")
    parser.add_argument("--bindir", help="PostgreSQL binaries (default: the tests' choice)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--consume", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.consume:
        consume(args.consume)
        return

    server = start_server(args)
    apps: list[tuple[Flask, DBNotify]] = []
    other: Child | None = None
    workdir = Path(tempfile.mkdtemp(prefix="dbnotify-bench-"))
    try:
        url = server.url
        conn = psycopg2.connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SHOW server_version")
        (version,) = cur.fetchone() or ("?",)
        for table in TABLES.values():
            cur.execute(f"CREATE TABLE {table} {COLUMNS}")
        cur.execute(f"CREATE PUBLICATION {RAW} FOR TABLE {TABLES['slot']}")
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (RAW,))
        here = Times()
        apps = make_apps(url, here.add, here.drop)
        for app, ext in apps:
            ext.install_triggers(app)
        for app, ext in apps:
            ext.start(app)
        leader = wait_leader(cur)
        print(
            f"PostgreSQL {version}, fsync {args.fsync}, synchronous_commit on; "
            f"this process leads slot {SLOT} (backend pid {leader})",
            flush=True,
        )
        shuffle = random.Random(13)

        # 1. Writers' throughput.
        scripts = {}
        for name, table in TABLES.items():
            scripts[name] = str(workdir / f"{name}.sql")
            Path(scripts[name]).write_text(PGBENCH.format(table))
        tps: dict[str, list[float]] = {name: [] for name in TABLES}
        at_end: dict[str, list[float]] = {name: [] for name in WATCHED}
        after: dict[str, list[float]] = {name: [] for name in WATCHED}
        late: dict[str, list[float]] = {name: [] for name in WATCHED}
        lost = dict.fromkeys(WATCHED, 0)
        order = list(TABLES)
        for r in range(args.rounds):
            shuffle.shuffle(order)
            for name in order:
                here.reset()
                here.current = name
                running = slot_pid(cur) is not None
                if name == "wal" and not running:
                    leader = start_wal(apps[1], cur)
                elif name != "wal" and running:
                    stop_wal(apps[1], cur)
                consumer = Consumer(url, cur) if name == "slot" else None
                try:
                    value, done = pgbench(server, scripts[name], args.seconds)
                finally:
                    if consumer is not None:
                        consumer.stop()
                ended, delivered = time.time(), here.count.get(name, 0)
                tps[name].append(value)
                if name not in WATCHED:
                    continue
                at_end[name].append(delivered / done)
                lost[name] += here.dropped[name]
                # The rest, before the next contender runs: drained (and
                # the rate it was delivered at), or, with a backlog that
                # would take long, its rate over CATCH_UP seconds, then the
                # slot is moved past it.
                patient = args.drain or name != "wal"
                drained = here.wait_count(name, done, 600 if patient else CATCH_UP)
                if drained:
                    late[name].append(max(0.0, here.last[name] - ended))
                    if done > delivered:
                        rate = (done - delivered) / max(here.last[name] - ended, 1e-6)
                        after[name].append(rate)
                elif patient:
                    raise SystemExit(f"{name}: {here.count[name]} of {done} events in 600 s")
                else:
                    late[name].append(float("inf"))
                    after[name].append((here.count[name] - delivered) / (time.time() - ended))
                    leader = skip_backlog(apps[1], cur, here)
            print(
                f"  round {r + 1}: "
                + ", ".join(f"{n} {tps[n][-1]:.0f}" for n in TABLES)
                + " TPS; delivered when pgbench ended: "
                + ", ".join(f"{n} {at_end[n][-1]:.0%}" for n in WATCHED),
                flush=True,
            )

        # 2. Latency, here and in another process (which does not lead).
        if slot_pid(cur) is None:
            leader = start_wal(apps[1], cur)
        other = Child(url)
        if slot_pid(cur) != leader:
            raise SystemExit("the leader changed when the child started")
        lat_here: dict[str, list[float]] = {name: [] for name in WATCHED}
        lat_other: dict[str, list[float]] = {name: [] for name in WATCHED}
        order = list(WATCHED)
        for _ in range(args.rounds):
            shuffle.shuffle(order)
            for name in order:
                for _ in range(args.singles):
                    cur.execute(SINGLE.format(TABLES[name]))
                    committed = time.time()
                    (pk,) = cur.fetchone() or (0,)
                    lat_here[name].append(here.wait_key(name, pk, 30) - committed)
                    lat_other[name].append(other.times.wait_key(name, pk, 30) - committed)

        # 3. One large INSERT.
        statement: dict[str, list[float]] = {name: [] for name in TABLES if name != "slot"}
        # Seconds from the commit to the last event (fast events may all
        # arrive before the writer hears that its commit is done).
        took_here: dict[str, list[float]] = {name: [] for name in WATCHED}
        took_other: dict[str, list[float]] = {name: [] for name in WATCHED}
        order = list(statement)
        for _ in range(args.bulk_rounds):
            shuffle.shuffle(order)
            for name in order:
                here.reset()
                other.times.reset()
                here.current = other.times.current = name
                begun = time.time()  # the receivers stamp time.time()
                start = time.perf_counter()
                cur.execute(BULK.format(TABLES[name]), (args.rows,))
                statement[name].append(time.perf_counter() - start)
                if name not in WATCHED:
                    continue
                for times, took in ((here, took_here), (other.times, took_other)):
                    if not times.wait_count(name, args.rows, 600):
                        raise SystemExit(f"{name}: {times.count[name]} of {args.rows} in 600 s")
                    took[name].append(times.last[name] - begun)
        if slot_pid(cur) != leader:
            print("NOTE: the leader changed during the run")
    finally:
        if other is not None:
            other.close()
        for app, ext in apps:
            ext.close(app)
        server.destroy()
        shutil.rmtree(workdir, ignore_errors=True)

    med = statistics.median
    plain = med(tps["plain"])
    print()
    print(
        f"Writers: pgbench -n -c 8 -j 2 -T {args.seconds}, one 1-row INSERT per "
        f"transaction; median of {args.rounds} rounds"
    )
    print(
        f"{'':8} {'TPS':>8} {'vs plain':>9} {'vs fast':>8} {'vs slot':>8} {'delivered at end':>17} "
        f"{'last event after':>17} {'rest at events/s':>17}"
    )
    for name in TABLES:
        t = med(tps[name])
        vs_slot = t / med(tps["slot"])
        rest = f"{'-':>17} {'-':>17} {'-':>17}"
        if name in WATCHED:
            last = med(late[name])
            last_text = f"> {CATCH_UP:.0f} s" if last == float("inf") else f"{last:.2f} s"
            speed = f"{med(after[name]):17,.0f}" if after[name] else f"{'-':>17}"
            rest = f"{med(at_end[name]):17.1%} {last_text:>17} {speed}"
        print(
            f"{name:8} {t:8.0f} {t / plain:8.2f}x {t / med(tps['fast']):7.2f}x "
            f"{vs_slot:7.2f}x {rest}"
        )
    print("(slot: a pgoutput slot that a bare psycopg2 consumer streams and confirms, the")
    print(" raw limit of WAL capture; delivered at end: what this process had received when")
    print(" pgbench ended, of the rows committed; last event after: when the rest had arrived;")
    print(" rest at: its rate of arrival")
    if not args.drain:
        print(f" over at most {CATCH_UP:.0f} s, after which the WAL slot is moved past the rest)")
    else:
        print(" until it had arrived)")
    for name in WATCHED:
        if lost[name]:
            print(
                f"{name}: {lost[name]:,} events dropped, a listener's queue full (events_dropped)"
            )
    print()
    n = args.rounds * args.singles
    print(f"Commit-to-receiver latency, 1-row autocommit INSERTs, {n} per contender; ms")
    print(f"{'':8} {'here p50':>9} {'p99':>7} {'other p50':>10} {'p99':>7}")
    for name in WATCHED:
        h, o = lat_here[name], lat_other[name]
        print(
            f"{name:8} {med(h) * 1000:9.2f} {pct(h, 99) * 1000:7.2f} "
            f"{med(o) * 1000:10.2f} {pct(o, 99) * 1000:7.2f}"
        )
    print("(here: this process, which leads the WAL slot; other: a process that does not)")
    print()
    print(f"One {args.rows:,}-row INSERT; median of {args.bulk_rounds} rounds")
    print(f"{'':8} {'INSERT ms':>10} {'vs plain':>9} {'events/s here':>14} {'other':>9}")
    base = med(statement["plain"])
    for name in statement:
        s = med(statement[name])
        speeds = f"{'-':>14} {'-':>9}"
        if name in WATCHED:
            here_rate = per_second(args.rows, took_here[name])
            speeds = f"{here_rate:>14} {per_second(args.rows, took_other[name]):>9}"
        print(f"{name:8} {s * 1000:10.0f} {s / base:8.2f}x {speeds}")


if __name__ == "__main__":
    main()
