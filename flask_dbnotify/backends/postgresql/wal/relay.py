"""Relaying one committed transaction from the WAL into the journal.

The leader hands :class:`Relay` each transaction as pgoutput decoded it;
in one transaction of its own, the relay appends the watched changes to
``dbnotify_journal`` in commit order, as durable triggers would have
written them, records the transaction's commit position in
``dbnotify_wal``, and notifies the journal ids, as durable triggers do.
Every other process's listener then reads them the way it reads durable
events; this process's gets them handed over (:class:`Handoff`).

Values arrive as the text PostgreSQL's output functions write. For the
built-in types of :mod:`.tojson` the relay turns that text into JSON
itself; a run of rows with a column of any other type is turned into
JSON by the server (``to_json(value::type)``); :mod:`.shape` builds
either. Either way an event carries exactly what triggers mode would have
sent.

How the rows travel, in one round trip when they can, is
:mod:`.writer`'s business.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from .. import pgoutput
from ..common import CHANNEL, ident
from . import tojson
from .ddl import DEFINITIONS, MESSAGES
from .shape import Change as Change  # what the leader hands over, under the names it uses
from .shape import Layout, WatchDef, build, select, server_insert
from .shape import Sent as Sent
from .shape import Truncated as Truncated
from .writer import JournalWriter

#: Statements of every relay transaction, prepared once per session (a
#: prepared statement outlives a transaction rolled back): the relay's
#: position, one row per slot; and a notification of the journal ids the
#: transaction wrote (found through the (xid, id) index), which it returns.
_PREPARED = {
    "dbnotify_relay_record": (
        "(text, pg_lsn, pg_lsn, bigint) AS INSERT INTO {wal} "
        "(slot, lsn, relayed_at, part_lsn, part_count) VALUES ($1, $2, now(), $3, $4) "
        "ON CONFLICT (slot) DO UPDATE SET lsn = excluded.lsn, relayed_at = excluded.relayed_at, "
        "part_lsn = excluded.part_lsn, part_count = excluded.part_count"
    ),
    "dbnotify_relay_notify": (
        "(text, text) AS SELECT lo.id, hi.id, pg_current_xact_id()::text, "
        "pg_notify($1, '{{\"v\": 1, \"J\": [' || lo.id || ', ' || hi.id "
        "|| '], \"x\": ' || pg_current_xact_id() || ', \"j\": ' || to_json($2) || '}}') "
        "FROM (SELECT id FROM {journal} WHERE xid = pg_current_xact_id() ORDER BY id LIMIT 1) "
        "AS lo, (SELECT id FROM {journal} WHERE xid = pg_current_xact_id() "
        "ORDER BY id DESC LIMIT 1) AS hi"
    ),
}
#: What the WAL sender's session reports that the text of values depends on.
STREAM_SETTINGS = ("DateStyle", "TimeZone")


class Handoff(Protocol):
    """Where a relay's rows go as well (this process's listener)."""

    def expect(self) -> None:
        """A relay begins."""

    def put(self, rows: tuple[int, int, int, list[str] | None] | None) -> None:
        """The relay ended: committed, with journal ids ``lo..hi`` of
        transaction ``xid`` and their bodies in order (None: some were
        built on the server, read them back), or None (it wrote no rows,
        or failed)."""


class Part(NamedTuple):
    """A transaction relayed in part: its commit position (``final_lsn`` of
    its Begin) and how many of its changes, unwatched ones included."""

    lsn: int
    changes: int


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class Relay:
    """Writes transactions to the journal through ``conn`` (a psycopg2
    connection of the leader's own, put in autocommit)."""

    def __init__(self, conn: Any, schema: str, slot: str, handoff: Handoff | None = None) -> None:
        conn.autocommit = True
        self.conn = conn
        #: Where a relay's rows go as well when it knows them all (this
        #: process's listener, which then need not read them back).
        self.handoff = handoff
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

    def load(self) -> tuple[int, Part | None]:
        """Read the watches and where the relay stands: the end of the last
        transaction relayed whole (0 if none), and the one relayed in part.
        A gap that install noted when it replaced a lost slot is journaled
        first, for every listener to report."""
        self.load_watches()
        with self.conn.cursor() as cur:
            if not self._prepared:
                for name, text in _PREPARED.items():
                    cur.execute(f"PREPARE {name}" + text.format(wal=self.wal, journal=self.journal))
                self._prepared = True
            cur.execute("BEGIN")
            cur.execute(
                f"SELECT (lsn - '0/0')::bigint, gap, (part_lsn - '0/0')::bigint, part_count "
                f"FROM {self.wal} WHERE slot = %s FOR UPDATE",
                (self.slot,),
            )
            row = cur.fetchone()
            if row is not None and row[1] is not None:
                cur.execute(
                    f"INSERT INTO {self.journal} (body) VALUES (%s)",
                    (json.dumps({"v": 1, "gap": row[1]}, ensure_ascii=False),),
                )
                cur.execute("EXECUTE dbnotify_relay_notify(%s, %s)", (CHANNEL, self.schema))
                cur.execute(f"UPDATE {self.wal} SET gap = NULL WHERE slot = %s", (self.slot,))
            cur.execute("COMMIT")
        if row is None:
            return 0, None
        return int(row[0]), None if row[2] is None else Part(int(row[2]), int(row[3]))

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

    def relay(
        self, changes: Sequence[Change | Truncated | Sent], end_lsn: int, part: Part | None = None
    ) -> None:
        """Append ``changes`` (of one or more committed transactions, in
        commit order, and with ``part`` the first of the next) to the
        journal and record ``end_lsn``, the end of the last one relayed
        whole, and ``part``, in one transaction; then hand the rows over
        when every body was built here."""
        handoff = self.handoff
        if handoff is None:
            self._relay(changes, end_lsn, part)
            return
        handoff.expect()
        rows = None
        try:
            rows = self._relay(changes, end_lsn, part)
        finally:
            handoff.put(rows)

    def _relay(
        self, changes: Sequence[Change | Truncated | Sent], end_lsn: int, part: Part | None
    ) -> tuple[int, int, int, list[str] | None] | None:
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
            ids = journal.run(self._finish(cur, bool(journal.steps), sent, end_lsn, part))
        if ids is None:
            return None
        lo, hi, xid = ids
        bodies = journal.bodies()
        if bodies is not None and hi - lo + 1 != len(bodies):
            bodies = None  # another session's row came between: read them back
        return lo, hi, xid, bodies

    def _finish(
        self, cur: Any, written: bool, sent: list[int], end_lsn: int, part: Part | None
    ) -> str:
        """What ends a relay: record the position, delete the messages
        relayed and notify the journal rows."""
        statements = ["EXECUTE dbnotify_relay_record(%(slot)s, %(lsn)s, %(part)s, %(done)s)"]
        params: dict[str, Any] = {
            "slot": self.slot,
            "lsn": lsn_text(end_lsn),
            "part": None if part is None else lsn_text(part.lsn),
            "done": None if part is None else part.changes,
        }
        if sent:
            statements.append(f"DELETE FROM {self.messages} WHERE id = ANY(%(sent)s::bigint[])")
            params["sent"] = sent
        if written:
            statements.append("EXECUTE dbnotify_relay_notify(%(channel)s, %(schema)s)")
            params["channel"] = CHANNEL
            params["schema"] = self.schema
        return str(cur.mogrify("; ".join(statements), params).decode())

    def _truncate(self, journal: JournalWriter, run: list[Truncated]) -> None:
        for truncate in run:
            for schema, name in truncate.tables:
                watch = self.watches.get((schema, name))
                if watch is not None:
                    head = json.dumps({**watch.head, "o": "T"}, ensure_ascii=False)[:-1]
                    journal.add(watch.name, [head + ', "ts": ' + truncate.ts + "}"])

    def _rows(self, journal: JournalWriter, run: list[Change]) -> None:
        first = run[0]
        relation, op = first.relation, first.op
        watch = self.watches.get((relation.schema, relation.name))
        if watch is None or op not in watch.ops:
            return
        names = [c.name for c in relation.columns]
        rows = select(watch, names, op, run)
        shape = Layout.of(watch, names, op)
        if not shape.carried or not rows.stamps:
            return
        converters = [self.converters.get(relation.columns[i].type_oid) for i in shape.carried]
        bodies = build(shape, converters, rows)
        if bodies is not None:
            journal.add(watch.name, bodies)
        else:
            types = self.type_names(relation)
            journal.insert(*server_insert(self.journal, watch.name, shape, rows, types))


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
