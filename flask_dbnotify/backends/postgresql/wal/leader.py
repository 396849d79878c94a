"""The leader: the one process of the app that streams the slot.

Every process of the app runs a :class:`Leader` thread next to its
listener. Each tries to start streaming the slot; PostgreSQL lets one
connection stream a slot at a time, so one wins and the others try again
every :data:`RETRY` seconds. When the leader dies its session ends, and
another process takes over from the position the slot confirmed.

The leader relays each committed transaction (:mod:`.relay`) and only
then confirms its position to the server, so a transaction is relayed
once: a leader that dies between the two leaves the position recorded in
``dbnotify_wal`` with the journal rows, and its successor skips what it
finds there.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras

from ...._context import SETTING as CONTEXT_SETTING
from ...._log import RateLimited
from ...common import reason
from .. import pgoutput
from ..connection import LIVENESS, discard
from .ddl import DEFINITIONS, MESSAGES
from .relay import Change, Handoff, Part, Relay, Sent, Truncated
from .shape import context_text

log = logging.getLogger(__name__)
_limited = RateLimited(log, interval=60.0)

#: What to do about what the server says when a process cannot lead.
_HINTS = (
    (
        ("replication role", "start WAL sender", "start walsender"),
        "; the role of DBNOTIFY_DATABASE_URI needs the REPLICATION attribute "
        "(ALTER ROLE ... REPLICATION)",
    ),
    (
        ("max_wal_senders",),
        "; no WAL sender is free: raise max_wal_senders (and restart the server), "
        "or end a replication connection no longer needed",
    ),
)
#: How often a process that does not lead tries to.
RETRY = 1.0
#: A batch is relayed once it holds this many changes, or when the stream
#: pauses.
BATCH_ROWS = 20000
#: Under load (the last relay carried more than one transaction), what
#: arrives within this many seconds of a relay waits to be relayed with
#: what comes next: fewer and larger relays (each is a transaction, a flush
#: to disk, and a journal read in every process). One transaction at a
#: time is relayed at once.
GATHER = 0.002
#: How often an idle leader tells the server where it stands.
FEEDBACK_EVERY = 5.0


class Leader:
    """Leads when it can; one per app in each process."""

    def __init__(
        self, connect: dict[str, Any], schema: str, slot: str, handoff: Handoff | None = None
    ) -> None:
        # A server that stops answering is noticed, as by the listener's
        # stream; the URL's own settings win.
        self.connect = {**LIVENESS, **connect}
        self.schema = schema
        self.slot = slot
        self.handoff = handoff
        self.leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: list[Any] = []

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"dbnotify-wal[{self.slot}]", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def discard(self) -> None:
        """In a forked child: drop the parent's connections untouched."""
        for conn in self._conns:
            discard(conn)
        self._conns = []
        self._thread = None

    # -- the thread -----------------------------------------------------------

    def _run(self) -> None:
        stop = self._stop
        while not stop.is_set():
            try:
                self._lead(stop)
            except Exception as exc:  # noqa: BLE001 - retried
                why = reason(exc)
                hint = next((h for words, h in _HINTS if any(w in why for w in words)), "")
                _limited.warning("WAL capture: the leader stopped: %s%s (retrying)", why, hint)
            finally:
                self.leading = False
                for conn in self._conns:
                    try:
                        conn.close()
                    except psycopg2.Error:
                        pass
                self._conns = []
            stop.wait(RETRY)

    def _slot_taken(self) -> bool:
        """Whether another session streams the slot (one short connection,
        rather than a relay and a replication connection each time)."""
        conn = psycopg2.connect(**self.connect, application_name="flask-dbnotify relay")
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
                    (self.slot,),
                )
                row = cur.fetchone()
            return bool(row and row[0])
        finally:
            conn.close()

    def _lead(self, stop: threading.Event) -> None:
        if self._slot_taken():
            return  # Another process leads.
        relay_conn = psycopg2.connect(**self.connect, application_name="flask-dbnotify relay")
        self._conns.append(relay_conn)
        relay = Relay(relay_conn, self.schema, self.slot, self.handoff)
        relayed, part = relay.load()
        repl = psycopg2.connect(
            **self.connect,
            application_name="flask-dbnotify leader",
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
        )
        self._conns.append(repl)
        relay.set_up_stream(repl)
        cur = repl.cursor()
        try:
            cur.start_replication(
                slot_name=self.slot,
                decode=False,
                options={
                    "proto_version": "1",
                    "publication_names": self.slot,
                    "messages": "true",
                },
            )
        except psycopg2.errors.ObjectInUse:
            return  # Another process leads.
        except (psycopg2.errors.UndefinedObject, psycopg2.errors.ObjectNotInPrerequisiteState):
            # Dropped, or invalidated (its WAL removed): never made anew
            # here, as if nothing had been missed.
            _limited.log(
                logging.ERROR,
                "WAL capture: the replication slot %s does not exist or was invalidated: "
                "changes are not captured; run `flask dbnotify install-triggers` to make a new "
                "one (every process then hears listener_connected with gap=True)",
                self.slot,
            )
            return
        self.leading = True
        log.info("WAL capture: this process leads slot %s", self.slot)
        Stream(cur, relay, relayed, part).run(stop)


class Stream:
    """One leader's reading of the slot. Committed transactions are relayed
    in batches: everything that has arrived when the stream pauses, or
    :data:`BATCH_ROWS` changes, in one relay transaction, whose commit then
    confirms the last one's position. A transaction of more changes is
    relayed in parts as they arrive (the server sends only committed
    transactions), so that listeners start on it sooner; the relay records
    how many of its changes it holds, and a successor skips those."""

    def __init__(self, cur: Any, relay: Relay, relayed: int, part: Part | None) -> None:
        self.cur = cur
        self.relay = relay
        self.relayed = relayed
        self.relations: dict[int, pgoutput.Relation] = {}
        #: The current transaction's changes not relayed yet, and its commit
        #: time as text; its commit position, how many of its changes were
        #: relayed (or skipped), and how many are still to skip.
        self.changes: list[Any] = []
        #: What follows ``"ts": `` in the bodies of the current transaction's
        #: changes: its commit time, then its context once it sets one.
        self.commit_ts = self.ts = ""
        self.txn = 0
        self.txn_done = 0
        self.skip = 0
        #: A transaction relayed in part before this leader.
        self.part = part
        #: Committed transactions' changes not relayed yet, and the last end.
        self.pending: list[Any] = []
        self.pending_end = 0
        self.flushed = 0
        #: When the last relay was, and whether it carried more than one
        #: transaction; how many are pending.
        self.relayed_at = 0.0
        self.busy = False
        self.pending_txns = 0

    def run(self, stop: threading.Event) -> None:
        cur = self.cur
        conn = cur.connection
        last_feedback = time.monotonic()
        while not stop.is_set():
            message = cur.read_message()
            full = False
            if message is not None:
                self.handle(pgoutput.parse(message.payload))
                full = len(self.pending) + len(self.changes) >= BATCH_ROWS
                if not full:
                    continue
            elif self.pending and self._gather(conn):
                continue
            if self.flush(full) or time.monotonic() - last_feedback >= FEEDBACK_EVERY:
                cur.send_feedback(flush_lsn=self.flushed, force=True)
                last_feedback = time.monotonic()
            if message is None:
                select.select([conn], [], [], 0.5)

    def _gather(self, conn: Any) -> bool:
        """Whether more arrived while waiting out :data:`GATHER` since the
        last relay, under load (False at once otherwise)."""
        if not self.busy:
            return False
        left = self.relayed_at + GATHER - time.monotonic()
        return left > 0 and bool(select.select([conn], [], [], left)[0])

    def flush(self, full: bool = False) -> bool:
        """Relay what is pending (when ``full``, with what has arrived of
        the current transaction); whether the confirmed position moved."""
        batch = self.pending
        if full and self.changes:
            batch = self.pending + self.changes
            self.txn_done += len(self.changes)
            self.changes = []
        part = Part(self.txn, self.txn_done) if self.txn_done else None
        if batch:
            self.relay.relay(batch, self.pending_end, part)
            self.relayed = max(self.relayed, self.pending_end)
            self.relayed_at = time.monotonic()
            self.busy, self.pending_txns = self.pending_txns > 1, 0
        moved = self.pending_end > self.flushed
        self.flushed, self.pending = self.pending_end, []
        return moved

    def add(self, change: Any) -> None:
        """A change of the current transaction (unless a predecessor relayed it)."""
        if self.skip:
            self.skip -= 1
            self.txn_done += 1
        else:
            self.changes.append(change)

    def handle(self, record: pgoutput.Record) -> None:
        """Take one record."""
        if isinstance(record, pgoutput.Relation):
            self.relations[record.oid] = record
            self.relay.forget_types(record)
        elif isinstance(record, pgoutput.Begin):
            self.begin(record)
        elif isinstance(record, pgoutput.Message):
            self.message(record)
        elif isinstance(record, pgoutput.Insert):
            relation = self.relations[record.relation_oid]
            if relation.name == MESSAGES and relation.schema == self.relay.schema:
                self.add(Sent(record.new[0], record.new[1], self.ts))
            else:
                self.add(Change(relation, "I", record.new, None, self.ts))
        elif isinstance(record, pgoutput.Update):
            self.update(record)
        elif isinstance(record, pgoutput.Delete):
            old = record.old if record.old is not None else record.key
            relation = self.relations[record.relation_oid]
            self.add(Change(relation, "D", None, old, self.ts))
        elif isinstance(record, pgoutput.Truncate):
            tables = [
                (self.relations[oid].schema, self.relations[oid].name)
                for oid in record.relation_oids
                if oid in self.relations
            ]
            self.add(Truncated(tables, self.ts))
        elif isinstance(record, pgoutput.Commit):
            self.commit(record)

    def begin(self, record: pgoutput.Begin) -> None:
        self.changes = []
        self.commit_ts = self.ts = f"{record.commit_time.timestamp():.6f}"
        self.txn, self.txn_done = record.final_lsn, 0
        part = self.part
        self.skip = part.changes if part is not None and part.lsn == record.final_lsn else 0

    def message(self, record: pgoutput.Message) -> None:
        """A context (``set_context()``) for the transaction's later changes."""
        if record.transactional and record.prefix == CONTEXT_SETTING:
            self.ts = self.commit_ts + context_text(record.content)

    def update(self, record: pgoutput.Update) -> None:
        relation = self.relations[record.relation_oid]
        old = record.old
        if old is None:
            _limited.warning(
                "WAL capture: %s.%s has no REPLICA IDENTITY FULL: UPDATEs arrive without "
                "their old row; run `flask dbnotify install-triggers`",
                relation.schema,
                relation.name,
            )
            old = tuple(None for _ in record.new)
        self.add(Change(relation, "U", record.new, old, self.ts))

    def commit(self, record: pgoutput.Commit) -> None:
        if record.end_lsn > self.relayed:
            self.pending += self.changes
            self.pending_txns += 1
        self.pending_end = max(self.pending_end, record.end_lsn)
        self.txn_done = self.skip = 0
        if any(isinstance(c, Change) and c.relation.name == DEFINITIONS for c in self.changes):
            # install-triggers changed what the watches capture: relay what
            # came before it as it was, then read them anew.
            self.flush()
            self.relay.load_watches()
        self.changes = []
