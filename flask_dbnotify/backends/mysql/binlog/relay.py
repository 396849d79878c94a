"""Relaying the binary log into the journal, one committed transaction at
a time: the rows of watched tables become journal rows exactly as our
triggers would have written them (the same shapes, the same values), and
the log position after the transaction is recorded with them, in one
transaction, so that a leader that dies relays nothing twice.

What to relay is in ``dbnotify_shapes``: the shapes an install made for
binary-log capture (no trigger: ``trigger_name = ''``), each naming its
table and operation; the relay reads them again whenever a transaction
changed that table.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
from typing import Any

from pymysql.converters import escape_string

from ...._payload import VERSION
from ..catalog import qualified
from ..ddl import MAX_CONTEXT_BYTES, MAX_ROW_BYTES, NOW
from . import events as ev
from .events import Event, TableMap
from .values import Decoder

log = logging.getLogger(__name__)

#: Rows and bytes of journal values in one INSERT (well under the
#: server's max_allowed_packet).
_ROWS_PER_INSERT = 1000
_BYTES_PER_INSERT = 4 * 1024 * 1024
#: A transaction with nothing to relay moves the recorded position at most
#: this often (seconds): a restart reads at most that much again.
_POSITION_EVERY = 1.0
_OP = {ev.WRITE_ROWS: "i", ev.UPDATE_ROWS: "u", ev.DELETE_ROWS: "d"}


class LostLead(Exception):
    """Another process relays: this one stops."""


class Shape:
    """What the relay writes for one watched table and operation."""

    def __init__(self, key: str, header: dict[str, Any]) -> None:
        self.key = key
        self.columns: list[str] = header["c"]
        self.pk: list[str] = header["k"]
        #: UPDATEs of rows whose these columns are unchanged are skipped.
        self.watched: list[str] = header.get("w") or self.columns


class Relay:
    """Reads events; on each commit, writes the journal rows and the position."""

    def __init__(self, db: Any, decoder: Decoder, conn: Any, at: tuple[str, int]) -> None:
        self.db = db
        #: The position recorded last (by this relay, or where it began).
        self.at = at
        self.database = db.database
        self.decoder = decoder
        self.conn = conn
        names = ("journal", "shapes", "binlog", "relay")
        self.t = {name: qualified(self.database, f"dbnotify_{name}") for name in names}
        self.maps: dict[int, TableMap] = {}
        #: Column readers per table and columns.
        self.readers: dict[tuple[Any, ...], list[Any]] = {}
        #: (shape key or None for a message, body) of the transaction.
        self.pending: list[tuple[str | None, str]] = []
        #: What the transaction's bodies begin with, for its context ('' for
        #: none; see _context_prefix), and the rows of
        #: dbnotify_relay it wrote (deleted once relayed).
        self.context = ""
        self.handed: list[int] = []
        #: Inside a transaction, which only XID or COMMIT ends.
        self.in_transaction = False
        self.reload = False
        self.written_at = 0.0
        self.shapes = self._shapes()
        self.json_columns: dict[tuple[str, str], set[str]] = {}

    def _shapes(self) -> dict[tuple[str, str, str], Shape]:
        """(schema, table, op letter) -> shape, for binary-log capture."""
        with self.conn.cursor() as cur:
            cur.execute(
                f"SELECT name, header, trigger_schema, table_name FROM {self.t['shapes']} "
                "WHERE trigger_name = ''"
            )
            rows = cur.fetchall()
        shapes = {}
        for key, header, schema, table in rows:
            shapes[(schema, table, key[0])] = Shape(key, json.loads(header))
        self.json_columns = {}
        return shapes

    def _readers(self, found: TableMap) -> list[Any]:
        """The column readers of a table as a map describes it, made once."""
        key = (found.schema, found.table, tuple(found.columns))
        readers = self.readers.get(key)
        if readers is None:
            if len(self.readers) > 1000:
                self.readers.clear()
            json_columns = self._json_columns(found.schema, found.table)
            readers = self.readers[key] = self.decoder.readers(found.columns, json_columns)
        return readers

    def _json_columns(self, schema: str, table: str) -> set[str]:
        """The columns of a table that hold JSON (MariaDB logs them as text,
        and checks them with ``json_valid``)."""
        key = (schema, table)
        if key not in self.json_columns:
            with self.conn.cursor() as cur:
                cur.execute(
                    "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s "
                    "AND TABLE_NAME = %s AND (DATA_TYPE = 'json' OR COLUMN_NAME IN (SELECT "
                    "  SUBSTRING_INDEX(SUBSTRING_INDEX(CHECK_CLAUSE, '`', 2), '`', -1) "
                    "  FROM information_schema.CHECK_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = %s "
                    "  AND TABLE_NAME = %s AND CHECK_CLAUSE LIKE 'json\\_valid(%%'))",
                    (schema, table, schema, table),
                )
                self.json_columns[key] = {row[0] for row in cur.fetchall()}
        return self.json_columns[key]

    def handle(self, event: Event, dump: ev.Dump) -> None:
        kind = event.type
        if kind == ev.TABLE_MAP:
            found = ev.table_map(event.body, dump.id_bytes)
            self.maps[found.table_id] = found
        elif kind in _OPS:
            try:
                self._rows(event, dump)
            except _UNREADABLE as exc:
                # Nothing else to do with it: skipping it for good, and
                # saying so, keeps every later change coming.
                self._missed(f"a rows event at {dump.file}:{event.next_position}: {exc!r}")
        elif kind == ev.XID:
            self.commit(dump.file, event.next_position)
        elif kind == ev.QUERY:
            self._query(event, dump)
        elif kind == ev.XA_PREPARE:
            # Its changes are relayed at neither XA COMMIT nor XA ROLLBACK.
            self.pending, self.handed, self.context = [], [], ""
            self._missed("an XA transaction (not relayed)")
            self.commit(dump.file, event.next_position)
        elif kind in ev.COMPRESSED:
            self._missed(f"a compressed event (log_bin_compress) at {dump.file}")
        elif kind == ev.MARIADB_GTID:
            self.pending, self.handed, self.context = [], [], ""
            # A group of events begins: a transaction, unless it is one
            # statement standing alone (FL_STANDALONE, after the sequence
            # number and domain id).
            self.in_transaction = not event.body[12] & 1
        elif kind == ev.ROTATE and event.next_position:
            self.commit(dump.file, int.from_bytes(event.body[:8], "little"))

    def _rows(self, event: Event, dump: ev.Dump) -> None:
        table_id, present, after, body, at = ev.rows(event.body, event.type, dump.id_bytes)
        found = self.maps.get(table_id)
        if found is None:
            return
        shape = self._watched(found, event.type, body, at, present)
        if shape is not None:
            self._relay_rows(shape, found, body, at, present, after)

    def _watched(
        self, found: TableMap, kind: int, body: bytes, at: int, present: list[int]
    ) -> Shape | None:
        """The shape the rows of ``found`` are relayed in, if watched; our
        own tables' rows are what writers hand over, or new shapes."""
        if found.schema == self.database and found.table in _OURS:
            if found.table == "dbnotify_shapes":
                self.reload = True
            elif found.table == "dbnotify_relay" and kind in ev.WRITE_ROWS:
                self._handed(found, body, at, present)
            return None
        shape = self.shapes.get((found.schema, found.table, _OPS[kind]))
        if shape is not None and (
            len(present) != len(found.columns) or found.columns[0].name.startswith("@")
        ):
            raise ValueError(
                "the log holds part of the row or no column names: binlog_row_image and "
                "binlog_row_metadata must be FULL"
            )
        return shape

    def _relay_rows(
        self,
        shape: Shape,
        found: TableMap,
        body: bytes,
        at: int,
        present: list[int],
        after: list[int] | None,
    ) -> None:
        readers = self._readers(found)
        names = [column.name for column in found.columns]
        image = self.decoder.image
        pending, key = self.pending, shape.key
        # The common case: a whole row of a table whose columns are as the
        # shape has them, values joined as they are.
        whole = after is None and names == shape.columns and not self.context
        while at < len(body):
            values, at = image(body, at, readers, present)
            if whole:
                text = ",".join(values)  # type: ignore[arg-type] # every column present
                if len(text) <= MAX_ROW_BYTES:
                    pending.append((key, f"[{text}]"))
                    continue
            row = dict(zip(names, values, strict=True))
            if after is None:
                pending.append((key, self._context(_body(shape, row, None))))
                continue
            new_values, at = image(body, at, readers, after)
            new = dict(zip(names, new_values, strict=True))
            if any(new.get(c) != row.get(c) for c in shape.watched):
                pending.append((key, self._context(_body(shape, new, row))))

    def _missed(self, what: str) -> None:
        """Changes the relay cannot pass on: every listener is told (a gap)."""
        log.error("binary-log capture skipped %s: changes were missed", what)
        self.pending.append((None, json.dumps({"v": VERSION, "gap": f"skipped {what}"})))

    def _handed(self, found: TableMap, body: bytes, at: int, present: list[int]) -> None:
        """Rows a writer's transaction wrote to dbnotify_relay: messages,
        and contexts for its changes from there on."""
        while at < len(body):
            values, at = self.decoder.image(body, at, self._readers(found), present)
            row_id, kind, text = (json.loads(v or "null") for v in values[:3])
            self.handed.append(row_id)
            if kind == "c":
                self.context = _context_prefix(text)
            elif _is_message(text):
                self.pending.append((None, text))
            else:
                # Only notify() writes messages here: anything else (a gap
                # or marker of ours, say) is not relayed.
                log.warning("skipped a row of dbnotify_relay that is no message: %.80r", text)

    def _context(self, body: str) -> str:
        """``body`` with the transaction's context, as the triggers write it."""
        return f"{self.context}{body}}}" if self.context else body

    def _query(self, event: Event, dump: ev.Dump) -> None:
        # Post-header: thread id (4), time (4), database length (1), error
        # code (2), status variables' length (2).
        db_len = event.body[8]
        status_len = int.from_bytes(event.body[11:13], "little")
        at = 13 + status_len
        schema = event.body[at : at + db_len].decode(errors="replace")
        query = _COMMENTS.sub("", event.body[at + db_len + 1 :].decode(errors="replace"))
        word = query[:8].upper()
        if word.startswith("BEGIN"):
            self.in_transaction = True
            return
        if word.startswith("TRUNCATE"):
            self._truncate(schema, query)
        if word.startswith("COMMIT") or not self.in_transaction:
            # The end of a transaction, or a statement that is one (DDL).
            self.commit(dump.file, event.next_position)
        # Else a statement inside a transaction (SAVEPOINT, say): it goes on.

    def _truncate(self, schema: str, query: str) -> None:
        found = _TRUNCATE.match(query)
        if found is None:
            return
        names = [_unquote(part) for part in _NAME.findall(found.group(1))]
        where = (names[0], names[1]) if len(names) == 2 else (schema, names[0])
        shape = self.shapes.get((*where, "t"))
        if shape is not None:
            self.pending.append((shape.key, "[]"))

    def commit(self, file: str, position: int) -> None:
        """The transaction ends: write what it holds, and where it ends."""
        now = time.monotonic()
        self.context, self.in_transaction = "", False
        if not self.pending and not self.handed and now - self.written_at < _POSITION_EVERY:
            if self.reload:
                self.shapes, self.reload = self._shapes(), False
            return
        self.conn.begin()
        try:
            with self.conn.cursor() as cur:
                for chunk in _chunks(self.pending):
                    # The values written out (escaped as PyMySQL escapes
                    # them), not formatted in: a third of the relay's time.
                    cur.execute(
                        f"INSERT INTO {self.t['journal']} (created_at, shape, body) VALUES "
                        + ", ".join(
                            f"({NOW}, {f'{_Q}{k}{_Q}' if k else 'NULL'}, "
                            f"{_Q}{escape_string(text)}{_Q})"
                            for k, text in chunk
                        )
                    )
                if self.handed:
                    marks = ", ".join(["%s"] * len(self.handed))
                    cur.execute(f"DELETE FROM {self.t['relay']} WHERE id IN ({marks})", self.handed)
                # Only from where this relay recorded last: if another
                # process leads now (this one's lock went with its
                # session), nothing is written twice.
                cur.execute(
                    f"UPDATE {self.t['binlog']} SET file = %s, position = %s, updated_at = %s "
                    "WHERE name = 'position' AND file = %s AND position = %s",
                    (file, position, time.time(), *self.at),
                )
                if cur.rowcount != 1:
                    raise LostLead(f"the recorded position moved from {self.at[0]}:{self.at[1]}")
        except BaseException:
            self.conn.rollback()
            raise
        self.at = (file, position)
        self.conn.commit()
        self.pending, self.handed, self.context = [], [], ""
        self.written_at = now
        self.maps.clear()  # each transaction maps the tables it changes again
        if self.reload:
            self.shapes, self.reload = self._shapes(), False


_OPS = {kind: op for kinds, op in _OP.items() for kind in kinds}
_Q = "'"
#: How every message notify() sends begins (see _payload.message_prefix).
_MESSAGE = f'{{"v":{VERSION},"m":'
_OURS = ("dbnotify_shapes", "dbnotify_relay", "dbnotify_journal", "dbnotify_binlog")
_PART = r"(?:`(?:[^`]|``)+`|[\w$]+)"
_TRUNCATE = re.compile(rf"TRUNCATE\s+(?:TABLE\s+)?({_PART}(?:\s*\.\s*{_PART})?)", re.IGNORECASE)
_NAME = re.compile(_PART)
#: Comments and spaces before a statement's first word.
_COMMENTS = re.compile(r"\A(?:\s+|/\*.*?\*/|(?:--|#)[^\n]*(?:\n|\Z))*", re.DOTALL)
#: What decoding a rows event may raise on what it cannot read.
_UNREADABLE = (ValueError, UnicodeDecodeError, IndexError, KeyError, struct.error)


def _context_prefix(text: Any) -> str:
    """What the bodies of a transaction's rows begin with once it handed over
    the context ``text`` ('' for none: empty, or longer than the triggers
    take): made once, not for every row."""
    if not isinstance(text, str) or not text or len(text.encode()) > MAX_CONTEXT_BYTES:
        return ""
    return f'{{"cx":{json.dumps(text, ensure_ascii=False)},"r":'


def _is_message(text: Any) -> bool:
    """Whether ``text`` is a message as notify() writes it."""
    if not isinstance(text, str) or not text.startswith(_MESSAGE):
        return False
    try:
        found = json.loads(text)
    except ValueError:
        return False
    return type(found) is dict and isinstance(found.get("m"), str) and "gap" not in found


def _unquote(part: str) -> str:
    return part[1:-1].replace("``", "`") if part.startswith("`") else part


def _body(shape: Shape, row: dict[str, str | None], old: dict[str, str | None] | None) -> str:
    """The journal body of a row (``old``: an UPDATE's row before), in the
    shape's column order, cut to its keys when too large."""
    values = ",".join(row.get(c) or "null" for c in shape.columns)
    if old is None:
        if len(values) > MAX_ROW_BYTES:
            return '{"cut":[[' + ",".join(row.get(c) or "null" for c in shape.pk) + "]]}"
        return f"[{values}]"
    before = ",".join(old.get(c) or "null" for c in shape.columns)
    if len(values) + len(before) > MAX_ROW_BYTES:
        keys = ",".join(row.get(c) or "null" for c in shape.pk)
        old_keys = ",".join(old.get(c) or "null" for c in shape.pk)
        return f'{{"cut":[[[{keys}]],[[{old_keys}]]]}}'
    return f"[[{values}],[{before}]]"


def _chunks(rows: list[tuple[str | None, str]]) -> list[list[tuple[str | None, str]]]:
    chunks: list[list[tuple[str | None, str]]] = []
    size = 0
    for row in rows:
        if not chunks or len(chunks[-1]) >= _ROWS_PER_INSERT or size > _BYTES_PER_INSERT:
            chunks.append([])
            size = 0
        chunks[-1].append(row)
        size += len(row[1])
    return chunks
