"""Relaying one committed transaction from the WAL into the journal.

The leader hands :class:`Relay` each transaction as pgoutput decoded it;
in one transaction of its own, the relay appends the watched changes to
``dbnotify_journal`` in commit order, as durable triggers would have
written them, records the transaction's commit position in
``dbnotify_wal``, and notifies the journal ids, as durable triggers do.
Every process's listener then reads them the way it reads durable events.

Values arrive as the text PostgreSQL's output functions write. For the
built-in types of :mod:`.tojson` the relay turns that text into JSON
itself and copies the rows in (``COPY``); a run of rows with a column of
any other type is turned into JSON by the server
(``to_json(value::type)``). Either way an event carries exactly what
triggers mode would have sent.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import pgoutput
from ..common import CHANNEL, ident, literal
from . import tojson
from .ddl import DEFINITIONS, MESSAGES

#: Statements of every relay transaction, prepared once per session (a
#: prepared statement outlives a transaction rolled back): the relay's
#: position, one row per slot; and a notification of the journal ids the
#: transaction wrote (found through the (xid, id) index).
_PREPARED = {
    "dbnotify_relay_record": (
        "(text, pg_lsn) AS INSERT INTO {wal} (slot, lsn, relayed_at) VALUES ($1, $2, now()) "
        "ON CONFLICT (slot) DO UPDATE SET lsn = excluded.lsn, relayed_at = excluded.relayed_at"
    ),
    "dbnotify_relay_notify": (
        "(text) AS SELECT pg_notify($1, '{{\"v\": 1, \"J\": [' || lo.id || ', ' || hi.id "
        "|| '], \"x\": ' || pg_current_xact_id() || '}}') "
        "FROM (SELECT id FROM {journal} WHERE xid = pg_current_xact_id() ORDER BY id LIMIT 1) "
        "AS lo, (SELECT id FROM {journal} WHERE xid = pg_current_xact_id() "
        "ORDER BY id DESC LIMIT 1) AS hi"
    ),
}
#: Characters handed to COPY at a time.
_COPY_CHUNK = 1 << 20
#: What COPY's text format escapes (the backslash first).
_COPY_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))
#: What the WAL sender's session reports that the text of values depends on.
STREAM_SETTINGS = ("DateStyle", "TimeZone")


@dataclass(frozen=True)
class WatchDef:
    """What a watch captures, as ``install-triggers`` recorded it."""

    name: str
    head: dict[str, Any]
    ops: str
    columns: tuple[str, ...] | None
    when_changed: tuple[str, ...] | None


@dataclass
class Change:
    """One row change of a transaction."""

    relation: pgoutput.Relation
    op: str  # I, U or D
    new: pgoutput.Values | None
    old: pgoutput.Values | None
    #: Its transaction's commit time, in seconds since the epoch, as text.
    ts: str


@dataclass
class Sent:
    """A row of the messages table: what ``notify(connection=...)`` sent."""

    id: Any
    body: Any
    ts: str


@dataclass
class Truncated:
    """A TRUNCATE, its tables named (as the leader's relations know them)."""

    tables: list[tuple[str, str]]
    ts: str


@dataclass
class Rows:
    """The rows of a run that make events (an UPDATE that changed nothing,
    or none of ``when_changed``, makes none), row by row."""

    op: str
    stamps: list[str] = field(default_factory=list)
    new: list[pgoutput.Values] = field(default_factory=list)  # not for D
    old: list[pgoutput.Values] = field(default_factory=list)  # not for I
    #: UPDATE of a watch with ``columns``: the JSON array of changed names.
    changed: list[str] = field(default_factory=list)

    def sides(self) -> list[tuple[str, list[pgoutput.Values]]]:
        """``n`` (new) and ``o`` (old) rows, those the op has, in body order."""
        return [(s, v) for s, v in (("n", self.new), ("o", self.old)) if v]


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class Relay:
    """Writes transactions to the journal through ``conn`` (a psycopg2
    connection of the leader's own, not in autocommit)."""

    def __init__(self, conn: Any, schema: str, slot: str) -> None:
        self.conn = conn
        self.slot = slot
        self.journal = ident(schema, "dbnotify_journal")
        self.wal = ident(schema, "dbnotify_wal")
        self.watches_table = ident(schema, DEFINITIONS)
        self.messages = ident(schema, MESSAGES)
        self.schema = schema
        self.watches: dict[tuple[str, str], WatchDef] = {}
        self._types: dict[tuple[int, int], str] = {}
        #: Type oid -> how its values become JSON here; other types' go to the server.
        self.converters = tojson.converters({}, None)
        self._prepared = False

    # -- state --------------------------------------------------------------

    def load(self) -> int:
        """Read the watches and where the relay stands (an LSN, 0 if never)."""
        self.load_watches()
        with self.conn.cursor() as cur:
            if not self._prepared:
                for name, text in _PREPARED.items():
                    cur.execute(f"PREPARE {name}" + text.format(wal=self.wal, journal=self.journal))
                self._prepared = True
            cur.execute(
                f"SELECT (lsn - '0/0')::bigint FROM {self.wal} WHERE slot = %s", (self.slot,)
            )
            row = cur.fetchone()
        self.conn.commit()
        return int(row[0]) if row else 0

    def load_watches(self) -> None:
        """Read what each watch captures (again, after install changed it)."""
        with self.conn.cursor() as cur:
            cur.execute(
                f"SELECT table_schema, table_name, watch, head, ops, columns, when_changed "
                f"FROM {self.watches_table} WHERE slot = %s",
                (self.slot,),
            )
            self.watches = {
                (schema, table): WatchDef(
                    name,
                    json.loads(head),
                    ops,
                    None if columns is None else tuple(columns),
                    None if changed is None else tuple(changed),
                )
                for schema, table, name, head, ops, columns, changed in cur.fetchall()
            }
        self.conn.commit()

    def set_up_stream(self, stream: Any) -> None:
        """Before streaming from ``stream`` (a psycopg2 replication
        connection): have its WAL sender write dates and times in ISO, the
        style that reads back the same in any session (others name zones
        by abbreviation, and the server reads IST as Israel's and LMT not
        at all), and floats with the relay session's digits, and note what
        the text of values then depends on."""
        with self.conn.cursor() as cur:
            cur.execute("SHOW extra_float_digits")
            (digits,) = cur.fetchone()
        self.conn.commit()
        with stream.cursor() as cur:
            cur.execute("SET DateStyle = ISO")
            cur.execute("SELECT set_config('extra_float_digits', %s, false)", (digits,))
        self.converters = tojson.converters(
            {name: stream.get_parameter_status(name) for name in STREAM_SETTINGS},
            self.conn.get_parameter_status("TimeZone"),
        )

    def forget_types(self, relation: pgoutput.Relation) -> None:
        """A relation was described anew (its columns may have changed type)."""
        for column in relation.columns:
            self._types.pop((column.type_oid, column.typmod), None)

    def type_names(self, relation: pgoutput.Relation) -> list[str]:
        """The SQL type of each column, to cast its text back."""
        wanted = [(c.type_oid, c.typmod) for c in relation.columns]
        missing = [k for k in wanted if k not in self._types]
        if missing:
            with self.conn.cursor() as cur:
                cur.execute(
                    "SELECT t, m, format_type(t, m) FROM unnest(%s::oid[], %s::int[]) AS x(t, m)",
                    ([t for t, _ in missing], [m for _, m in missing]),
                )
                for t, m, name in cur.fetchall():
                    self._types[(int(t), int(m))] = name
        return [self._types[k] for k in wanted]

    # -- a batch of transactions -------------------------------------------

    def relay(self, changes: Sequence[Change | Truncated | Sent], end_lsn: int) -> int:
        """Append ``changes`` (of one or more committed transactions, in
        commit order) to the journal and record ``end_lsn``, the last one's
        end, in one transaction; return how many journal rows were written."""
        try:
            with self.conn.cursor() as cur:
                journal = JournalWriter(cur, self.journal)
                sent: list[int] = []
                for run in _runs(changes):
                    first = run[0]
                    if isinstance(first, Sent):
                        sent += [int(m.id) for m in run]
                        journal.add(None, [m.body for m in run])
                    elif isinstance(first, Truncated):
                        self._truncate(journal, run)
                    else:
                        self._rows(journal, run)
                journal.flush()
                self._finish(cur, journal.count, sent, end_lsn)
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        return journal.count

    def _finish(self, cur: Any, count: int, sent: list[int], end_lsn: int) -> None:
        """Record the position, delete the messages relayed and notify the
        journal rows, in one round trip."""
        statements = ["EXECUTE dbnotify_relay_record(%(slot)s, %(lsn)s)"]
        params: dict[str, Any] = {"slot": self.slot, "lsn": lsn_text(end_lsn)}
        if sent:
            statements.append(f"DELETE FROM {self.messages} WHERE id = ANY(%(sent)s::bigint[])")
            params["sent"] = sent
        if count:
            statements.append("EXECUTE dbnotify_relay_notify(%(channel)s)")
            params["channel"] = CHANNEL
        cur.execute("; ".join(statements), params)

    def _truncate(self, journal: JournalWriter, run: list[Truncated]) -> None:
        for truncate in run:
            for schema, name in truncate.tables:
                watch = self.watches.get((schema, name))
                if watch is not None:
                    head = {**watch.head, "o": "T", "ts": float(truncate.ts)}
                    journal.add(watch.name, [json.dumps(head, ensure_ascii=False)])

    def _rows(self, journal: JournalWriter, run: list[Change]) -> None:
        first = run[0]
        relation, op = first.relation, first.op
        watch = self.watches.get((relation.schema, relation.name))
        if watch is None or op not in watch.ops:
            return
        names = [c.name for c in relation.columns]
        pk = watch.head["k"]
        carried = [
            i
            for i, name in enumerate(names)
            if watch.columns is None or name in watch.columns or name in pk
        ]
        rows = select(watch, names, op, run)
        if not carried or not rows.stamps:
            return
        head = json.dumps({**watch.head, "o": op}, ensure_ascii=False)[:-1] + ', "ts": '
        keys = [json.dumps(names[i], ensure_ascii=False) + ": " for i in carried]
        converters = [self.converters.get(relation.columns[i].type_oid) for i in carried]
        bodies = build(head, keys, converters, carried, rows)
        if bodies is not None:
            journal.add(watch.name, bodies)
        else:
            types = self.type_names(relation)
            journal.insert(*self._on_server(watch.name, head, keys, rows, carried, types))

    def _on_server(
        self,
        watch: str,
        head: str,
        keys: list[str],
        rows: Rows,
        carried: list[int],
        types: list[str],
    ) -> tuple[str, dict[str, Any]]:
        """The INSERT that builds the bodies on the server: each value cast
        from its text to its column's type and written by to_json()."""
        params: dict[str, Any] = {"w": watch, "head": head, "ts": rows.stamps}
        arrays, aliases = ["%(ts)s::text[]"], ["ts"]
        objects = []
        for side, values in rows.sides():
            columns = list(zip(*values, strict=True))
            parts = []
            for slot, i in enumerate(carried):
                alias = f"{side}{slot}"
                params[alias] = list(columns[i])
                arrays.append(f"%({alias})s::text[]")
                aliases.append(alias)
                key = literal(keys[slot]).replace("%", "%%")
                cast = types[i].replace("%", "%%")
                value = f"coalesce(to_json(u.{alias}::{cast})::text, 'null')"
                sep = "'{'" if slot == 0 else "','"
                parts.append(f"{sep} || {key} || {value}")
            objects.append("(" + " || ".join(parts) + " || '}')")
        row = " || ',' || ".join(objects)
        if rows.op == "U":
            if rows.changed:
                params["ch"] = rows.changed
                arrays.append("%(ch)s::text[]")
                aliases.append("ch")
                row += " || ',' || u.ch"
            row = f"'[' || {row} || ']'"
        query = (
            f"INSERT INTO {self.journal} (watch, body) "
            f"SELECT %(w)s, %(head)s || u.ts || ', \"r\": [' || {row} || ']}}' "
            f"FROM unnest({', '.join(arrays)}) WITH ORDINALITY AS u({', '.join(aliases)}, ord) "
            "ORDER BY u.ord"
        )
        return query, params


def select(watch: WatchDef, names: list[str], op: str, run: list[Change]) -> Rows:
    """The rows of ``run`` (changes of one relation and op) that make events."""
    if op == "I":
        inserted = [(c.ts, c.new) for c in run if c.new is not None]
        return Rows(op, [ts for ts, _ in inserted], new=[v for _, v in inserted])
    if op == "D":
        deleted = [(c.ts, c.old) for c in run if c.old is not None]
        return Rows(op, [ts for ts, _ in deleted], old=[v for _, v in deleted])
    rows = Rows(op)
    for change in run:
        old = change.old
        assert change.new is not None and old is not None
        new = tuple(
            o if v is pgoutput.UNCHANGED else v for v, o in zip(change.new, old, strict=True)
        )
        differ = {names[i] for i, (a, b) in enumerate(zip(new, old, strict=True)) if a != b}
        if not differ:
            continue  # an UPDATE that changed nothing
        if watch.when_changed and not differ & set(watch.when_changed):
            continue
        if watch.columns is not None:
            # The listener works out `changed` itself when every column is carried.
            rows.changed.append(json.dumps(sorted(differ, key=names.index), ensure_ascii=False))
        rows.stamps.append(change.ts)
        rows.new.append(new)
        rows.old.append(old)
    return rows


def build(
    head: str,
    keys: list[str],
    converters: list[tojson.Convert | None],
    carried: list[int],
    rows: Rows,
) -> list[str] | None:
    """The journal bodies of ``rows``, built here, as the server path would
    build them; None if a column has no converter or a value is not text."""
    if None in converters:
        return None
    objects, columns = [], []
    for _, values in rows.sides():
        by_column = list(zip(*values, strict=True))
        for i, convert in zip(carried, converters, strict=True):
            assert convert is not None
            column = _json_column(convert, by_column[i])
            if column is None:
                return None
            columns.append(column)
        objects.append("{" + ",".join(k.replace("%", "%%") + "%s" for k in keys) + "}")
    row = ",".join(objects)
    if rows.op == "U":
        if rows.changed:
            columns.append(rows.changed)
            row += ",%s"
        row = f"[{row}]"
    template = head.replace("%", "%%") + '%s, "r": [' + row + "]}"
    return [template % values for values in zip(rows.stamps, *columns, strict=True)]


def _json_column(
    convert: tojson.Convert, values: Sequence[str | bytes | None | pgoutput.Unchanged]
) -> list[str] | None:
    """One column's values as JSON text ('null' for NULL); None if one is
    neither text nor NULL (binary, or a TOASTed value not sent)."""
    if convert is tojson.same:
        out = [v if v is not None else "null" for v in values if v is None or type(v) is str]
    else:
        out = [
            convert(v) if v is not None else "null" for v in values if v is None or type(v) is str
        ]
    return out if len(out) == len(values) else None


class JournalWriter:
    """The journal rows of one relay transaction, in order. Bodies built
    in Python wait, to go in together by COPY; an INSERT that builds its
    rows on the server sends the waiting ones first."""

    def __init__(self, cur: Any, table: str) -> None:
        self.cur = cur
        self.table = table
        self.waiting: list[tuple[str | None, list[str]]] = []
        #: Rows written or waiting.
        self.count = 0

    def add(self, watch: str | None, bodies: list[str]) -> None:
        if bodies:
            self.waiting.append((watch, bodies))
            self.count += len(bodies)

    def insert(self, query: str, params: dict[str, Any]) -> None:
        self.flush()
        self.cur.execute(query, params)
        self.count += self.cur.rowcount

    def flush(self) -> None:
        if self.waiting:
            data = "".join(_copy_text(watch, bodies) for watch, bodies in self.waiting)
            self.waiting = []
            self.cur.copy_expert(
                f"COPY {self.table} (watch, body) FROM STDIN", io.StringIO(data), size=_COPY_CHUNK
            )


def _copy_escape(text: str) -> str:
    """Text as a field of COPY's text format (a scan for each special
    character costs less than a replace that finds none)."""
    for char, escaped in _COPY_ESCAPES:
        if char in text:
            text = text.replace(char, escaped)
    return text


def _copy_text(watch: str | None, bodies: list[str]) -> str:
    """Rows ``watch<TAB>body`` of COPY's text format, one per body. Bodies
    are escaped joined by NUL, which no PostgreSQL text holds."""
    first = "\\N" if watch is None else _copy_escape(watch)
    joined = _copy_escape("\0".join(bodies))
    return first + "\t" + joined.replace("\0", "\n" + first + "\t") + "\n"


def _runs(changes: Sequence[Any]) -> list[list[Any]]:
    """Consecutive changes of one kind, table and operation, in order."""
    runs: list[list[Any]] = []

    def kind(c: Any) -> Any:
        if isinstance(c, Change):
            # The relation as described: a change of its columns splits a run.
            return (c.relation, c.op)
        return type(c)

    for change in changes:
        if runs and kind(runs[-1][-1]) == kind(change):
            runs[-1].append(change)
        else:
            runs.append([change])
    return runs
