"""A script that listens, hands a row event to a receiver, and lets the
interpreter exit: ``python -m tests.apps.exit_app MODE``.

MODE ``returns``: the main thread ends after the receiver has returned.
MODE ``stuck``: the main thread ends while the receiver is still running (it
never returns). The database URL comes from ``$DBNOTIFY_TEST_APP_DATABASE_URL``;
autostart is on, as in any script that creates the app. Progress goes to
stdout, one line per step: ``listening``, ``received PK``, ``exiting``.
"""

from __future__ import annotations

import os
import sys
import threading

from flask import Flask

from flask_dbnotify import ChangeEvent, DBNotify

MODE = sys.argv[1] if len(sys.argv) > 1 else "returns"
if MODE not in ("returns", "stuck"):
    sys.exit(f"unknown mode {MODE!r}")


def say(text: str) -> None:
    os.write(1, f"{text}\n".encode())


app = Flask("exit_app")
app.config["DBNOTIFY_DATABASE_URI"] = os.environ["DBNOTIFY_TEST_APP_DATABASE_URL"]
app.config["DBNOTIFY_CHECK_TRIGGERS"] = False
dbnotify = DBNotify(app)
received = threading.Event()
returned = threading.Event()


@dbnotify.on("orders")
def receive(event: ChangeEvent) -> None:
    say(f"received {event.pk}")
    received.set()
    if MODE == "stuck":
        threading.Event().wait()
    returned.set()


if not dbnotify.listener_state().connected:
    say("not connected")
    sys.exit(2)
say("listening")
if not (returned if MODE == "returns" else received).wait(30):
    say("no event")
    sys.exit(3)
say("exiting")
