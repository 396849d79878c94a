"""Exceptions for failures on the database side.

Misuse of the API raises built-in exceptions (``ValueError``, ``TypeError``,
``RuntimeError``) whose message says how to fix it.
"""

from __future__ import annotations


class DBNotifyError(Exception):
    """Base class of the errors Flask-DBNotify raises for database failures."""


class WatchError(DBNotifyError, LookupError):
    """A watch does not match the database: unknown table or column, or a
    table without a primary key."""


#: What to do about a watched table that does not exist.
TABLE_MISSING_TODO = "create it first (run your migrations), or fix the name given to watch()"


class ListenerError(DBNotifyError):
    """The listener could not connect or listen."""
