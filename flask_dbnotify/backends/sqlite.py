"""SQLite: row triggers that append to a journal, and a polling listener.

SQLite has no NOTIFY, and Python's ``sqlite3`` no cross-process hook, so
each watched operation gets an ``AFTER ... FOR EACH ROW`` trigger that
appends the change to ``dbnotify_journal`` in the writer's transaction.
Writers are serialised, so journal ids follow commit order. The listener
reads past its cursor whenever ``PRAGMA data_version`` says another
connection committed; on Linux it sleeps on inotify and wakes the moment
the database or its WAL is written, so it is fast and idle at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import select
import socket
import sqlite3
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from .. import _payload
from .._watch import Watch
from ..errors import DBNotifyError, WatchError
from ..events import Operation
from . import Backend, Item, Status, Stream, execute_on
from ._inotify import open_watch

log = logging.getLogger(__name__)

DDL_VERSION = 1
_OP_CODE = {Operation.INSERT: "i", Operation.UPDATE: "u", Operation.DELETE: "d"}
#: Unix time with milliseconds, from SQLite's clock.
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
#: How long after a wake-up without news the stream keeps looking: a WAL
#: write wakes us just before the commit becomes visible.
_SETTLE = 0.05
_READ_LIMIT = 5000
_abandoned: list[sqlite3.Connection] = []


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _json_key(name: str, prefix: str = "", suffix: str = "") -> str:
    """A SQL literal holding ``name`` as a JSON string."""
    return quote_literal(prefix + json.dumps(name, ensure_ascii=False) + suffix)


def _json_value(ref: str) -> str:
    # json_quote() rejects BLOBs, and any column may hold one in SQLite.
    return f"json_quote(CASE WHEN typeof({ref}) = 'blob' THEN hex({ref}) ELSE {ref} END)"


class SQLiteBackend(Backend):
    """A journal table written by triggers, read by polling."""

    durable_by_nature = True

    def __init__(self, uri: str, path: str, engine: sa.Engine) -> None:
        super().__init__(uri, uri, "main", engine)
        self.path = path
        self.position: int | None = None
        self.listener_name = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"

    @classmethod
    def from_url(cls, url: sa.URL, root: str) -> SQLiteBackend:
        database = url.database or ""
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
            raise ValueError(
                "an in-memory SQLite database cannot be shared with a listener: "
                "use a file, e.g. sqlite:///app.db"
            )
        if database.startswith("file:"):
            raise ValueError("use a plain sqlite:///path URL, not a file: URI")
        # Relative paths are relative to the instance folder, as in
        # Flask-SQLAlchemy, so both name the same file.
        path = os.path.abspath(os.path.join(root, database))
        url = url.set(drivername="sqlite", database=path)
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _on_connect)
        return cls(url.render_as_string(hide_password=False), path, engine)

    # -- catalog -----------------------------------------------------------

    def _resolve(self, conn: sqlite3.Connection, watch: Watch) -> tuple[str, list[str], list[str]]:
        """``(table, columns, primary key)`` as the database has them."""
        if watch.schema not in (None, "main"):
            raise WatchError(
                f"{watch.name!r}: only tables of the main database can be watched in SQLite"
            )
        row = conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name = ? COLLATE NOCASE",
            (watch.table,),
        ).fetchone()
        if row is None:
            raise WatchError(f"table {watch.table!r} does not exist")
        table = row[0]
        info = conn.execute("SELECT name, pk FROM pragma_table_info(?)", (table,)).fetchall()
        columns = [name for name, _ in info]
        pk = [name for name, position in sorted(info, key=lambda r: r[1]) if position]
        for col in (watch.columns or ()) + (watch.when_changed or ()):
            if col not in columns:
                raise WatchError(
                    f"table {watch.table!r} has no column {col!r} (columns: {', '.join(columns)})"
                )
        if not pk:
            raise WatchError(
                f"table {watch.table!r} has no primary key: events are identified by it, so add one"
            )
        return table, columns, pk

    def _connect(self) -> sqlite3.Connection:
        return _connect(self.path)

    def _our_triggers(self, conn: sqlite3.Connection) -> list[tuple[str, str]]:
        return conn.execute(
            "SELECT name, tbl_name FROM sqlite_schema WHERE type = 'trigger' "
            "AND substr(name, 1, 9) = 'dbnotify_' ORDER BY tbl_name, name"
        ).fetchall()

    # -- DDL ----------------------------------------------------------------

    def _row_json(self, ref: str, columns: list[str], keep: set[str] | None) -> str:
        parts = [
            _json_key(c, suffix=": ") + " || " + _json_value(f"{ref}.{quote_ident(c)}")
            for c in columns
            if keep is None or c in keep
        ]
        return "'{' || " + " || ', ' || ".join(parts) + " || '}'"

    def _trigger_sql(
        self, watch: Watch, table: str, columns: list[str], pk: list[str], op: Operation
    ) -> str:
        keep = None if watch.columns is None else set(watch.columns) | set(pk)
        head = (
            json.dumps(
                {"v": _payload.VERSION, "t": watch.name, "o": op.value[0], "k": pk},
                ensure_ascii=False,
                separators=(",", ": "),
            )[:-1]
            + ',"ts": '
        )
        when = ""
        if op is Operation.INSERT:
            row = self._row_json("NEW", columns, keep)
        elif op is Operation.DELETE:
            row = self._row_json("OLD", columns, keep)
        else:
            tests = {c: f"NEW.{quote_ident(c)} IS NOT OLD.{quote_ident(c)}" for c in columns}
            when = " OR ".join(tests[c] for c in (watch.when_changed or columns))
            when = f" WHEN {when}"
            changed = " || ".join(
                f"CASE WHEN {tests[c]} THEN {_json_key(c, ',')} ELSE '' END" for c in columns
            )
            row = (
                "'[' || "
                + self._row_json("NEW", columns, keep)
                + " || ', ' || "
                + self._row_json("OLD", columns, keep)
                + f" || ', [' || substr({changed}, 2) || ']]'"
            )
        return (
            f"AFTER {op.value} ON {quote_ident(table)} FOR EACH ROW{when} BEGIN "
            f"INSERT INTO dbnotify_journal (created_at, body) VALUES ({_NOW}, "
            f"{quote_literal(head)} || {_NOW} || ', \"r\": [' || {row} || ']}}'); END"
        )

    def _watch_triggers(self, conn: sqlite3.Connection, watch: Watch) -> tuple[str, dict[str, str]]:
        table, columns, pk = self._resolve(conn, watch)
        bodies = {op: self._trigger_sql(watch, table, columns, pk, op) for op in watch.operations}
        digest = hashlib.sha256(
            json.dumps([DDL_VERSION, [[op.value, b] for op, b in bodies.items()]]).encode()
        ).hexdigest()[:10]
        slug = re.sub(r"[^a-z0-9]+", "_", table.lower()).strip("_")[:36] or "t"
        return table, {
            f"dbnotify_{slug}_{_OP_CODE[op]}_{digest}": body for op, body in bodies.items()
        }

    def _shared_sql(self) -> list[str]:
        return [
            "CREATE TABLE IF NOT EXISTS dbnotify_journal ("
            "id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL, body TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS dbnotify_listeners ("
            "name TEXT PRIMARY KEY, position INTEGER NOT NULL, seen_at REAL NOT NULL)",
        ]

    def _install_sql(self, conn: sqlite3.Connection, watches: Sequence[Watch]) -> list[str]:
        statements = self._shared_sql()
        installed = self._our_triggers(conn)
        seen: dict[str, str] = {}
        for watch in watches:
            table, wanted = self._watch_triggers(conn, watch)
            if table.lower() in seen:
                raise WatchError(
                    f"{seen[table.lower()]!r} and {watch.name!r} are the same table: watch it once"
                )
            seen[table.lower()] = watch.name
            for name, tbl in installed:
                if tbl.lower() == table.lower() and name not in wanted:
                    statements.append(f"DROP TRIGGER IF EXISTS {quote_ident(name)}")
            for name, body in wanted.items():
                statements.append(f"CREATE TRIGGER IF NOT EXISTS {quote_ident(name)} {body}")
        return statements

    def _with_conn(self, work: Any) -> Any:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise DBNotifyError(f"cannot open {self.path}: {exc}") from exc
        try:
            return work(conn)
        except sqlite3.Error as exc:
            raise DBNotifyError(f"the database refused: {exc}") from exc
        finally:
            conn.close()

    def install_sql(self, watches: Sequence[Watch]) -> list[str]:
        return self._with_conn(lambda conn: self._install_sql(conn, watches))  # type: ignore[no-any-return]

    def install(self, watches: Sequence[Watch]) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in self._install_sql(conn, watches):
                    conn.execute(statement)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        self._with_conn(work)

    def execute_all(self, statements: Sequence[str]) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements:
                    conn.execute(statement)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        self._with_conn(work)

    def uninstall_sql(self, watches: Sequence[Watch], everything: bool) -> list[str]:
        def work(conn: sqlite3.Connection) -> list[str]:
            installed = self._our_triggers(conn)
            if everything:
                drops = [name for name, _ in installed]
            else:
                tables = set()
                for watch in watches:
                    tables.add(self._resolve(conn, watch)[0].lower())
                drops = [name for name, tbl in installed if tbl.lower() in tables]
            statements = [f"DROP TRIGGER IF EXISTS {quote_ident(n)}" for n in drops]
            if everything:
                statements += [
                    "DROP TABLE IF EXISTS dbnotify_journal",
                    "DROP TABLE IF EXISTS dbnotify_listeners",
                ]
            return statements

        return self._with_conn(work)  # type: ignore[no-any-return]

    def status(self, watches: Sequence[Watch]) -> Status:
        def work(conn: sqlite3.Connection) -> Status:
            status = Status()
            installed = self._our_triggers(conn)
            covered: set[str] = set()
            for watch in watches:
                try:
                    table, wanted = self._watch_triggers(conn, watch)
                except WatchError as exc:
                    status.watches[watch.name] = "error"
                    status.details[watch.name] = str(exc)
                    continue
                covered.add(table.lower())
                present = {n for n, tbl in installed if tbl.lower() == table.lower()}
                if present == set(wanted):
                    status.watches[watch.name] = "installed"
                elif present:
                    status.watches[watch.name] = "outdated"
                    status.details[watch.name] = (
                        "the database's triggers differ from what watch() describes"
                    )
                else:
                    status.watches[watch.name] = "missing"
            for name, tbl in installed:
                if tbl.lower() not in covered:
                    status.orphaned.append(f"trigger {name} on {tbl}")
            self._health(conn, status.health)
            return status

        return self._with_conn(work)  # type: ignore[no-any-return]

    def _health(self, conn: sqlite3.Connection, health: dict[str, str]) -> None:
        health["journal mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
        try:
            count, last, oldest = conn.execute(
                "SELECT count(*), max(id), min(created_at) FROM dbnotify_journal"
            ).fetchone()
            listeners = conn.execute(
                "SELECT name, position, seen_at FROM dbnotify_listeners ORDER BY name"
            ).fetchall()
        except sqlite3.OperationalError:
            return  # Not installed.
        health["journal"] = f"{count} rows, last id {last or 0}" + (
            f", oldest {_iso(oldest)}" if oldest else ""
        )
        health["listeners"] = str(len(listeners))
        for name, position, seen_at in listeners:
            health[f"listener {name}"] = f"read to id {position}, seen {_iso(seen_at)}"

    # -- journal housekeeping ------------------------------------------------

    def prune(self, retention: float) -> None:
        """Record how far this listener has read, then delete journal rows
        older than ``retention`` that every live listener has read."""
        now = time.time()

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if self.position is not None:
                    conn.execute(
                        "INSERT INTO dbnotify_listeners (name, position, seen_at) VALUES (?, ?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET position = excluded.position, "
                        "seen_at = excluded.seen_at",
                        (self.listener_name, self.position, now),
                    )
                # A listener silent for this long is gone.
                conn.execute(
                    "DELETE FROM dbnotify_listeners WHERE seen_at < ?",
                    (now - max(retention, 600.0),),
                )
                conn.execute(
                    "DELETE FROM dbnotify_journal WHERE created_at < ? AND id <= coalesce("
                    "(SELECT min(position) FROM dbnotify_listeners), "
                    "(SELECT max(id) FROM dbnotify_journal))",
                    (now - retention,),
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        self._with_conn(work)

    # -- messages ----------------------------------------------------------

    def notify(self, connection: Any, channel: str, payload: str) -> None:
        statement = f"INSERT INTO dbnotify_journal (created_at, body) VALUES ({_NOW}, :payload)"
        params = {"payload": payload}
        if connection is None:
            self._with_conn(lambda conn: _autocommit(conn, statement, params))
            return
        execute_on(connection, statement, params)

    def open_stream(self, settings: Any) -> Stream:
        return SQLiteStream(self, settings)

    def decode(self, raw: Any) -> list[Item]:
        journal_id, body = raw
        try:
            return _payload.decode(body, _no_fetch, journal_id)
        except _payload.PayloadError as exc:
            log.warning("skipped journal row %s: %s", journal_id, exc)
            return []


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%d %H:%M:%S%z")


def _autocommit(conn: sqlite3.Connection, statement: str, params: dict[str, Any]) -> None:
    try:
        conn.execute(statement, params)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            raise DBNotifyError(
                "the journal table is missing: run `flask dbnotify install-triggers`"
            ) from exc
        raise


def _connect(path: str) -> sqlite3.Connection:
    # Autocommit: nothing here holds a read transaction open between polls.
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def _on_connect(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.execute("PRAGMA busy_timeout = 30000")


class SQLiteStream(Stream):
    """Reads the journal past a cursor when another connection committed."""

    def __init__(self, backend: SQLiteBackend, settings: Any) -> None:
        self.backend = backend
        self.poll_interval = settings.poll_interval
        if not os.path.exists(backend.path):
            raise DBNotifyError(f"database file {backend.path} does not exist")
        self.conn = _connect(backend.path)
        try:
            self.conn.execute("PRAGMA journal_mode = WAL")
            if backend.position is None:
                backend.position = self._last_id()
            self.version: int | None = None
            self.watch = open_watch(os.path.dirname(backend.path))
        except BaseException:
            self.conn.close()
            raise
        self.settle_until = 0.0
        self.more = False

    def _last_id(self) -> int:
        try:
            row = self.conn.execute("SELECT max(id) FROM dbnotify_journal").fetchone()
        except sqlite3.OperationalError:
            return 0  # Not installed yet; every row will be new.
        return int(row[0] or 0)

    def wait(self, timeout: float, wake_fd: int) -> None:
        if self.more:
            return
        now = time.monotonic()
        if now < self.settle_until:
            timeout = min(timeout, 0.001)
        elif self.watch is None:
            timeout = min(timeout, self.poll_interval)
        fds: list[Any] = [wake_fd]
        if self.watch is not None:
            fds.append(self.watch)
            # A missed wake-up costs at most this long.
            timeout = min(timeout, max(self.poll_interval, 0.25))
        ready = select.select(fds, [], [], timeout)[0]
        if self.watch is not None and self.watch in ready:
            self.watch.drain()
            self.settle_until = time.monotonic() + _SETTLE

    def read(self) -> list[Any]:
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self.version and not self.more:
            return []
        self.version = version
        try:
            rows = self.conn.execute(
                "SELECT id, body FROM dbnotify_journal WHERE id > ? ORDER BY id LIMIT ?",
                (self.backend.position or 0, _READ_LIMIT),
            ).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        self.more = len(rows) == _READ_LIMIT
        if rows:
            self.backend.position = rows[-1][0]
            self.settle_until = 0.0
        return rows

    def probe(self) -> None:
        self.conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        self.conn.close()

    def discard(self) -> None:
        # SQLite forbids using a connection across fork(), closing included:
        # keep it referenced, never touched again.
        _abandoned.append(self.conn)
        if self.watch is not None:
            self.watch.close()


def _no_fetch(ids: Any) -> dict[int, str]:
    return {}
