"""Configuration keys, their defaults, and how they are read."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from flask import Flask
from sqlalchemy.engine import URL

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
#: The ways changes are captured (``DBNOTIFY_CAPTURE``): "wal" on
#: PostgreSQL, "binlog" on MariaDB.
CAPTURES = ("triggers", "wal", "binlog")
SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")


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


def read_capture(key: str, value: Any) -> str:
    if value not in CAPTURES:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, CAPTURES))}, not {value!r}")
    return str(value)


def read_slot(key: str, value: Any) -> str | None:
    """A replication slot (and publication) name: PostgreSQL allows lower
    case letters, digits and underscores, at most 63 of them."""
    if value is None:
        return None
    if not isinstance(value, str) or not SLOT_NAME.fullmatch(value):
        raise ValueError(
            f"{key} must be a name of 1 to 63 lower case letters, digits and "
            f"underscores, not {value!r}"
        )
    return value


def default_slot(app_name: str) -> str:
    """``dbnotify_<app name>``, made a valid slot name."""
    slug = re.sub(r"[^a-z0-9_]+", "_", app_name.lower()).strip("_") or "app"
    return f"dbnotify_{slug}"[:63]


def read_schema(key: str, value: Any) -> str:
    # Our statements name the schema's tables next to psycopg2 parameters,
    # where "%" would be read as one: refused rather than misread.
    if not isinstance(value, str) or not value or "%" in value:
        raise ValueError(
            f"{key} must be a schema name (a non-empty string, without %), not {value!r}"
        )
    return value


Reader = Callable[[str, Any], Any]


def whole(minimum: int, maximum: int | None, unit: str = "") -> Reader:
    """A reader of whole numbers from ``minimum`` to ``maximum``."""
    return lambda key, value: read_int(key, value, minimum, maximum, unit)


def setting(key: str, default: Any, read: Reader) -> Any:
    """A field of :class:`Settings`: read from the config ``key`` with
    ``read(key, value)``, ``default`` when the app does not set it."""
    return field(metadata={"key": key, "default": default, "read": read})


@dataclass(frozen=True)
class Settings:
    """The ``DBNOTIFY_*`` keys of one app, read once by ``init_app``."""

    #: Else ``SQLALCHEMY_DATABASE_URI``; one of the two is needed.
    database_uri: str = setting("DBNOTIFY_DATABASE_URI", None, read_uri)
    #: Else ``database_uri``.
    listen_uri: str = setting("DBNOTIFY_LISTEN_URI", None, read_uri)
    autostart: bool = setting("DBNOTIFY_AUTOSTART", True, read_bool)
    schema: str = setting("DBNOTIFY_SCHEMA", "public", read_schema)
    check_triggers: bool = setting("DBNOTIFY_CHECK_TRIGGERS", True, read_bool)
    connect_timeout: float = setting("DBNOTIFY_CONNECT_TIMEOUT", 5.0, read_seconds)
    reconnect_max_delay: float = setting("DBNOTIFY_RECONNECT_MAX_DELAY", 5.0, read_seconds)
    probe_interval: float = setting("DBNOTIFY_PROBE_INTERVAL", 10.0, read_seconds)
    # libpq takes whole seconds: refuse a fraction rather than round it.
    keepalive_idle: int = setting(
        "DBNOTIFY_KEEPALIVE_IDLE", 10, whole(1, MAX_KEEPALIVE_IDLE, " of seconds")
    )
    payload_retention: float = setting("DBNOTIFY_PAYLOAD_RETENTION", 3600.0, read_seconds)
    poll_interval: float = setting("DBNOTIFY_POLL_INTERVAL", 0.05, read_seconds)
    queue_size: int = setting("DBNOTIFY_QUEUE_SIZE", 10000, whole(1, None))
    once_attempts: int = setting("DBNOTIFY_ONCE_ATTEMPTS", 5, whole(1, MAX_ONCE_ATTEMPTS))
    once_retry_delay: float = setting("DBNOTIFY_ONCE_RETRY_DELAY", 1.0, read_seconds)
    once_lease: float = setting("DBNOTIFY_ONCE_LEASE", 300.0, read_seconds)
    fast_messages: bool = setting("DBNOTIFY_FAST_MESSAGES", True, read_bool)
    #: How changes are captured on PostgreSQL: by triggers, or from the
    #: write-ahead log (a logical replication slot).
    capture: str = setting("DBNOTIFY_CAPTURE", "triggers", read_capture)
    #: The replication slot and publication of WAL capture; else
    #: ``dbnotify_<app name>``.
    slot: str = setting("DBNOTIFY_SLOT", None, read_slot)
    #: How often an idle stream (``DBNotify.stream``) sends a keep-alive comment.
    stream_keepalive: float = setting("DBNOTIFY_STREAM_KEEPALIVE", 15.0, read_seconds)
    #: Events and messages kept for streams: how far one may fall behind.
    stream_buffer: int = setting("DBNOTIFY_STREAM_BUFFER", 10000, whole(1, None))

    @classmethod
    def from_app(cls, app: Flask) -> Settings:
        """Read and check the app's ``DBNOTIFY_*`` keys, filling in the
        defaults. Raises ``RuntimeError`` when no database is configured
        and ``ValueError`` naming the key, the value and what is allowed
        for any value that is not right."""
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        config = app.config

        def read(name: str) -> Any:
            meta = _FIELDS[name].metadata
            return meta["read"](meta["key"], config[meta["key"]])

        uri = read("database_uri")
        if uri is None:
            uri = read_uri("SQLALCHEMY_DATABASE_URI", config.get("SQLALCHEMY_DATABASE_URI"))
        if uri is None:
            raise RuntimeError(
                "Flask-DBNotify needs a database: set DBNOTIFY_DATABASE_URI "
                "(or SQLALCHEMY_DATABASE_URI) before calling init_app()"
            )
        values = {name: read(name) for name in _FIELDS if name != "database_uri"}
        values["listen_uri"] = values["listen_uri"] or uri
        values["slot"] = values["slot"] or default_slot(app.name)
        return cls(database_uri=uri, **values)


_FIELDS = {f.name: f for f in fields(Settings)}
#: Each config key and its default.
DEFAULTS: dict[str, Any] = {f.metadata["key"]: f.metadata["default"] for f in _FIELDS.values()}
