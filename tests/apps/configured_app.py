"""An app configured from the environment, for tests of what the ``flask``
command says about mistakes: ``$CONFIGURED_URL`` is the database URL (none
if unset), ``$CONFIGURED_TABLE`` the watched table."""

from __future__ import annotations

import os

from flask import Flask

from flask_dbnotify import DBNotify

app = Flask(__name__)
if "CONFIGURED_URL" in os.environ:
    app.config["DBNOTIFY_DATABASE_URI"] = os.environ["CONFIGURED_URL"]
dbnotify = DBNotify(app)
dbnotify.watch(os.environ["CONFIGURED_TABLE"])
