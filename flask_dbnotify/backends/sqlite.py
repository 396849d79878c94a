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

import contextlib
import hashlib
import json
import logging
import os
import re
import select
import socket
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from .. import _payload
from .._items import Item
from .._watch import Watch
from ..errors import TABLE_MISSING_TODO, DBNotifyError, WatchError
from ..events import ChangeEvent, Operation
from . import Backend, Status, Stream, execute_on
from ._inotify import open_watch

log = logging.getLogger(__name__)

DDL_VERSION = 3
#: In every trigger and table we create: we drop only what carries it.
MARKER = "/* flask-dbnotify */"
#: What identifies the triggers and tables of versions before the marker.
_LEGACY_TRIGGER = "INSERT INTO dbnotify_journal (created_at, shape, body)"
_TABLES = {
    "dbnotify_journal": {"id", "created_at", "shape", "body"},
    "dbnotify_shapes": {"key", "header"},
    "dbnotify_listeners": {"name", "position", "seen_at"},
    "dbnotify_receivers": {"receiver", "id"},
    "dbnotify_claims": {"receiver", "event_id", "state", "attempts"},
}
_OP_CODE = {Operation.INSERT: "i", Operation.UPDATE: "u", Operation.DELETE: "d"}
_OPS = {"I": Operation.INSERT, "U": Operation.UPDATE, "D": Operation.DELETE}
#: SQLite's clock, in Julian days (what the journal stores).
_NOW = "julianday('now')"
_UNIX_EPOCH_JD = 2440587.5
#: SQLite functions take at most 127 arguments: rows are arrays of chunks.
_CHUNK = 100
_EMPTY: frozenset[str] = frozenset()
#: How long after a wake-up without news the stream keeps looking: a WAL
#: write wakes us just before the commit becomes visible.
_SETTLE = 0.05
_READ_LIMIT = 5000
_abandoned: list[sqlite3.Connection] = []
#: A row whose text and blob values take more than this is journaled cut:
#: its primary key only, with ``event.cut`` set (as on PostgreSQL).
MAX_ROW_BYTES = 16 * 1024 * 1024


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _json_value(ref: str, declared: str) -> str:
    """The JSON form of a column value. BLOBs (any column may hold one)
    become hex; REALs keep all 17 digits (json_array writes 15); text in a
    column declared JSON is embedded as JSON when it is valid."""
    cases = [
        # The shortest of 15, 16 or 17 digits that reads back as the same
        # double (Python's repr does the same).
        f"WHEN 'real' THEN CASE WHEN abs({ref}) > 1.7976931348623157e308 "
        f"THEN CASE WHEN {ref} > 0 THEN 'Infinity' ELSE '-Infinity' END "
        f"WHEN CAST(printf('%!.15g', {ref}) AS REAL) = {ref} THEN json(printf('%!.15g', {ref})) "
        f"WHEN CAST(printf('%!.16g', {ref}) AS REAL) = {ref} THEN json(printf('%!.16g', {ref})) "
        f"ELSE json(printf('%!.17g', {ref})) END",
        f"WHEN 'blob' THEN hex({ref})",
    ]
    if declared.strip().upper() in ("JSON", "JSONB"):
        cases.append(
            f"WHEN 'text' THEN CASE WHEN json_valid({ref}) THEN json({ref}) ELSE {ref} END"
        )
    return f"CASE typeof({ref}) {' '.join(cases)} ELSE {ref} END"


def _row_array(ref: str, columns: list[tuple[str, str]]) -> str:
    """``json_array(json_array(c1..c100), json_array(c101..), ...)``."""
    chunks = [
        "json_array("
        + ", ".join(_json_value(f"{ref}.{quote_ident(name)}", declared) for name, declared in part)
        + ")"
        for part in (columns[i : i + _CHUNK] for i in range(0, len(columns), _CHUNK))
    ]
    return f"json_array({', '.join(chunks)})"


def _size(ref: str, columns: list[tuple[str, str]]) -> str:
    """Bytes of the row's text and blob values, without copying them."""
    return " + ".join(
        f"CASE typeof({ref}.{quote_ident(name)}) "
        f"WHEN 'text' THEN length(CAST({ref}.{quote_ident(name)} AS BLOB)) "
        f"WHEN 'blob' THEN length({ref}.{quote_ident(name)}) ELSE 8 END"
        for name, _ in columns
    )


def _flatten(chunks: list[list[Any]]) -> list[Any]:
    return chunks[0] if len(chunks) == 1 else [v for chunk in chunks for v in chunk]


class SQLiteBackend(Backend):
    """A journal table written by triggers, read by polling."""

    durable_by_nature = True

    def __init__(self, uri: str, path: str, engine: sa.Engine) -> None:
        super().__init__(uri, uri, "main", engine)
        self.path = path
        self.position: int | None = None
        self._shapes: dict[str, dict[str, Any]] = {}
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

    def _resolve(
        self, conn: sqlite3.Connection, watch: Watch
    ) -> tuple[str, list[tuple[str, str]], list[str]]:
        """``(table, [(column, declared type)], primary key)`` as the
        database has them."""
        if watch.schema not in (None, "main"):
            raise WatchError(
                f"{watch.name!r}: only tables of the main database can be watched in SQLite"
            )
        row = conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name = ? COLLATE NOCASE",
            (watch.table,),
        ).fetchone()
        if row is None:
            raise WatchError(
                f"table {watch.table!r} does not exist in {self.path}: " + TABLE_MISSING_TODO
            )
        table = row[0]
        info = conn.execute("SELECT name, type, pk FROM pragma_table_info(?)", (table,)).fetchall()
        columns = [(name, declared) for name, declared, _ in info]
        names = [name for name, _ in columns]
        pk = [name for name, _, position in sorted(info, key=lambda r: r[2]) if position]
        for col in (watch.columns or ()) + (watch.when_changed or ()):
            if col not in names:
                raise WatchError(
                    f"table {watch.table!r} has no column {col!r} (columns: {', '.join(names)})"
                )
        if not pk:
            raise WatchError(
                f"table {watch.table!r} has no primary key: events are identified by it, so add one"
            )
        return table, columns, pk

    def _our_triggers(self, conn: sqlite3.Connection) -> list[tuple[str, str]]:
        """Triggers we made: named dbnotify_*, and marked (or, made before
        the mark, appending to our journal as those versions did)."""
        return conn.execute(
            "SELECT name, tbl_name FROM sqlite_schema WHERE type = 'trigger' "
            "AND substr(name, 1, 9) = 'dbnotify_' AND (instr(sql, ?) > 0 OR instr(sql, ?) > 0) "
            "ORDER BY tbl_name, name",
            (MARKER, _LEGACY_TRIGGER),
        ).fetchall()

    def _our_tables(self, conn: sqlite3.Connection) -> list[str]:
        """Our tables present: marked, or with the columns we gave them."""
        ours = []
        for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_schema WHERE type = 'table' "
            f"AND name IN ({', '.join('?' * len(_TABLES))})",
            list(_TABLES),
        ).fetchall():
            columns = {
                row[0] for row in conn.execute("SELECT name FROM pragma_table_info(?)", (name,))
            }
            if MARKER in (sql or "") or _TABLES[name] <= columns:
                ours.append(name)
        return ours

    # -- DDL ----------------------------------------------------------------

    def _trigger_sql(
        self,
        watch: Watch,
        table: str,
        columns: list[tuple[str, str]],
        pk: list[str],
        op: Operation,
        key: str,
    ) -> str:
        """A row trigger appending ``(time, shape key, values)`` to the
        journal; the shape (names, keys) is stored once in dbnotify_shapes."""
        when = ""
        declared = dict(columns)
        keys = [(k, declared[k]) for k in pk]
        if op is Operation.UPDATE:
            # Row values: one comparison, however many columns.
            watched = watch.when_changed or [name for name, _ in columns]
            new = ", ".join(f"NEW.{quote_ident(c)}" for c in watched)
            old = ", ".join(f"OLD.{quote_ident(c)}" for c in watched)
            when = f" WHEN ({new}) IS NOT ({old})"
            body = f"json_array({_row_array('NEW', columns)}, {_row_array('OLD', columns)})"
            size = f"{_size('NEW', columns)} + {_size('OLD', columns)}"
            cut = f"json_array({_row_array('NEW', keys)}, {_row_array('OLD', keys)})"
        else:
            ref = "NEW" if op is Operation.INSERT else "OLD"
            body, size, cut = _row_array(ref, columns), _size(ref, columns), _row_array(ref, keys)
        # A row too large would make the journal row (or its JSON) exceed
        # SQLite's string limit and fail the write: it is journaled cut.
        body = f"CASE WHEN {size} > {MAX_ROW_BYTES} THEN json_object('cut', {cut}) ELSE {body} END"
        return (
            f"AFTER {op.value} ON {quote_ident(table)} FOR EACH ROW{when} BEGIN {MARKER} "
            f"INSERT INTO dbnotify_journal (created_at, shape, body) "
            f"VALUES ({_NOW}, {quote_literal(key)}, {body}); END"
        )

    def _watch_triggers(
        self, conn: sqlite3.Connection, watch: Watch
    ) -> tuple[str, dict[str, tuple[str, str]]]:
        """``(table, {trigger name: (trigger body, shape header)})``."""
        table, columns, pk = self._resolve(conn, watch)
        names = [name for name, _ in columns]
        # SQLite has no TRUNCATE: a DELETE without WHERE fires the row triggers.
        ops = [op for op in watch.operations if op is not Operation.TRUNCATE]
        headers = {
            op: json.dumps(
                {
                    "t": watch.name,
                    "o": op.value[0],
                    "k": pk,
                    "c": names,
                    "keep": None
                    if watch.columns is None
                    else [c for c in names if c in watch.columns or c in pk],
                },
                ensure_ascii=False,
            )
            for op in ops
        }
        # The name (and shape key) hashes everything the trigger does.
        digest = hashlib.sha256(
            json.dumps(
                [
                    DDL_VERSION,
                    [
                        [
                            op.value,
                            headers[op],
                            self._trigger_sql(watch, table, columns, pk, op, ""),
                        ]
                        for op in ops
                    ],
                ]
            ).encode()
        ).hexdigest()[:10]
        slug = re.sub(r"[^a-z0-9]+", "_", table.lower()).strip("_")[:36] or "t"
        result = {}
        for op in ops:
            name = f"dbnotify_{slug}_{_OP_CODE[op]}_{digest}"
            result[name] = (self._trigger_sql(watch, table, columns, pk, op, name), headers[op])
        return table, result

    def _shared_sql(self) -> list[str]:
        # AUTOINCREMENT: ids are never reused, even after pruning empties
        # the journal, so a listener's position stays meaningful.
        return [
            f"CREATE TABLE IF NOT EXISTS dbnotify_journal ({MARKER} "
            "id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL, "
            "shape TEXT, body TEXT NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS dbnotify_shapes ({MARKER} "
            "key TEXT PRIMARY KEY, header TEXT NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS dbnotify_listeners ({MARKER} "
            "name TEXT PRIMARY KEY, position INTEGER NOT NULL, seen_at REAL NOT NULL)",
            # Exactly-once receivers: how far each has claimed, and claims.
            f"CREATE TABLE IF NOT EXISTS dbnotify_receivers ({MARKER} "
            "receiver TEXT PRIMARY KEY, id INTEGER NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS dbnotify_claims ({MARKER} "
            "receiver TEXT NOT NULL, event_id INTEGER NOT NULL, "
            "state TEXT NOT NULL DEFAULT 'running', attempts INTEGER NOT NULL DEFAULT 1, "
            "claimed_by TEXT, claimed_at REAL NOT NULL, next_attempt_at REAL, last_error TEXT, "
            "PRIMARY KEY (receiver, event_id))",
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
            for name, (body, header) in wanted.items():
                statements.append(
                    f"INSERT OR REPLACE INTO dbnotify_shapes (key, header) "
                    f"VALUES ({quote_literal(name)}, {quote_literal(header)})"
                )
                statements.append(f"CREATE TRIGGER IF NOT EXISTS {quote_ident(name)} {body}")
        return statements

    def _with_conn(self, work: Any, create: bool = False) -> Any:
        try:
            conn = _connect(self.path, create)
        except sqlite3.Error as exc:
            raise DBNotifyError(
                f"cannot open {self.path}: {exc}; check that its folder exists and is writable"
            ) from exc
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
            with _write_transaction(conn):
                for statement in self._install_sql(conn, watches):
                    conn.execute(statement)

        self._with_conn(work, create=True)

    def execute_all(self, statements: Sequence[str]) -> None:
        def work(conn: sqlite3.Connection) -> None:
            with _write_transaction(conn):
                for statement in statements:
                    conn.execute(statement)

        self._with_conn(work)

    def uninstall_sql(self, watches: Sequence[Watch], everything: bool) -> list[str]:
        def work(conn: sqlite3.Connection) -> list[str]:
            installed = self._our_triggers(conn)
            if everything:
                drops = [name for name, _ in installed]
            else:
                tables = {self._resolve(conn, watch)[0].lower() for watch in watches}
                drops = [name for name, tbl in installed if tbl.lower() in tables]
            statements = [f"DROP TRIGGER IF EXISTS {quote_ident(n)}" for n in drops]
            if everything:
                statements += [f"DROP TABLE IF EXISTS {name}" for name in self._our_tables(conn)]
            return statements

        return self._with_conn(work)  # type: ignore[no-any-return]

    def status(self, watches: Sequence[Watch], health: bool = True) -> Status:
        def work(conn: sqlite3.Connection) -> Status:
            status = Status()
            installed = self._our_triggers(conn)
            covered: set[str] = set()
            for watch in watches:
                try:
                    table, wanted = self._watch_triggers(conn, watch)
                except WatchError as exc:
                    status.error(watch.name, exc)
                    continue
                covered.add(table.lower())
                status.compare(
                    watch.name,
                    {n for n, tbl in installed if tbl.lower() == table.lower()},
                    set(wanted),
                )
            for name, tbl in installed:
                if tbl.lower() not in covered:
                    status.orphaned.append(f"trigger {name} on {tbl}")
            if health:
                self._health(conn, status)
            return status

        return self._with_conn(work)  # type: ignore[no-any-return]

    def _health(self, conn: sqlite3.Connection, status: Status) -> None:
        health = status.health
        health["journal mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
        try:
            count, oldest = conn.execute(
                "SELECT count(*), min(created_at) FROM dbnotify_journal"
            ).fetchone()
            # The last id given out, which pruning does not take back
            # (AUTOINCREMENT); no row here until the first journal row.
            last = conn.execute(
                "SELECT max(seq) FROM sqlite_sequence WHERE name = 'dbnotify_journal'"
            ).fetchone()[0]
            listeners = conn.execute(
                "SELECT name, position, seen_at FROM dbnotify_listeners ORDER BY name"
            ).fetchall()
        except sqlite3.OperationalError:
            return  # Not installed.
        health["journal"] = (
            f"{count} rows"
            + (f", last id {last}" if last else ", none written yet")
            + (f", oldest {_iso(_unix(oldest))}" if oldest else "")
        )
        health["listeners"] = str(len(listeners))
        for name, position, seen_at in listeners:
            health[f"listener {name}"] = f"read to id {position}, seen {_iso(seen_at)}"
        try:
            status.once_health(
                lambda statement: conn.execute(statement).fetchall(),
                "dbnotify_claims",
                "dbnotify_receivers",
            )
        except sqlite3.OperationalError:
            return  # Installed by an earlier version.

    # -- journal housekeeping ------------------------------------------------

    def prune(self, retention: float) -> None:
        """Record how far this listener has read, then delete journal rows
        older than ``retention`` that every live listener has read."""
        now = time.time()

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA busy_timeout = 1000")  # housekeeping can wait
            with _write_transaction(conn):
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
                    "DELETE FROM dbnotify_claims WHERE state = 'done' AND claimed_at < ?",
                    (now - retention,),
                )
                # Old rows every live listener has read, that no once
                # receiver still has to claim, and that no claim still
                # needs (failed ones are kept for inspection).
                conn.execute(
                    "DELETE FROM dbnotify_journal WHERE created_at < ? AND id <= coalesce("
                    "(SELECT min(position) FROM dbnotify_listeners), "
                    "(SELECT max(id) FROM dbnotify_journal)) "
                    "AND id <= coalesce((SELECT min(id) FROM dbnotify_receivers), id) "
                    "AND NOT EXISTS (SELECT 1 FROM dbnotify_claims AS c "
                    "  WHERE c.event_id = dbnotify_journal.id AND c.state <> 'done')",
                    ((now - retention) / 86400.0 + _UNIX_EPOCH_JD,),
                )

        self._with_conn(work)

    # -- messages ----------------------------------------------------------

    def notify(self, connection: Any, channel: str, payload: str, durable: bool = False) -> None:
        # Every message is journaled on SQLite: durable or not, same path.
        statement = f"INSERT INTO dbnotify_journal (created_at, body) VALUES ({_NOW}, :payload)"
        params = {"payload": payload}
        if connection is None:
            self._with_conn(lambda conn: _autocommit(conn, statement, params))
            return
        execute_on(connection, statement, params)

    def open_stream(self, settings: Any) -> Stream:
        return SQLiteStream(self, settings)

    def after_fork(self) -> None:
        super().after_fork()
        # A forked child is a new listener: its own row in
        # dbnotify_listeners, reading from now on.
        self.listener_name = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.position = None

    # -- exactly-once receivers ------------------------------------------------

    def _write(self, statement: str, params: Any) -> list[Any]:
        def work(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(statement, params).fetchall()

        return self._with_conn(work)  # type: ignore[no-any-return]

    def journal(self, since: int, limit: int) -> tuple[list[Item], int | None]:
        rows = self._write(
            "SELECT id, created_at, shape, body FROM dbnotify_journal WHERE id >= ? "
            "ORDER BY id LIMIT ?",
            (since, limit),
        )
        items = [item for raw in rows for item in self.decode(raw)]
        return items, (rows[-1][0] if rows else None)

    def once_register(self, receivers: Sequence[str]) -> None:
        self._write(
            "INSERT OR IGNORE INTO dbnotify_receivers (receiver, id) "
            "SELECT value, coalesce((SELECT max(id) FROM dbnotify_journal), 0) "
            "FROM json_each(?)",
            (json.dumps(list(receivers)),),
        )

    def once_scan(
        self, receiver: str, watches: Sequence[str], limit: int
    ) -> tuple[list[ChangeEvent], Any]:
        # Writers are serialised, so ids follow commit order: whatever is
        # visible below the newest id is all there will ever be.
        def work(conn: sqlite3.Connection) -> tuple[list[Any], Any]:
            conn.execute("BEGIN")  # one snapshot for the rows and the newest id
            try:
                return scan(conn)
            finally:
                conn.execute("COMMIT")

        def scan(conn: sqlite3.Connection) -> tuple[list[Any], Any]:
            mark = conn.execute(
                "SELECT id FROM dbnotify_receivers WHERE receiver = ?", (receiver,)
            ).fetchone()
            if mark is None:
                return [], None
            rows = conn.execute(
                "SELECT id, created_at, shape, body FROM dbnotify_journal WHERE id > ? "
                "AND shape IN (SELECT key FROM dbnotify_shapes "
                "  WHERE json_extract(header, '$.t') IN (SELECT value FROM json_each(?))) "
                "ORDER BY id LIMIT ?",
                (mark[0], json.dumps(list(watches)), limit),
            ).fetchall()
            if len(rows) == limit:
                return rows, rows[-1][0]
            last = conn.execute("SELECT max(id) FROM dbnotify_journal").fetchone()[0]
            return rows, last

        rows, cursor = self._with_conn(work)
        events = [e for raw in rows for e in self.decode(raw) if isinstance(e, ChangeEvent)]
        return events, cursor

    def once_claim(self, receiver: str, ids: Sequence[int], worker: str) -> set[int]:
        if not ids:
            return set()
        rows = self._write(
            "INSERT OR IGNORE INTO dbnotify_claims (receiver, event_id, claimed_by, claimed_at) "
            "SELECT ?, value, ?, ? FROM json_each(?) RETURNING event_id",
            (receiver, worker, time.time(), json.dumps(list(ids))),
        )
        return {row[0] for row in rows}

    def once_advance(self, receiver: str, cursor: Any) -> None:
        if cursor is not None:
            self._write(
                "UPDATE dbnotify_receivers SET id = ? WHERE receiver = ? AND id < ?",
                (cursor, receiver, cursor),
            )

    def once_finish(
        self, receiver: str, event_id: int, error: str | None, retry_in: float | None
    ) -> None:
        state = "done" if error is None else ("retry" if retry_in is not None else "failed")
        self._write(
            "UPDATE dbnotify_claims SET state = ?, last_error = ?, claimed_by = NULL, "
            "next_attempt_at = ? WHERE receiver = ? AND event_id = ?",
            (state, error, time.time() + (retry_in or 0), receiver, event_id),
        )

    def once_release(self, receiver: str, ids: Sequence[int]) -> None:
        if ids:
            self._write(
                "UPDATE dbnotify_claims SET state = 'retry', attempts = attempts - 1, "
                "claimed_by = NULL, next_attempt_at = ? WHERE receiver = ? "
                "AND event_id IN (SELECT value FROM json_each(?)) AND state = 'running'",
                (time.time(), receiver, json.dumps(list(ids))),
            )

    def once_reset(self, receiver: str, event_id: int, worker: str) -> None:
        self._write(
            "INSERT INTO dbnotify_claims (receiver, event_id, claimed_by, claimed_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (receiver, event_id) DO UPDATE SET "
            "state = 'running', attempts = 1, claimed_by = excluded.claimed_by, "
            "claimed_at = excluded.claimed_at, last_error = NULL",
            (receiver, event_id, worker, time.time()),
        )

    def once_forget(self, receiver: str) -> None:
        self._write("DELETE FROM dbnotify_claims WHERE receiver = ?", (receiver,))
        self._write("DELETE FROM dbnotify_receivers WHERE receiver = ?", (receiver,))

    def once_due(
        self, receiver: str, worker: str, lease: float, limit: int
    ) -> list[tuple[int, int, ChangeEvent | None]]:
        now = time.time()
        rows = self._write(
            "UPDATE dbnotify_claims SET state = 'running', attempts = attempts + 1, "
            "claimed_by = ?, claimed_at = ? WHERE rowid IN (SELECT rowid FROM dbnotify_claims "
            "  WHERE receiver = ? AND ((state = 'retry' AND next_attempt_at <= ?) "
            "  OR (state = 'running' AND claimed_at < ?)) ORDER BY event_id LIMIT ?) "
            "RETURNING event_id, attempts",
            (worker, now, receiver, now, now - lease, limit),
        )
        result: list[tuple[int, int, ChangeEvent | None]] = []
        for event_id, attempts in sorted(rows):
            raw = self._with_conn(
                lambda conn, i=event_id: conn.execute(
                    "SELECT id, created_at, shape, body FROM dbnotify_journal WHERE id = ?", (i,)
                ).fetchone()
            )
            items = self.decode(raw) if raw is not None else []
            event = items[0] if items and isinstance(items[0], ChangeEvent) else None
            result.append((event_id, attempts, event))
        return result

    def rewind(self, raw: list[Any]) -> None:
        if raw:
            # Only ever back: undelivered rows of an interrupted batch come
            # before the queued ones.
            first = min(journal_id for journal_id, *_ in raw) - 1
            self.position = first if self.position is None else min(self.position, first)

    def decode(self, raw: Any) -> list[Item]:
        journal_id, created_at, shape, body = raw
        try:
            if shape is None:
                return _payload.decode(body, journal_id)
            return [self._event(journal_id, created_at, self._shape(shape), body)]
        except (_payload.PayloadError, KeyError, ValueError, TypeError, IndexError) as exc:
            log.warning("skipped journal row %s: %s", journal_id, exc)
            return []

    def _shape(self, key: str) -> dict[str, Any]:
        shape = self._shapes.get(key)
        if shape is None:
            row = self._with_conn(
                lambda conn: conn.execute(
                    "SELECT header FROM dbnotify_shapes WHERE key = ?", (key,)
                ).fetchone()
            )
            if row is None:
                raise _payload.PayloadError(f"unknown shape {key!r}")
            shape = json.loads(row[0])
            shape["op"] = _OPS[shape["o"]]
            self._shapes[key] = shape
        return shape

    def _event(
        self, journal_id: int, created_at: float, shape: dict[str, Any], body: str
    ) -> ChangeEvent:
        columns, keep, keys = shape["c"], shape["keep"], shape["k"]
        values = _payload.loads(body)
        op = shape["op"]
        old = new = None
        changed = _EMPTY
        timestamp = datetime.fromtimestamp(_unix(created_at), UTC)
        if type(values) is dict:
            cut = values["cut"]
            if op is Operation.UPDATE:
                new = dict(zip(keys, _flatten(cut[0]), strict=True))
                old = dict(zip(keys, _flatten(cut[1]), strict=True))
            elif op is Operation.INSERT:
                new = dict(zip(keys, _flatten(cut), strict=True))
            else:
                old = dict(zip(keys, _flatten(cut), strict=True))
            row = new if new is not None else old
            assert row is not None
            pk = row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)
            return ChangeEvent(shape["t"], op, pk, new, old, _EMPTY, journal_id, timestamp, True)
        if op is Operation.UPDATE:
            new_values, old_values = _flatten(values[0]), _flatten(values[1])
            pairs = zip(columns, new_values, old_values, strict=True)
            changed = frozenset([c for c, a, b in pairs if _payload.differs(a, b)])
            new = dict(zip(columns, new_values, strict=True))
            old = dict(zip(columns, old_values, strict=True))
            row = new
        else:
            row = dict(zip(columns, _flatten(values), strict=True))
            if op is Operation.INSERT:
                new = row
            else:
                old = row
        pk = row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)
        if keep is not None:
            new = None if new is None else {c: new[c] for c in keep}
            old = None if old is None else {c: old[c] for c in keep}
        return ChangeEvent(shape["t"], op, pk, new, old, changed, journal_id, timestamp)


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S%z")


def _unix(julian_day: float) -> float:
    return (julian_day - _UNIX_EPOCH_JD) * 86400.0


def _autocommit(conn: sqlite3.Connection, statement: str, params: dict[str, Any]) -> None:
    try:
        conn.execute(statement, params)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            raise DBNotifyError(
                "the journal table is missing: run `flask dbnotify install-triggers`"
            ) from exc
        raise


@contextlib.contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE (take the write lock now, not halfway through) and
    commit, or roll back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _connect(path: str, create: bool = False) -> sqlite3.Connection:
    # Autocommit: nothing here holds a read transaction open between polls.
    # mode=rw unless installing: a mistyped path is an error, not a new
    # empty database.
    conn = sqlite3.connect(
        f"file:{urllib.parse.quote(path)}?mode={'rwc' if create else 'rw'}",
        uri=True,
        timeout=30,
        isolation_level=None,
        check_same_thread=False,
    )
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
            raise DBNotifyError(
                f"cannot open {backend.where}: it does not exist; create the database "
                "(`flask dbnotify install-triggers` creates the file) or fix the path in the URL"
            )
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
            position = self.backend.position or 0
            last = self.conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'dbnotify_journal'"
            ).fetchone()
            if last is not None and last[0] < position:
                # The journal was dropped and made anew: its ids restarted.
                log.info("the journal was recreated; reading it from the start")
                position = self.backend.position = 0
            rows = self.conn.execute(
                "SELECT id, created_at, shape, body FROM dbnotify_journal "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (position, _READ_LIMIT),
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
