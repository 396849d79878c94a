"""Log lines that could repeat without end, rate-limited with counts."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any


class RateLimited:
    """At most one line per ``interval`` seconds for each message format;
    the next line says how many were held back meanwhile."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._lock = threading.Lock()
        # message format -> (time of the last line, lines held back since)
        self._last: dict[str, tuple[float, int]] = {}

    def reset(self) -> None:
        """Forget what was logged: the next line of each kind goes out."""
        with self._lock:
            self._last.clear()

    def warning(self, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, msg, *args)

    def log(self, level: int, msg: str, *args: Any) -> bool:
        """Log unless a line of this format went out less than ``interval``
        seconds ago; whether it went out."""
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(msg, (-self.interval, 0))
            if now - last < self.interval:
                self._last[msg] = (last, held + 1)
                return False
            self._last[msg] = (now, 0)
        if held:
            self.logger.log(level, msg + " (and %d more like it since)", *args, held)
        else:
            self.logger.log(level, msg, *args)
        return True
