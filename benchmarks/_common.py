"""What the benchmark scripts share."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

#: The server the PostgreSQL scripts use; they make their own tables there.
DEFAULT_URL = os.environ.get("DBNOTIFY_BENCH_URL", "postgresql://postgres@127.0.0.1:5432/test")


class Arrivals:
    """When each event arrived (by key), and how many; waits are bounded."""

    def __init__(self) -> None:
        self.times: dict[Any, float] = {}
        self.count = 0
        self.last = 0.0
        #: The count a waiter waits for (0: nobody waits).
        self.target = 0
        self.cond = threading.Condition()

    def add(self, key: Any) -> None:
        now = time.perf_counter()
        with self.cond:
            self.times[key] = now
            self.count += 1
            self.last = now
            # Wake the waiter once, not for every event: a wake-up per
            # event takes the GIL from the listener being measured.
            if self.count >= self.target:
                self.cond.notify_all()

    def wait_count(self, n: int, timeout: float = 300.0) -> None:
        with self.cond:
            self.target = n
            try:
                if not self.cond.wait_for(lambda: self.count >= n, timeout):
                    raise SystemExit(f"only {self.count} of {n} events arrived in {timeout}s")
            finally:
                self.target = 0

    def reset(self) -> None:
        with self.cond:
            self.times.clear()
            self.count = 0


#: How every script counts events/s: the rows of one statement divided by
#: the time from the start of the writing statement to the last event
#: delivered (the write is part of what a receiver waits for).
def events_per_second(rows: int, started: float, last_event: float) -> float:
    return rows / (last_event - started)


def claim_database(conn: Any, script: str) -> None:
    """Hold, for as long as ``conn`` is open, the lock every PostgreSQL
    script takes before it drops and makes its tables (some share names):
    a second run on the same database stops here instead of breaking the
    first one's tables under it."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(hashtext('flask-dbnotify benchmarks'))")
        if not cur.fetchone()[0]:
            raise SystemExit(
                f"{script}: another benchmark is running on this database; wait for it, "
                "or point DBNOTIFY_BENCH_URL (or --url) at another database"
            )


def median_range(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the runs of one figure."""
    return statistics.median(values), min(values), max(values)


def spread(values: list[float], fmt: str = ",.0f", suffix: str = "") -> str:
    """``median (min–max)`` of the runs of one figure: a noisy run shows as
    a wide range instead of a changed median."""
    mid, lo, hi = median_range(values)
    return f"{mid:{fmt}}{suffix} ({lo:{fmt}}–{hi:{fmt}})"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_ours(url: str, table: str, arrivals: Arrivals, **config: Any) -> Callable[[], None]:
    """Flask-DBNotify watching ``table``, an on() receiver noting each
    INSERT's key in ``arrivals``; returns what stops it."""
    from flask import Flask

    from flask_dbnotify import DBNotify

    app = Flask("bench")
    app.config.update(DBNOTIFY_DATABASE_URI=url, DBNOTIFY_AUTOSTART=False, **config)
    dbnotify = DBNotify(app)

    @dbnotify.on(table, "insert")
    def received(event: Any) -> None:
        arrivals.add(event.pk)

    dbnotify.install_triggers(app)
    dbnotify.start(app)
    return lambda: dbnotify.close(app)


def idle_cpu(seconds: float) -> float:
    """Percent of one core this process burns over ``seconds`` doing nothing."""
    before = time.process_time()
    time.sleep(seconds)
    return (time.process_time() - before) / seconds * 100


def print_rates(figures: dict[str, dict[str, list[float]]], names: list[str], limit: str) -> None:
    """The bulk table: events/s, against the first contender, write cost."""
    print(f"{'':18} {'events/s':>27} {'vs ' + limit:>18} {'write vs plain':>21}")
    for name in names:
        r = figures[name]
        print(
            f"{name:18} {spread(r['rate']):>27} {spread(r['rate ratio'], '.2f'):>18} "
            f"{spread(r['write'], '.2f', 'x'):>21}"
        )
