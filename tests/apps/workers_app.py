"""An app for tests that run it under gunicorn or uWSGI (or fork it otherwise).

The database URL comes from ``$DBNOTIFY_TEST_APP_DATABASE_URL``; autostart is
on and ``orders`` is watched. The module reports on stdout, one write(2) per
line so lines from several processes never interleave::

    workers_app: imported pid=PID                 when this module is imported
    workers_app: listener connected pid=PID       each time a listener connects
    workers_app: receivers run in THREAD pid=PID  then: "the main thread" (a gevent
                                                  worker's greenlets) or "a thread of their own"
    workers_app: received orders PK pid=PID       for each row event

gunicorn and uWSGI themselves write nothing to stdout.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from flask import Flask

from flask_dbnotify import ChangeEvent, DBNotify, listener_connected


def _say(text: str) -> None:
    os.write(1, f"workers_app: {text} pid={os.getpid()}\n".encode())


_say("imported")

app = Flask(__name__)
app.config["DBNOTIFY_DATABASE_URI"] = os.environ["DBNOTIFY_TEST_APP_DATABASE_URL"]
app.config["DBNOTIFY_AUTOSTART"] = True
app.config["DBNOTIFY_CHECK_TRIGGERS"] = False


def _report_connected(sender: Any, **kwargs: Any) -> None:
    _say("listener connected")
    # The process's main thread has the process's id as its native id.
    own = threading.get_native_id() != os.getpid()
    _say(f"receivers run in {'a thread of their own' if own else 'the main thread'}")


# Connected before DBNotify(app), which may start the listener at once.
listener_connected.connect(_report_connected)

dbnotify = DBNotify(app)


# Registered after DBNotify(app): autostart must include it.
@dbnotify.on("orders")
def _report_row(event: ChangeEvent) -> None:
    _say(f"received orders {event.pk}")


@app.get("/")
def index() -> str:
    return f"ok {os.getpid()}"
