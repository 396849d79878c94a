"""Relaying one committed transaction from the WAL into the journal.

The leader hands :class:`Relay` each transaction as pgoutput decoded it;
in one transaction of its own, the relay appends the watched changes to
``dbnotify_journal`` in commit order, as durable triggers would have
written them, records the transaction's commit position in
``dbnotify_wal``, and notifies the journal ids, as durable triggers do.
Every process's listener then reads them the way it reads durable events.

Values arrive as the text PostgreSQL's output functions write; the server
turns them back into JSON (``to_json(value::type)``), so an event carries
exactly what triggers mode would have sent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import pgoutput
from ..common import CHANNEL, ident, literal
from .ddl import DEFINITIONS, MESSAGES

#: The relay's position, one row per slot.
_RECORD = (
    "INSERT INTO {wal} (slot, lsn, relayed_at) VALUES (%(slot)s, %(lsn)s::pg_lsn, now()) "
    "ON CONFLICT (slot) DO UPDATE SET lsn = excluded.lsn, relayed_at = excluded.relayed_at"
)

#: Names the journal rows ``lo..hi`` this transaction wrote, as durable
#: triggers do.
_NOTIFY = (
    "SELECT pg_notify(%s, '{\"v\": 1, \"J\": [' || %s || ', ' || %s "
    "|| '], \"x\": ' || pg_current_xact_id() || '}')"
)


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

    # -- state --------------------------------------------------------------

    def load(self) -> int:
        """Read the watches and where the relay stands (an LSN, 0 if never).
        A gap that install noted when it replaced a lost slot is journaled
        first, for every listener to report."""
        self.load_watches()
        with self.conn.cursor() as cur:
            cur.execute(
                f"SELECT (lsn - '0/0')::bigint, gap FROM {self.wal} WHERE slot = %s FOR UPDATE",
                (self.slot,),
            )
            row = cur.fetchone()
            if row is not None and row[1] is not None:
                cur.execute(
                    f"INSERT INTO {self.journal} (body) VALUES (%s) RETURNING id",
                    (json.dumps({"v": 1, "gap": row[1]}, ensure_ascii=False),),
                )
                (gap_id,) = cur.fetchone()
                cur.execute(_NOTIFY, (CHANNEL, gap_id, gap_id))
                cur.execute(f"UPDATE {self.wal} SET gap = NULL WHERE slot = %s", (self.slot,))
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
        ids: list[int] = []
        try:
            with self.conn.cursor() as cur:
                for run in _runs(changes):
                    ids += self._write(cur, run)
                cur.execute(
                    _RECORD.format(wal=self.wal), {"slot": self.slot, "lsn": lsn_text(end_lsn)}
                )
                if ids:
                    cur.execute(
                        "SELECT pg_notify(%s, '{\"v\": 1, \"J\": [' || %s || ', ' || %s "
                        "|| '], \"x\": ' || pg_current_xact_id() || '}')",
                        (CHANNEL, min(ids), max(ids)),
                    )
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        return len(ids)

    def _write(self, cur: Any, run: list[Any]) -> list[int]:
        first = run[0]
        if isinstance(first, Sent):
            cur.execute(
                f"DELETE FROM {self.messages} WHERE id = ANY(%s::bigint[])",
                ([int(m.id) for m in run],),
            )
            cur.execute(
                f"INSERT INTO {self.journal} (body) "
                "SELECT m FROM unnest(%s::text[]) WITH ORDINALITY AS x(m, n) "
                "ORDER BY n RETURNING id",
                ([m.body for m in run],),
            )
            return [row[0] for row in cur.fetchall()]
        if isinstance(first, Truncated):
            return self._truncate(cur, run)
        watch = self.watches.get((first.relation.schema, first.relation.name))
        if watch is None or first.op not in watch.ops:
            return []
        return self._rows(cur, watch, first.relation, first.op, run)

    def _truncate(self, cur: Any, run: list[Truncated]) -> list[int]:
        bodies = []
        for truncate in run:
            for schema, name in truncate.tables:
                watch = self.watches.get((schema, name))
                if watch is not None:
                    head = {**watch.head, "o": "T", "ts": float(truncate.ts)}
                    bodies.append((watch.name, json.dumps(head, ensure_ascii=False)))
        if not bodies:
            return []
        cur.execute(
            f"INSERT INTO {self.journal} (watch, body) "
            "SELECT w, b FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS x(w, b, n) "
            "ORDER BY n RETURNING id",
            ([w for w, _ in bodies], [b for _, b in bodies]),
        )
        return [row[0] for row in cur.fetchall()]

    def _rows(
        self,
        cur: Any,
        watch: WatchDef,
        relation: pgoutput.Relation,
        op: str,
        run: list[Change],
    ) -> list[int]:
        names = [c.name for c in relation.columns]
        types = self.type_names(relation)
        pk = watch.head["k"]
        carried = [
            i
            for i, name in enumerate(names)
            if watch.columns is None or name in watch.columns or name in pk
        ]
        rows_new: list[list[Any]] = [[] for _ in carried]
        rows_old: list[list[Any]] = [[] for _ in carried]
        changed: list[str] = []
        stamps: list[str] = []
        for change in run:
            new, old = change.new, change.old
            if op == "U":
                assert new is not None and old is not None
                new = tuple(
                    o if v is pgoutput.UNCHANGED else v for v, o in zip(new, old, strict=True)
                )
                differ = {names[i] for i, (a, b) in enumerate(zip(new, old, strict=True)) if a != b}
                if not differ:
                    continue  # an UPDATE that changed nothing
                if watch.when_changed and not differ & set(watch.when_changed):
                    continue
                changed.append(json.dumps(sorted(differ, key=names.index), ensure_ascii=False))
            stamps.append(change.ts)
            for slot, i in enumerate(carried):
                if new is not None:
                    rows_new[slot].append(new[i])
                if old is not None:
                    rows_old[slot].append(old[i])
        count = len(rows_new[0] if op != "D" else rows_old[0]) if carried else 0
        if not count:
            return []
        head = json.dumps({**watch.head, "o": op}, ensure_ascii=False)[:-1] + ', "ts": '
        params: dict[str, Any] = {"w": watch.name, "head": head, "ts": stamps}
        columns = [(names[i], types[i]) for i in carried]
        arrays, aliases = ["%(ts)s::text[]"], ["ts"]
        for side, values in (("n", rows_new), ("o", rows_old)):
            if (side == "n" and op == "D") or (side == "o" and op == "I"):
                continue
            for slot, _ in enumerate(carried):
                key = f"{side}{slot}"
                params[key] = values[slot]
                arrays.append(f"%({key})s::text[]")
                aliases.append(key)
        if op == "U":
            row = f"'[' || {_object(columns, 'n')} || ',' || {_object(columns, 'o')}"
            if watch.columns is not None:
                params["ch"] = changed
                arrays.append("%(ch)s::text[]")
                aliases.append("ch")
                row += " || ',' || u.ch"
            row += " || ']'"
        else:
            row = _object(columns, "n" if op == "I" else "o")
        cur.execute(
            f"INSERT INTO {self.journal} (watch, body) "
            f"SELECT %(w)s, %(head)s || u.ts || ', \"r\": [' || {row} || ']}}' "
            f"FROM unnest({', '.join(arrays)}) WITH ORDINALITY AS u({', '.join(aliases)}, ord) "
            "ORDER BY u.ord RETURNING id",
            params,
        )
        return [r[0] for r in cur.fetchall()]


def _object(columns: list[tuple[str, str]], side: str) -> str:
    """SQL for a JSON object of the columns of one side (``n``/``o``), each
    value cast from its text to its type and written by to_json()."""
    parts = []
    for slot, (name, type_name) in enumerate(columns):
        key = literal(json.dumps(name, ensure_ascii=False) + ": ").replace("%", "%%")
        cast = type_name.replace("%", "%%")
        sep = "'{' || " if slot == 0 else "',' || "
        parts.append(f"{sep}{key} || coalesce(to_json(u.{side}{slot}::{cast})::text, 'null')")
    return "(" + " || ".join(parts) + " || '}')"


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
