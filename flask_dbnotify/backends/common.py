"""What the backends share: error and address wording, URL parsing,
running a statement on the caller's connection, trigger naming, and the
parts of ``status`` that do not depend on the database."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from .._context import sqlalchemy_connection
from .._watch import Watch
from ..errors import WatchError
from ..events import Operation

OP_CODE = {
    Operation.INSERT: "i",
    Operation.UPDATE: "u",
    Operation.DELETE: "d",
    Operation.TRUNCATE: "t",
}


def execute_on(connection: Any, statement: str, params: dict[str, Any]) -> None:
    """Run ``statement`` on a SQLAlchemy Connection or Session, or on a
    DB-API connection, inside its current transaction."""
    conn = sqlalchemy_connection(connection)
    if conn is not None:
        conn.exec_driver_sql(statement, params)
    elif hasattr(connection, "cursor"):
        cur = connection.cursor()
        try:
            cur.execute(statement, params)
        finally:
            cur.close()
    else:
        raise TypeError(
            "connection must be a SQLAlchemy Connection or Session, or a DB-API "
            f"connection, not {type(connection).__name__}"
        )


_CONNECT_PREFIX = re.compile(r"^connection to server (?:at|on) .*? failed: |^(?:FATAL|ERROR): +")


def reason(exc: BaseException) -> str:
    """A database error in one line: the server's message (with its detail
    and hint), without the address psycopg2 prefixes (callers name it)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    diag = getattr(exc, "diag", None)
    if diag is not None and diag.message_primary:
        extra = [d for d in (diag.message_detail, diag.message_hint) if d]
        text = str(diag.message_primary) + "".join(f" ({d})" for d in extra)
        return text.replace("\n", " ")
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    line = lines[0]
    while (shorter := _CONNECT_PREFIX.sub("", line)) != line:
        line = shorter
    return line.strip()


def where(uri: str) -> str:
    """Where ``uri`` points, for people: ``PostgreSQL at HOST:PORT (database
    D, user U)`` or ``SQLite file PATH``; never the password. Host and port
    come from the URL, its query, else ``PGHOST``/``PGPORT``, as libpq
    takes them."""
    url = sa.make_url(uri)
    if url.get_backend_name() == "sqlite":
        return f"SQLite file {url.database or '(none)'}"
    if url.get_backend_name() in ("mysql", "mariadb"):
        return _mysql_where(url)

    def setting(value: Any, query: str, env: str) -> str | None:
        # The query overrides the URL's own part, as it does when we connect.
        value = url.query.get(query) or value or os.environ.get(env)
        if value is None or isinstance(value, str | int):
            return None if value is None else str(value)
        return ",".join(value)

    host = setting(url.host, "host", "PGHOST")
    port = setting(url.port, "port", "PGPORT") or "5432"
    found = [f"database {url.database}"] if url.database else []
    found += [f"user {url.username}"] if url.username else []
    if host is None:
        return "PostgreSQL on the local socket (" + ", ".join([f"port {port}", *found]) + ")"
    return f"PostgreSQL at {host}:{port}" + (f" ({', '.join(found)})" if found else "")


def _mysql_where(url: sa.URL) -> str:
    """``MySQL at HOST:PORT (database D, user U)``."""
    found = [f"database {url.database}"] if url.database else []
    found += [f"user {url.username}"] if url.username else []
    socket = url.query.get("unix_socket")
    place = f"on socket {socket}" if socket else f"at {url.host or 'localhost'}:{url.port or 3306}"
    return f"MySQL {place}" + (f" ({', '.join(found)})" if found else "")


_PASSWORD = re.compile(r"(^|://)([^:/@]*):[^/]*@")


def parse_url(uri: str) -> sa.URL:
    """``uri`` as a URL, or a ValueError that does not show its password."""
    try:
        return sa.make_url(uri)
    except (sa.exc.ArgumentError, ValueError) as exc:
        shown = _PASSWORD.sub(r"\1\2:***@", uri)
        raise ValueError(f"cannot read database URL {shown!r}: {exc}") from None


# -- naming ------------------------------------------------------------------


def digest(parts: Sequence[Any]) -> str:
    """A short hash of everything a watch's triggers do (as JSON): part of
    their names, so that a trigger made from other SQL has another name."""
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()[:10]


def trigger_name(table: str, op: Operation, hashed: str, suffix: str = "") -> str:
    """``dbnotify_<table>_<op>_<hash><suffix>``: ours by its prefix, the
    table recognisable, within PostgreSQL's 63 bytes."""
    slug = re.sub(r"[^a-z0-9]+", "_", table.lower()).strip("_")[:36] or "t"
    return f"dbnotify_{slug}_{OP_CODE[op]}_{hashed}{suffix}"


def check_table(name: str, watch: Watch, columns: Sequence[str], pk: Sequence[str]) -> None:
    """Raise WatchError when ``watch`` names a column the table ``name``
    lacks, or the table has no primary key."""
    for col in (watch.columns or ()) + (watch.when_changed or ()):
        if col not in columns:
            raise WatchError(
                f"table {name!r} has no column {col!r} (columns: {', '.join(columns)})"
            )
    if not pk:
        raise WatchError(
            f"table {name!r} has no primary key: events are identified by it, so add one"
        )


# -- status ------------------------------------------------------------------

#: What a backend says of one watch: the triggers present and wanted (any
#: hashable form), and problems worth a line when some are present.
Inspection = tuple[set[Any], set[Any], list[str]]


def compare_watches(
    status: Any, watches: Iterable[Watch], inspect: Callable[[Watch], Inspection]
) -> None:
    """Fill ``status.watches`` (and details) from ``inspect(watch)``; a
    watch that does not match the database is an error, with the reason."""
    for watch in watches:
        try:
            present, wanted, problems = inspect(watch)
        except WatchError as exc:
            status.error(watch.name, exc)
            continue
        status.compare(watch.name, present, wanted)
        if problems:
            status.details[watch.name] = "; ".join(problems)


def once_health_queries(claims: str, receivers: str) -> tuple[str, str]:
    """Two queries over the claims and receivers tables (quoted names): each
    receiver's backlog, and the last failures. Plain SQL both dialects run."""
    counts = "(SELECT {what} FROM {claims} c WHERE c.receiver = r.receiver AND c.state {cond})"
    backlog = (
        "SELECT r.receiver, "
        + ", ".join(
            counts.format(what=what, claims=claims, cond=cond)
            for what, cond in (
                ("count(*)", "IN ('running', 'retry')"),
                ("min(event_id)", "IN ('running', 'retry')"),
                ("count(*)", "= 'failed'"),
            )
        )
        + f" FROM {receivers} r ORDER BY r.receiver"
    )
    failures = (
        f"SELECT receiver, event_id, attempts, last_error FROM {claims} "
        "WHERE state = 'failed' ORDER BY event_id DESC LIMIT 10"
    )
    return backlog, failures


def add_once_health(
    health: dict[str, str], backlog: Iterable[Any], failures: Iterable[Any]
) -> None:
    """Report the rows of :func:`once_health_queries` in ``health``."""
    for receiver, pending, oldest, failed in backlog:
        line = f"{pending} in progress or to retry"
        if oldest is not None:
            line += f" (oldest event {oldest})"
        health[f"once {receiver}"] = line + f", {failed} failed"
    for receiver, event_id, attempts, error in failures:
        health[f"failed {receiver} #{event_id}"] = f"after {attempts} attempts: {error}"
