"""An app for tests that run it under gunicorn or uWSGI (or fork it otherwise).

The database URL comes from ``$DBNOTIFY_TEST_APP_DATABASE_URL``; autostart is
on and ``orders`` is watched. ``$DBNOTIFY_TEST_APP_CAPTURE`` and
``$DBNOTIFY_TEST_APP_SLOT``, if set, are its ``DBNOTIFY_CAPTURE`` and
``DBNOTIFY_SLOT`` (WAL capture, or ``binlog``). The module reports on stdout, one write(2)
per line so lines from several processes never interleave::

    workers_app: imported pid=PID                 when this module is imported
    workers_app: listener connected pid=PID       each time a listener connects
    workers_app: receivers run in THREAD pid=PID  then: "the main thread" (a gevent
                                                  worker's greenlets) or "a thread of their own"
    workers_app: received orders PK pid=PID       for each row event
    workers_app: leads the WAL slot pid=PID       when it becomes the WAL capture leader

gunicorn and uWSGI themselves write nothing to stdout.
"""

from __future__ import annotations

import logging
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
for _key in ("CAPTURE", "SLOT"):
    if f"DBNOTIFY_TEST_APP_{_key}" in os.environ:
        app.config[f"DBNOTIFY_{_key}"] = os.environ[f"DBNOTIFY_TEST_APP_{_key}"]


class _Leads(logging.Handler):
    """Says when this process becomes the leader (the leader logs it)."""

    def emit(self, record: logging.LogRecord) -> None:
        if "leads slot" in record.getMessage():
            _say("leads the WAL slot")
        elif "following the binary log" in record.getMessage():
            _say("leads the binary log")


# A handler of its own means Python's last resort no longer prints its
# warnings: stderr still gets them.
_warnings = logging.StreamHandler()
_warnings.setLevel(logging.WARNING)
for _name in ("postgresql.wal.leader", "mysql.binlog.leader"):
    _leader_log = logging.getLogger(f"flask_dbnotify.backends.{_name}")
    _leader_log.setLevel(logging.INFO)
    _leader_log.addHandler(_Leads())
    _leader_log.addHandler(_warnings)


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
