"""Database backends, one package each, chosen by the database URL's scheme.

Every backend implements the interfaces of :mod:`.base`: the extension
talks to a :class:`Backend`, the listener to a :class:`Feed` and its
:class:`Stream`, the once runner to an :class:`OnceStore`.
"""

from __future__ import annotations

from typing import Any

from .base import DEAF, Backend, Claimable, Feed, OnceStore, Status, Stream
from .common import execute_on, parse_url, reason, where

__all__ = [
    "DEAF",
    "Backend",
    "Claimable",
    "Feed",
    "OnceStore",
    "Status",
    "Stream",
    "backend_for",
    "execute_on",
    "parse_url",
    "reason",
    "where",
]


def _need_pymysql() -> None:
    """MySQL's listener runs on PyMySQL: say how to get it."""
    try:
        import pymysql  # noqa: F401
    except ImportError:
        raise ValueError(
            "MySQL and MariaDB need PyMySQL: pip install 'Flask-DBNotify[mysql]'"
        ) from None


def backend_for(settings: Any, root: str) -> Backend:
    """Return the backend for the app's settings (its database URL first);
    ``root`` anchors relative SQLite paths (the app's instance folder)."""
    url = parse_url(settings.database_uri)
    name = url.get_backend_name()
    if name == "postgresql":
        if settings.capture == "binlog":
            raise ValueError("DBNOTIFY_CAPTURE = 'binlog' needs MariaDB; PostgreSQL has 'wal'")
        if settings.capture == "wal":
            from .postgresql.wal import WalBackend

            return WalBackend.from_url(url, settings.listen_uri, settings.schema, settings.slot)
        from .postgresql import PostgreSQLBackend

        return PostgreSQLBackend.from_url(url, settings.listen_uri, settings.schema)
    if name in ("mysql", "mariadb"):
        _need_pymysql()
        if settings.capture == "wal":
            raise ValueError("DBNOTIFY_CAPTURE = 'wal' needs PostgreSQL; MariaDB has 'binlog'")
        if settings.capture == "binlog":
            from .mysql.binlog import MySQLBinlogBackend

            return MySQLBinlogBackend.from_url(url, settings.connect_timeout)
        from .mysql import MySQLBackend

        return MySQLBackend.from_url(url, settings.connect_timeout)
    if settings.capture != "triggers":
        raise ValueError(
            f"DBNOTIFY_CAPTURE = {settings.capture!r} needs PostgreSQL or MariaDB; "
            "SQLite journals every change with triggers"
        )
    if name == "sqlite":
        from .sqlite import SQLiteBackend

        return SQLiteBackend.from_url(url, root)
    raise ValueError(
        f"unsupported database URL {url.render_as_string()!r}: Flask-DBNotify works "
        "with postgresql://, mysql+pymysql:// (MySQL, MariaDB) and sqlite:/// URLs"
    )
