"""MariaDB: what each way of capturing changes costs writers.

Run:  .venv/bin/python benchmarks/mariadb_capture.py [--clients 8] [--rounds 3]

The two captures a MySQL/MariaDB backend can have (see issue 17):

- **binlog**: the server writes every change to its row-based binary log
  (``binlog_format = ROW``, ``binlog_row_image = FULL``), which a reader
  follows as a replica would; no trigger.
- **triggers**: an ``AFTER ... FOR EACH ROW`` trigger appends the row's
  values, as JSON, to a journal table that listeners poll.

This script measures the writer's side of both on one throwaway server of
its own, started with the binary log on (``mariadbd`` and
``mariadb-install-db`` must be installed; the shared server is never
touched). A session that sets ``sql_log_bin = 0`` writes no binary log,
so the same server runs all three contenders:

- plain: a table without triggers, ``sql_log_bin = 0``;
- binlog: the same table, ``sql_log_bin = 1``;
- triggers: a table with the journal triggers, ``sql_log_bin = 0``.

Figures, each the median (min–max) of ``--rounds`` rounds, the contenders
in a new order each round, ratios taken within a round:

- writers' TPS: ``--clients`` processes each running single-row
  autocommit INSERTs for ``--seconds``;
- one ``--rows``-row INSERT ... SELECT, against the same on plain.

``innodb_flush_log_at_trx_commit = 2`` and ``sync_binlog = 0``, so that the
figures are the capture's work rather than the disk's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import spread  # noqa: E402

COLUMNS = "id BIGINT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100), qty INT, at DATETIME(6)"
SCHEMA = [
    f"CREATE TABLE plain ({COLUMNS})",
    f"CREATE TABLE binlog ({COLUMNS})",
    f"CREATE TABLE triggers ({COLUMNS})",
    "CREATE TABLE journal (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
    "created_at DATETIME(6) NOT NULL, shape VARCHAR(64), body LONGTEXT NOT NULL)",
    # What a watch's INSERT trigger would journal: a shape key, the time,
    # the row's values as a JSON array (DATETIME as text, exact).
    "CREATE TRIGGER triggers_i AFTER INSERT ON triggers FOR EACH ROW "
    "INSERT INTO journal (created_at, shape, body) VALUES (NOW(6), 'i0123456789', "
    "JSON_ARRAY(NEW.id, NEW.name, NEW.qty, NEW.at))",
]
#: contender: (table, sql_log_bin)
CONTENDERS = {"plain": ("plain", 0), "binlog": ("binlog", 1), "triggers": ("triggers", 0)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A throwaway mariadbd with the binary log on, in a directory of its own."""

    def __init__(self) -> None:
        for tool in ("mariadbd", "mariadb-install-db"):
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
                raise SystemExit(
                    f"{tool} is not installed (Debian: apt-get install mariadb-server)"
                )
        self.dir = tempfile.mkdtemp(prefix="dbnotify-mariadb-")
        self.port = free_port()
        data = os.path.join(self.dir, "data")
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
        )
        self.proc = subprocess.Popen(
            [
                "/usr/sbin/mariadbd" if shutil.which("mariadbd") is None else "mariadbd",
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--socket={os.path.join(self.dir, 'sock')}",
                f"--log-bin={os.path.join(self.dir, 'binlog')}",
                "--server-id=1",
                "--binlog-format=ROW",
                "--binlog-row-image=FULL",
                "--sync-binlog=0",
                "--innodb-flush-log-at-trx-commit=2",
                "--innodb-buffer-pool-size=512M",
                "--max-connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "error.log"), "w"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.connect(database=None).close()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise SystemExit(f"mariadbd did not start: see {self.dir}/error.log") from None
                time.sleep(0.1)
        conn = self.connect(database=None)
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE bench")
        conn.close()

    def connect(self, database: str | None = "bench", log_bin: int = 0) -> Any:
        import pymysql

        conn = pymysql.connect(
            host="127.0.0.1", port=self.port, user="root", database=database, autocommit=True
        )
        if database is not None:
            with conn.cursor() as cur:
                cur.execute("SET SESSION sql_log_bin = %s", (log_bin,))
        return conn

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def client(
    port: int, table: str, log_bin: int, seconds: float, ready: Any, start: Any, out: Any
) -> None:
    import pymysql

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


def tps(server: Server, table: str, log_bin: int, clients: int, seconds: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=client, args=(server.port, table, log_bin, seconds, ready, start, out))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=60)  # every client connected
    start.set()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for proc in procs:
        proc.join(30)
    return total / seconds


def bulk(server: Server, table: str, log_bin: int, rows: int) -> float:
    conn = server.connect(log_bin=log_bin)
    with conn.cursor() as cur:
        # The recursion limit: MariaDB's name, else MySQL's.
        try:
            cur.execute("SET SESSION max_recursive_iterations = %s", (rows + 1,))
        except Exception:  # noqa: BLE001 - MySQL
            cur.execute("SET SESSION cte_max_recursion_depth = %s", (rows + 1,))
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
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import pymysql  # noqa: F401
    except ImportError:
        raise SystemExit("PyMySQL is not installed: pip install -e '.[bench]'") from None

    server = Server()
    try:
        conn = server.connect()
        with conn.cursor() as cur:
            for statement in SCHEMA:
                cur.execute(statement)
            cur.execute("SELECT VERSION()")
            (version,) = cur.fetchone()
        conn.close()
        figures: dict[str, dict[str, list[float]]] = {name: {} for name in CONTENDERS}
        order = list(CONTENDERS)
        shuffle = random.Random(17)
        for _ in range(args.rounds):
            shuffle.shuffle(order)
            rates = {n: tps(server, *CONTENDERS[n], args.clients, args.seconds) for n in order}
            times = {n: bulk(server, *CONTENDERS[n], args.rows) for n in order}
            for name in CONTENDERS:
                r = figures[name]
                r.setdefault("tps", []).append(rates[name])
                r.setdefault("tps x", []).append(rates[name] / rates["plain"])
                r.setdefault("bulk ms", []).append(times[name] * 1000)
                r.setdefault("bulk x", []).append(times[name] / times["plain"])
    finally:
        server.stop()

    print(
        f"MariaDB {version}, a throwaway server (binlog ROW/FULL, sync_binlog 0, "
        f"flush at commit 2); {args.rounds} rounds, median (min–max)"
    )
    print(
        f"{'':10} {f'TPS, {args.clients} clients':>26} {'vs plain':>18} "
        f"{f'{args.rows:,}-row INSERT ms':>24} {'vs plain':>18}"
    )
    for name, r in figures.items():
        print(
            f"{name:10} {spread(r['tps']):>26} {spread(r['tps x'], '.2f'):>18} "
            f"{spread(r['bulk ms']):>24} {spread(r['bulk x'], '.2f'):>18}"
        )


if __name__ == "__main__":
    main()
