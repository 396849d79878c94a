"""A small Flask app that listens to a SQLite database in its own process.

Usage: ``python -m tests.sqlite_writers.listen_app PATH TABLE``. Watches
TABLE, prints ``{"ready": true}`` once ``start()`` has returned, then one JSON
line per row event or message, and stops and exits at the end of stdin.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from flask import Flask

from flask_dbnotify import ChangeEvent, DBNotify, notification_received, row_changed


def emit(obj: dict[str, Any]) -> None:
    # One write(2) per line, so lines never interleave.
    os.write(1, (json.dumps(obj, ensure_ascii=False) + "\n").encode())


def on_row(sender: str, event: ChangeEvent, **extra: Any) -> None:
    emit(
        {
            "table": event.table,
            "op": event.op.value,
            "pk": event.pk,
            "new": event.new,
            "old": event.old,
            "id": event.id,
        }
    )


def on_message(sender: str, payload: Any, **extra: Any) -> None:
    emit({"channel": sender, "payload": payload})


def main() -> None:
    path, table = sys.argv[1], sys.argv[2]
    app = Flask(__name__)
    app.config["DBNOTIFY_DATABASE_URI"] = "sqlite:///" + path
    app.config["DBNOTIFY_AUTOSTART"] = False
    dbnotify = DBNotify(app)
    dbnotify.watch(table)
    row_changed.connect(on_row)
    notification_received.connect(on_message)
    dbnotify.start(app)
    emit({"ready": True})
    sys.stdin.read()
    dbnotify.close(app)


if __name__ == "__main__":
    main()
