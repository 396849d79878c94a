"""What the benchmark scripts share."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

#: The server the PostgreSQL scripts use; they make their own tables there.
DEFAULT_URL = os.environ.get("DBNOTIFY_BENCH_URL", "postgresql://postgres@127.0.0.1:5432/test")


class Arrivals:
    """When each event arrived (by key), and how many; waits are bounded."""

    def __init__(self) -> None:
        self.times: dict[Any, float] = {}
        self.count = 0
        self.last = 0.0
        self.cond = threading.Condition()

    def add(self, key: Any) -> None:
        now = time.perf_counter()
        with self.cond:
            self.times[key] = now
            self.count += 1
            self.last = now
            self.cond.notify_all()

    def wait_count(self, n: int, timeout: float = 300.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.count >= n, timeout):
                raise SystemExit(f"only {self.count} of {n} events arrived in {timeout}s")

    def reset(self) -> None:
        with self.cond:
            self.times.clear()
            self.count = 0
