"""An app with exactly-once receivers on ``orders``, for tests that run it
in several processes at once.

Tests import :func:`build` to install triggers (which registers the once
receivers under the same qualified names the children use); a child runs
``python -c "from tests.apps.once_app import main; main()" URL RECEIVERS CONFIG``
(imported, not ``-m``, so the receivers are named ``tests.apps.once_app.*``
in every process). RECEIVERS is a comma-separated list of:

``plain``         an ordinary ``on("orders")`` receiver (registered first, so
                  the implicit watch it makes is turned durable by the rest);
``record``        ``on("orders", once=True)``; by the row's ``item``:
                  ``flaky:N`` raises on the first N attempts, ``poison``
                  always raises, ``block`` blocks for ever where
                  ``$ONCE_APP_VICTIM`` is set;
``keepers``       ``on("orders", where={"item": "keep"}, once=True)``;
``inserts_only``  ``on("orders", "insert", once=True)``;
``counter``       a callable object, ``on("orders", once=True)``;
``signal``        a ``row_changed`` receiver (blinker).

CONFIG is a JSON object of extra ``app.config`` keys; ``"durable_watch":
true`` in it calls ``watch("orders", durable=True)`` first. The child prints
one JSON object per line (one write(2) each, so lines never interleave):
``{"ready": true}`` once listening, then ``{"r": RECEIVER, "id": ..., "op":
..., "pk": ..., "item": ..., "pid": ..., "t": ...}`` per handled event,
``"r": "attempt"`` lines when ``record`` starts on a special item, and
``{"failed": NAME, "id": ..., "error": ...}`` per ``receiver_failed``. It
stops and exits 0 at the end of stdin.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from flask import Flask

from flask_dbnotify import ChangeEvent, DBNotify, receiver_failed, row_changed

_attempts: dict[int, int] = {}


def emit(obj: dict[str, Any]) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


def _line(receiver: str, event: ChangeEvent, **extra: Any) -> dict[str, Any]:
    row = event.new if event.new is not None else event.old
    return {
        "r": receiver,
        "id": event.id,
        "op": event.op.value,
        "pk": event.pk,
        "item": None if row is None else row.get("item"),
        "pid": os.getpid(),
        "t": time.time(),
        **extra,
    }


def plain(event: ChangeEvent) -> None:
    emit(_line("plain", event))


def record(event: ChangeEvent) -> None:
    item = str((event.new or event.old or {}).get("item"))
    assert event.id is not None
    if item.startswith(("flaky:", "poison", "block")):
        attempt = _attempts[event.id] = _attempts.get(event.id, 0) + 1
        emit(_line("attempt", event, attempt=attempt))
        if item.startswith("flaky:") and attempt <= int(item.split(":")[1]):
            raise RuntimeError(f"flaky attempt {attempt}")
        if item == "poison":
            raise RuntimeError(f"poison attempt {attempt}")
        if item == "block" and os.environ.get("ONCE_APP_VICTIM"):
            threading.Event().wait()
    emit(_line("record", event))


def keepers(event: ChangeEvent) -> None:
    emit(_line("keepers", event))


def inserts_only(event: ChangeEvent) -> None:
    emit(_line("inserts_only", event))


class Counter:
    """A callable object as a once receiver."""

    def __call__(self, event: ChangeEvent) -> None:
        emit(_line("counter", event))


def on_row(sender: str, event: ChangeEvent, **extra: Any) -> None:
    emit(_line("signal", event))


def on_failed(sender: Any, receiver: Any, event: Any, error: BaseException, **extra: Any) -> None:
    name = getattr(receiver, "__name__", type(receiver).__name__)
    emit({"failed": name, "id": getattr(event, "id", None), "error": str(error)})


def build(url: str, receivers: Iterable[str], **config: Any) -> tuple[Flask, DBNotify]:
    """The app, with autostart off; ``receivers`` as in the module docstring."""
    wanted = list(receivers)
    app = Flask("once_app")
    app.config["DBNOTIFY_DATABASE_URI"] = url
    app.config["DBNOTIFY_AUTOSTART"] = False
    app.config["DBNOTIFY_CHECK_TRIGGERS"] = False
    durable_watch = bool(config.pop("durable_watch", False))
    app.config.update(config)
    ext = DBNotify(app)
    if durable_watch:
        ext.watch("orders", durable=True)
    if "plain" in wanted:
        ext.on("orders")(plain)
    if "record" in wanted:
        ext.on("orders", once=True)(record)
    if "keepers" in wanted:
        ext.on("orders", where={"item": "keep"}, once=True)(keepers)
    if "inserts_only" in wanted:
        ext.on("orders", "insert", once=True)(inserts_only)
    if "counter" in wanted:
        ext.on("orders", once=True)(Counter())
    return app, ext


def main() -> None:
    url, names, config = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3])
    app, ext = build(url, names, **config)
    if "signal" in names:
        row_changed.connect(on_row)
    receiver_failed.connect(on_failed)
    ext.start(app)
    emit({"ready": True, "pid": os.getpid()})
    sys.stdin.read()
    ext.close(app)
