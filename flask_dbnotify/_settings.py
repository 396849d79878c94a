"""Configuration keys, their defaults, and how they are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Flask
from sqlalchemy.engine import URL

DEFAULTS: dict[str, Any] = {
    "DBNOTIFY_DATABASE_URI": None,
    "DBNOTIFY_LISTEN_URI": None,
    "DBNOTIFY_AUTOSTART": True,
    "DBNOTIFY_SCHEMA": "public",
    "DBNOTIFY_CHECK_TRIGGERS": True,
    "DBNOTIFY_CONNECT_TIMEOUT": 5.0,
    "DBNOTIFY_RECONNECT_MAX_DELAY": 5.0,
    "DBNOTIFY_PROBE_INTERVAL": 10.0,
    "DBNOTIFY_KEEPALIVE_IDLE": 10,
    "DBNOTIFY_PAYLOAD_RETENTION": 3600.0,
    "DBNOTIFY_POLL_INTERVAL": 0.05,
    "DBNOTIFY_QUEUE_SIZE": 10000,
    "DBNOTIFY_ONCE_ATTEMPTS": 5,
    "DBNOTIFY_ONCE_RETRY_DELAY": 1.0,
    "DBNOTIFY_ONCE_LEASE": 300.0,
    "DBNOTIFY_FAST_MESSAGES": True,
}


@dataclass(frozen=True)
class Settings:
    """The ``DBNOTIFY_*`` keys of one app, read once by ``init_app``."""

    database_uri: str
    listen_uri: str
    autostart: bool
    schema: str
    check_triggers: bool
    connect_timeout: float
    reconnect_max_delay: float
    probe_interval: float
    keepalive_idle: int
    payload_retention: float
    poll_interval: float
    queue_size: int
    once_attempts: int
    once_retry_delay: float
    once_lease: float
    fast_messages: bool = True

    @classmethod
    def from_app(cls, app: Flask) -> Settings:
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        config = app.config
        uri = config["DBNOTIFY_DATABASE_URI"] or config.get("SQLALCHEMY_DATABASE_URI")
        if not uri:
            raise RuntimeError(
                "Flask-DBNotify needs a database: set DBNOTIFY_DATABASE_URI "
                "(or SQLALCHEMY_DATABASE_URI) before calling init_app()"
            )
        if isinstance(uri, URL):
            uri = uri.render_as_string(hide_password=False)
        listen_uri = config["DBNOTIFY_LISTEN_URI"]
        if isinstance(listen_uri, URL):
            listen_uri = listen_uri.render_as_string(hide_password=False)
        for key in (
            "DBNOTIFY_CONNECT_TIMEOUT",
            "DBNOTIFY_RECONNECT_MAX_DELAY",
            "DBNOTIFY_PROBE_INTERVAL",
            "DBNOTIFY_KEEPALIVE_IDLE",
            "DBNOTIFY_PAYLOAD_RETENTION",
            "DBNOTIFY_POLL_INTERVAL",
            "DBNOTIFY_ONCE_RETRY_DELAY",
            "DBNOTIFY_ONCE_LEASE",
        ):
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{key} must be a positive number of seconds, not {value!r}")
        for key in ("DBNOTIFY_QUEUE_SIZE", "DBNOTIFY_ONCE_ATTEMPTS"):
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, not {value!r}")
        schema = config["DBNOTIFY_SCHEMA"]
        if not isinstance(schema, str) or not schema:
            raise ValueError(f"DBNOTIFY_SCHEMA must be a schema name, not {schema!r}")
        return cls(
            database_uri=uri,
            listen_uri=str(listen_uri or uri),
            autostart=bool(config["DBNOTIFY_AUTOSTART"]),
            schema=schema,
            check_triggers=bool(config["DBNOTIFY_CHECK_TRIGGERS"]),
            connect_timeout=float(config["DBNOTIFY_CONNECT_TIMEOUT"]),
            reconnect_max_delay=float(config["DBNOTIFY_RECONNECT_MAX_DELAY"]),
            probe_interval=float(config["DBNOTIFY_PROBE_INTERVAL"]),
            keepalive_idle=max(1, int(config["DBNOTIFY_KEEPALIVE_IDLE"])),
            payload_retention=float(config["DBNOTIFY_PAYLOAD_RETENTION"]),
            poll_interval=float(config["DBNOTIFY_POLL_INTERVAL"]),
            queue_size=config["DBNOTIFY_QUEUE_SIZE"],
            once_attempts=config["DBNOTIFY_ONCE_ATTEMPTS"],
            once_retry_delay=float(config["DBNOTIFY_ONCE_RETRY_DELAY"]),
            once_lease=float(config["DBNOTIFY_ONCE_LEASE"]),
            fast_messages=bool(config["DBNOTIFY_FAST_MESSAGES"]),
        )
