"""``python -m tests.apps.fleet URL N``: N processes forked from one, as a
preloading server forks its workers, each an app whose listener watches
``orders``. Each child writes ``listening PID`` once its listener is
connected, ``got PID PK`` for each row, and ``failed PID ERROR`` if it
cannot start; SIGTERM stops them all (the parent passes it on)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from flask import Flask

from flask_dbnotify import ChangeEvent, DBNotify, row_inserted


def say(line: str) -> None:
    # One write(2) of under PIPE_BUF bytes: lines of the children never mix.
    os.write(1, (line + "\n").encode())


def child(url: str) -> None:
    app = Flask(f"fleet_{os.getpid()}")
    # A short probe interval: pooled connections are closed sooner once idle.
    app.config.update(
        DBNOTIFY_DATABASE_URI=url, DBNOTIFY_AUTOSTART=False, DBNOTIFY_PROBE_INTERVAL=2
    )
    ext = DBNotify(app)
    ext.watch("orders")

    @row_inserted.connect_via("orders")
    def got(sender: str, event: ChangeEvent, **extra: Any) -> None:
        say(f"got {os.getpid()} {event.pk}")

    # SIGTERM is taken with sigwait(), by the main thread alone: blocked
    # here, before the listener's threads exist, so they block it too.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        ext.start(app)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        say(f"failed {os.getpid()} {str(exc).splitlines()[0]}")
        os._exit(1)
    say(f"listening {os.getpid()}")
    signal.sigwait({signal.SIGTERM})
    ext.stop(app)
    os._exit(0)


def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    children = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            child(url)
        children.append(pid)

    def stop(*_: Any) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # Exited and reaped already: it got the signal too.

    signal.signal(signal.SIGTERM, stop)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
