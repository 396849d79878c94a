"""Database backends, one package each, chosen by the database URL's scheme.

Every backend implements the interfaces of :mod:`.base`: the extension
talks to a :class:`Backend`, the listener to a :class:`Feed` and its
:class:`Stream`, the once runner to an :class:`OnceStore`.
"""

from __future__ import annotations

from .base import DEAF, Backend, Feed, OnceStore, Status, Stream
from .common import execute_on, parse_url, reason, where

__all__ = [
    "DEAF",
    "Backend",
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


def backend_for(uri: str, listen_uri: str | None, schema: str, root: str) -> Backend:
    """Return the backend for a database URL; ``root`` anchors relative
    SQLite paths (the app's instance folder)."""
    url = parse_url(uri)
    name = url.get_backend_name()
    if name == "postgresql":
        from .postgresql import PostgreSQLBackend

        return PostgreSQLBackend.from_url(url, listen_uri, schema)
    if name == "sqlite":
        from .sqlite import SQLiteBackend

        return SQLiteBackend.from_url(url, root)
    raise ValueError(
        f"unsupported database URL {url.render_as_string()!r}: "
        "Flask-DBNotify works with postgresql:// and sqlite:/// URLs"
    )
