"""Configuration keys, their defaults, and how they are read."""

from __future__ import annotations

import math
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

#: The strings a boolean setting accepts (compared in lower case), as an
#: environment variable would give them.
BOOL_STRINGS = {
    "true": True,
    "false": False,
    "1": True,
    "0": False,
    "yes": True,
    "no": False,
    "on": True,
    "off": False,
}

#: The longest duration in seconds: libpq reads ``connect_timeout`` as a C
#: int, and ``select()`` refuses much longer timeouts.
MAX_SECONDS = 2**31 - 1
#: Linux refuses a TCP keepalive idle time or interval above this.
MAX_KEEPALIVE_IDLE = 32767
#: Retry delays double at each attempt; past this many the arithmetic
#: overflows a float.
MAX_ONCE_ATTEMPTS = 1000

#: Durations in seconds, more than 0.
SECONDS = (
    "DBNOTIFY_CONNECT_TIMEOUT",
    "DBNOTIFY_RECONNECT_MAX_DELAY",
    "DBNOTIFY_PROBE_INTERVAL",
    "DBNOTIFY_PAYLOAD_RETENTION",
    "DBNOTIFY_POLL_INTERVAL",
    "DBNOTIFY_ONCE_RETRY_DELAY",
    "DBNOTIFY_ONCE_LEASE",
)
BOOLEANS = ("DBNOTIFY_AUTOSTART", "DBNOTIFY_CHECK_TRIGGERS", "DBNOTIFY_FAST_MESSAGES")


def read_bool(key: str, value: Any) -> bool:
    """``value`` as a bool: a bool, ``0`` or ``1``, or one of
    :data:`BOOL_STRINGS` in any case."""
    if isinstance(value, bool):
        return value
    # Flask's from_prefixed_env() decodes "0" and "1" as JSON integers.
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOL_STRINGS:
        return BOOL_STRINGS[value.strip().lower()]
    allowed = ", ".join(repr(word) for word in BOOL_STRINGS)
    raise ValueError(
        f"{key} must be true or false: a bool, 0 or 1, or one of the strings {allowed} "
        f"(in any case), not {value!r}"
    )


def _parse_number(value: Any) -> float | int | None:
    """An int or float from a number or a string holding one, else None."""
    if isinstance(value, bool):
        return None  # a bool is an int to Python, never a number here
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                continue
    return None


def _finite(number: float | int) -> bool:
    # An int is always finite; math.isfinite() cannot convert a huge one.
    return isinstance(number, int) or math.isfinite(number)


def read_seconds(key: str, value: Any) -> float:
    """``value`` as a finite duration in seconds, more than 0."""
    number = _parse_number(value)
    if number is None or not _finite(number) or not 0 < number <= MAX_SECONDS:
        raise ValueError(
            f"{key} must be a number of seconds greater than 0 and at most "
            f"{MAX_SECONDS} (a number, or a string such as '2.5'), not {value!r}"
        )
    return float(number)


def read_int(key: str, value: Any, minimum: int, maximum: int | None, unit: str = "") -> int:
    """``value`` as a whole number from ``minimum`` to ``maximum``; a float
    or a string is taken only if it holds a whole number."""
    number = _parse_number(value)
    if (
        number is None
        or not _finite(number)
        or number != int(number)
        or number < minimum
        or (maximum is not None and number > maximum)
    ):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
        raise ValueError(
            f"{key} must be a whole number{unit}, {bounds} (an integer, or a string "
            f"such as '30'), not {value!r}"
        )
    return int(number)


def read_uri(key: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, URL):
        return value.render_as_string(hide_password=False)
    if isinstance(value, str):
        return value
    raise ValueError(
        f"{key} must be a database URL, as a string or a sqlalchemy.engine.URL, not {value!r}"
    )


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
        """Read and check the app's ``DBNOTIFY_*`` keys, filling in the
        defaults. Raises ``RuntimeError`` when no database is configured
        and ``ValueError`` naming the key, the value and what is allowed
        for any value that is not right."""
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        config = app.config
        uri = read_uri("DBNOTIFY_DATABASE_URI", config["DBNOTIFY_DATABASE_URI"])
        if uri is None:
            uri = read_uri("SQLALCHEMY_DATABASE_URI", config.get("SQLALCHEMY_DATABASE_URI"))
        if uri is None:
            raise RuntimeError(
                "Flask-DBNotify needs a database: set DBNOTIFY_DATABASE_URI "
                "(or SQLALCHEMY_DATABASE_URI) before calling init_app()"
            )
        listen_uri = read_uri("DBNOTIFY_LISTEN_URI", config["DBNOTIFY_LISTEN_URI"])
        schema = config["DBNOTIFY_SCHEMA"]
        if not isinstance(schema, str) or not schema:
            raise ValueError(
                f"DBNOTIFY_SCHEMA must be a schema name (a non-empty string), not {schema!r}"
            )
        flags = {key: read_bool(key, config[key]) for key in BOOLEANS}
        seconds = {key: read_seconds(key, config[key]) for key in SECONDS}
        return cls(
            database_uri=uri,
            listen_uri=listen_uri or uri,
            autostart=flags["DBNOTIFY_AUTOSTART"],
            schema=schema,
            check_triggers=flags["DBNOTIFY_CHECK_TRIGGERS"],
            connect_timeout=seconds["DBNOTIFY_CONNECT_TIMEOUT"],
            reconnect_max_delay=seconds["DBNOTIFY_RECONNECT_MAX_DELAY"],
            probe_interval=seconds["DBNOTIFY_PROBE_INTERVAL"],
            # libpq takes whole seconds: refuse a fraction rather than round it.
            keepalive_idle=read_int(
                "DBNOTIFY_KEEPALIVE_IDLE",
                config["DBNOTIFY_KEEPALIVE_IDLE"],
                1,
                MAX_KEEPALIVE_IDLE,
                " of seconds",
            ),
            payload_retention=seconds["DBNOTIFY_PAYLOAD_RETENTION"],
            poll_interval=seconds["DBNOTIFY_POLL_INTERVAL"],
            queue_size=read_int("DBNOTIFY_QUEUE_SIZE", config["DBNOTIFY_QUEUE_SIZE"], 1, None),
            once_attempts=read_int(
                "DBNOTIFY_ONCE_ATTEMPTS", config["DBNOTIFY_ONCE_ATTEMPTS"], 1, MAX_ONCE_ATTEMPTS
            ),
            once_retry_delay=seconds["DBNOTIFY_ONCE_RETRY_DELAY"],
            once_lease=seconds["DBNOTIFY_ONCE_LEASE"],
            fast_messages=flags["DBNOTIFY_FAST_MESSAGES"],
        )
