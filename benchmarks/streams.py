"""How many server-sent event streams one gunicorn worker holds.

Run:  .venv/bin/python benchmarks/streams.py [--clients 200] [--rate 1000]
      [--seconds 5] [--worker gthread|gevent] [--url URL]

For each worker class (both unless ``--worker``) and each client count
(``--clients 200,500,1000`` tries several), it starts ``gunicorn -w 1``
(``-k gthread --threads CLIENTS+16``, or ``-k gevent``; both with
``--worker-connections CLIENTS+100``) serving tests/apps/stream_app.py on a fresh SQLite file
(``--url`` for a PostgreSQL database instead, with a durable watch), with
the default DBNOTIFY_STREAM_BUFFER; opens CLIENTS streams from this
process (sockets read from one thread with a selector); then a writer
process commits ``--rate`` single-row transactions a second for
``--seconds``. Printed: the streams held to the end (every event, in
order, no gap), the events delivered in all, latency from each row's
commit returning in the writer to its read here (p50, p99, over every
event at every client), and the worker's RSS (VmRSS of /proc/PID/status)
before the clients and with them: memory per client.

This process reads every event of every client: at high counts it is
the reader, not the worker, that falls behind first (its CPU share is
printed; the machine's cores are shared by all three processes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.apps.stream_app import (  # noqa: E402
    Clients,
    percentile,
    prepare,
    ready,
    start_writer,
)

BIN = Path(sys.executable).parent
WAIT = 60.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(worker: str, clients: int, rate: float, seconds: float, url: str | None) -> dict:
    tmp = tempfile.mkdtemp(prefix="dbnotify-streams-")
    if url is None:
        url = f"sqlite:///{tmp}/streams.db"
    prepare(url)
    port = _free_port()
    argv = [str(BIN / "gunicorn"), "-w", "1", "-k", worker, "-b", f"127.0.0.1:{port}"]
    if worker == "gthread":
        argv += ["--threads", str(clients + 16)]
    # gthread caps its connections at --worker-connections too (1000 by default).
    argv += ["--worker-connections", str(clients + 100)]
    argv += ["--no-control-socket", "--graceful-timeout", "1", "--backlog", "4096"]
    argv.append("tests.apps.stream_app:create_app()")
    env = {**os.environ, "DBNOTIFY_STREAM_APP_URL": url, "PYTHONPATH": str(ROOT)}
    err = open(f"{tmp}/gunicorn.err", "wb")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=err, stderr=err, start_new_session=True
    )
    reader = Clients()
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                answer = ready(port, WAIT)
                if answer["connected"]:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gunicorn did not start: {Path(tmp, 'gunicorn.err').read_text()}")
            time.sleep(0.05)
        pid = int(answer["pid"])
        time.sleep(1)  # let the worker settle before the first reading
        before = rss_mib(pid)
        streams = [reader.open(port) for _ in range(clients)]
        reader.pump(lambda: all(s.connected for s in streams), f"{clients} streams open", WAIT)
        opened = rss_mib(pid)
        cpu0, t0 = cpu_seconds(), time.monotonic()
        out = f"{tmp}/commits.json"
        writer = start_writer(url, 1, rate, seconds, out)
        reader.pump(lambda: writer.poll() is not None, "the writer", seconds + WAIT)
        total = round(rate * seconds)
        try:
            reader.pump(
                lambda: all(len(s.pks) >= total or s.ended or s.gap for s in streams),
                "every event at every client",
                WAIT,
            )
            drained = True
        except AssertionError:
            drained = False
        busy = (cpu_seconds() - cpu0) / (time.monotonic() - t0)
        during = rss_mib(pid)
        committed = dict(zip(range(1, total + 1), json.loads(Path(out).read_text()), strict=True))
        wanted = list(range(1, total + 1))
        held = [s for s in streams if s.pks == wanted and s.gap is None and not s.ended]
        values = sorted(v for s in streams for v in s.latencies(committed))
        return {
            "worker": worker,
            "clients": clients,
            "held": len(held),
            "gaps": sum(1 for s in streams if s.gap is not None),
            "drained": drained,
            "delivered": sum(len(s.pks) for s in streams),
            "expected": total * clients,
            "p50": 1000 * percentile(values, 0.5) if values else float("nan"),
            "p99": 1000 * percentile(values, 0.99) if values else float("nan"),
            "rss_before": before,
            "rss_open": opened,
            "rss_during": during,
            "per_client_kib": 1024 * (opened - before) / clients,
            "reader_cpu": busy,
        }
    finally:
        reader.close()
        try:
            os.killpg(server.pid, 15)
            server.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, 9)
            server.wait(10)
        err.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", default="200", help="a count, or several: 200,500,1000")
    parser.add_argument("--rate", type=float, default=1000.0, help="rows a second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--worker", choices=["gthread", "gevent"], action="append")
    parser.add_argument("--url", help="a PostgreSQL database (default: a SQLite file)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each; medians printed")
    args = parser.parse_args()
    # A socket per client here, and in the worker (which inherits this).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counts = [int(c) for c in args.clients.split(",")]
    print(
        f"one gunicorn worker, {args.rate:.0f} single-row commits/s for {args.seconds:.0f} s, "
        f"{'PostgreSQL' if args.url else 'SQLite'}; latency from commit to client, "
        f"{args.rounds} round(s), medians"
    )
    head = (
        f"{'worker':8} {'clients':>7} {'held':>5} {'gaps':>4} {'events':>10} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'RSS MiB':>15} {'KiB/client':>10} {'reader CPU':>10}"
    )
    print(head)
    for worker in args.worker or ["gthread", "gevent"]:
        for count in counts:
            results = [
                run(worker, count, args.rate, args.seconds, args.url) for _ in range(args.rounds)
            ]

            def med(key: str, rs: list[dict] = results) -> float:
                return statistics.median(r[key] for r in rs)

            print(
                f"{worker:8} {count:>7} {min(x['held'] for x in results):>5} "
                f"{max(x['gaps'] for x in results):>4} "
                f"{min(x['delivered'] for x in results):>10,} {med('p50'):>7.1f} "
                f"{med('p99'):>7.1f} {med('rss_before'):>6.1f} -> {med('rss_open'):>6.1f} "
                f"{med('per_client_kib'):>10.1f} {med('reader_cpu'):>9.0%}"
                + ("" if all(x["drained"] for x in results) else "  (not all drained)"),
                flush=True,
            )


if __name__ == "__main__":
    main()
