"""An app that watches ``orders``, for tests that run ``flask`` subprocesses.

The database URL comes from ``$DBNOTIFY_TEST_APP_DATABASE_URL``. Autostart is
on, so the tests show which processes start a listener and which do not. Each
listener connection in this process prints ``orders_app: listener connected
pid=PID`` on stderr.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from flask_dbnotify import DBNotify, listener_connected

app = Flask(__name__)
app.config["DBNOTIFY_DATABASE_URI"] = os.environ["DBNOTIFY_TEST_APP_DATABASE_URL"]
app.config["DBNOTIFY_AUTOSTART"] = True
app.config["DBNOTIFY_CHECK_TRIGGERS"] = False


def _report_connected(sender: Any, **kwargs: Any) -> None:
    # One write(2), so the line never interleaves with the main thread's output.
    os.write(2, f"orders_app: listener connected pid={os.getpid()}\n".encode())


# Connected before DBNotify(app), which may start the listener at once.
listener_connected.connect(_report_connected)

dbnotify = DBNotify(app)
dbnotify.watch("orders")


@app.get("/")
def index() -> str:
    return "ok"
