"""An app for tests that run it under gunicorn (or fork it otherwise).

The database URL comes from ``$DBNOTIFY_TEST_APP_DATABASE_URL``; autostart is
on and ``orders`` is watched. The module reports on stdout, one write(2) per
line so lines from several processes never interleave::

    workers_app: imported pid=PID                 when this module is imported
    workers_app: listener connected pid=PID       each time a listener connects
    workers_app: received orders PK pid=PID       for each row event

gunicorn itself writes nothing to stdout.
"""

from __future__ import annotations

import os
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
