"""A brand-new process that listens with a durable watch:
``python -m tests.apps.durable_listen_app URL TABLE [KEY=VALUE ...]``,
each KEY=VALUE a config setting (``DBNOTIFY_CAPTURE=wal``).

URL is a ``postgresql://`` or ``sqlite:///`` URL. The app watches TABLE with
``durable=True``, prints ``{"ready": true}`` once ``start()`` has returned,
then one JSON line per row event, message or ``listener_connected``
(``{"connected": RECONNECT, "gap": GAP}``), ``{"leads": PID}`` when it
becomes the WAL capture leader, and stops and exits at the end of stdin.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from flask import Flask

from flask_dbnotify import (
    ChangeEvent,
    DBNotify,
    listener_connected,
    notification_received,
    row_changed,
)


def emit(obj: dict[str, Any]) -> None:
    # One write(2) per line, so lines never interleave.
    os.write(1, (json.dumps(obj, ensure_ascii=False) + "\n").encode())


def on_row(sender: str, event: ChangeEvent, **extra: Any) -> None:
    emit({"table": event.table, "op": event.op.value, "pk": event.pk, "id": event.id})


def on_message(sender: str, payload: Any, **extra: Any) -> None:
    emit({"channel": sender, "payload": payload})


def on_connected(sender: Any, reconnect: bool, gap: bool, **extra: Any) -> None:
    emit({"connected": reconnect, "gap": gap})


class Leads(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if "leads slot" in record.getMessage():
            emit({"leads": os.getpid()})


def main() -> None:
    url, table = sys.argv[1], sys.argv[2]
    app = Flask(__name__)
    app.config["DBNOTIFY_DATABASE_URI"] = url
    app.config["DBNOTIFY_AUTOSTART"] = False
    app.config["DBNOTIFY_CHECK_TRIGGERS"] = False
    app.config.update(arg.split("=", 1) for arg in sys.argv[3:])
    leader_log = logging.getLogger("flask_dbnotify.backends.postgresql.wal.leader")
    leader_log.setLevel(logging.INFO)
    leader_log.addHandler(Leads())
    dbnotify = DBNotify(app)
    dbnotify.watch(table, durable=True)
    row_changed.connect(on_row)
    notification_received.connect(on_message)
    listener_connected.connect(on_connected)
    dbnotify.start(app)
    emit({"ready": True})
    sys.stdin.read()
    dbnotify.close(app)


if __name__ == "__main__":
    main()
