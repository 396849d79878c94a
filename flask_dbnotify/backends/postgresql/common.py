"""Names, limits and quoting that every part of the PostgreSQL backend
agrees on (the triggers' SQL, the stream, the admin tasks)."""

from __future__ import annotations

import re
from collections.abc import Sequence

#: The channel every trigger and ``notify()`` sends on.
CHANNEL = "dbnotify"
#: application_name of listener sessions, as pg_stat_activity shows them.
LISTENER_NAME = "flask-dbnotify listener"
#: application_name of the session a listener reads the journal with.
READER_NAME = "flask-dbnotify reader"
#: application_name of the session ``status`` opens to check the listener's URL.
CHECK_NAME = "flask-dbnotify check"
#: What identifies a database, as the server says it (not as a URL or a
#: pooler's alias names it): the same in two sessions if and only if both
#: are in the same database of the same running server.
IDENTITY = "current_database(), pg_postmaster_start_time()"
#: Bumped whenever the generated SQL changes shape; part of every hash.
DDL_VERSION = 6
#: PostgreSQL rejects a NOTIFY payload of 8000 bytes or more.
NOTIFY_LIMIT = 8000
#: A row whose JSON (for an UPDATE, new and old together) is longer than
#: this is delivered cut: its primary key only, with ``event.cut`` set.
MAX_ROW_BYTES = 16 * 1024 * 1024
#: Bytes of a long message per notification, when it is sent in pieces.
PIECE_BYTES = 7900
#: The longest message a listener puts together from pieces.
MAX_MESSAGE_BYTES = MAX_ROW_BYTES + 64 * 1024
#: Comments on our functions and tables start with this.
MARKER = "flask-dbnotify"
#: The advisory lock that serialises installs ("dbnt"): install-triggers
#: and migrations take it for their transaction.
INSTALL_LOCK = 0x64626E74


def check_channel(token: str) -> str:
    """The channel of one session's hearing checks."""
    return f"{CHANNEL}_check_{token}"


def identity_text(identity: Sequence[object]) -> str:
    """``(database, server start)`` (see :data:`IDENTITY`) for people."""
    database, started = identity
    return f"database {database!r} of the server started at {started:%Y-%m-%d %H:%M:%S.%f%z}"


# -- quoting ------------------------------------------------------------------
#
# The DDL is rendered without a connection. A name or value holding what
# SQLAlchemy's text() (which Alembic's op.execute() uses) would take for a
# bind parameter, ':name', is written in escape form (``U&"..."`` with ':'
# as \003A, ``E'...'`` with ':' as \x3a).

_BIND = re.compile(r"(?<![:\w\\]):\w")


def ident(*parts: str) -> str:
    """A quoted (possibly qualified) identifier."""
    out = []
    for part in parts:
        if _BIND.search(part):
            escaped = part.replace("\\", "\\\\").replace('"', '""').replace(":", "\\003A")
            out.append(f'U&"{escaped}"')
        else:
            out.append('"' + part.replace('"', '""') + '"')
    return ".".join(out)


def literal(value: str) -> str:
    """A string literal, right whatever standard_conforming_strings is in
    the session that runs it (triggers run in writers' sessions)."""
    if _BIND.search(value) or "\\" in value:
        escaped = value.replace("\\", "\\\\").replace("'", "''").replace(":", "\\x3a")
        return f"E'{escaped}'"
    return "'" + value.replace("'", "''") + "'"


def dollar_quoted(text: str) -> str:
    """A function body, dollar-quoted (readable in ``--sql`` output)."""
    return f"$dbnotify${text}$dbnotify$" if "$dbnotify$" not in text else literal(text)


def text_array(values: Sequence[str]) -> str:
    return "ARRAY[" + ", ".join(literal(v) for v in values) + "]::text[]"
