"""An app configured only by ``FLASK_*`` environment variables, read with
``app.config.from_prefixed_env()``."""

from __future__ import annotations

from flask import Flask

from flask_dbnotify import DBNotify

app = Flask(__name__)
app.config.from_prefixed_env()
dbnotify = DBNotify(app)
