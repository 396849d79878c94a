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
import os
import select
import threading
import time
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras

from ...._log import RateLimited
from ...common import reason
from .. import pgoutput
from .ddl import MESSAGES
from .relay import Change, Relay, Sent, Truncated

log = logging.getLogger(__name__)
_limited = RateLimited(log, interval=60.0)

#: How often a process that does not lead tries to.
RETRY = 1.0
#: How often an idle leader tells the server where it stands.
FEEDBACK_EVERY = 5.0
#: The table of what each watch captures (published with the watched ones).
DEFINITIONS = "dbnotify_wal_watches"


class Leader:
    """Leads when it can; one per app in each process."""

    def __init__(self, connect: dict[str, Any], schema: str, slot: str) -> None:
        self.connect = connect
        self.schema = schema
        self.slot = slot
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
            try:
                devnull = os.open(os.devnull, os.O_RDWR)
                try:
                    os.dup2(devnull, conn.fileno())
                finally:
                    os.close(devnull)
            except (OSError, psycopg2.Error):
                pass
        self._thread = None

    # -- the thread -----------------------------------------------------------

    def _run(self) -> None:
        stop = self._stop
        while not stop.is_set():
            try:
                self._lead(stop)
            except Exception as exc:  # noqa: BLE001 - retried
                _limited.warning("WAL capture: the leader stopped: %s (retrying)", reason(exc))
            finally:
                self.leading = False
                for conn in self._conns:
                    try:
                        conn.close()
                    except psycopg2.Error:
                        pass
                self._conns = []
            stop.wait(RETRY)

    def _lead(self, stop: threading.Event) -> None:
        relay_conn = psycopg2.connect(**self.connect, application_name="flask-dbnotify relay")
        self._conns.append(relay_conn)
        relay = Relay(relay_conn, self.schema, self.slot)
        relayed = relay.load()
        repl = psycopg2.connect(
            **self.connect,
            application_name="flask-dbnotify leader",
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
        )
        self._conns.append(repl)
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
        except psycopg2.errors.UndefinedObject:
            _limited.warning(
                "WAL capture: the replication slot %s does not exist: run `flask dbnotify "
                "install-triggers` (what was committed while it was missing is not delivered)",
                self.slot,
            )
            return
        self.leading = True
        log.info("WAL capture: this process leads slot %s", self.slot)
        Stream(cur, relay, relayed).run(stop)


class Stream:
    """One leader's reading of the slot, transaction by transaction."""

    def __init__(self, cur: Any, relay: Relay, relayed: int) -> None:
        self.cur = cur
        self.relay = relay
        self.relayed = relayed
        self.relations: dict[int, pgoutput.Relation] = {}
        self.changes: list[Any] = []
        self.begin: pgoutput.Begin | None = None
        self.flushed = 0

    def run(self, stop: threading.Event) -> None:
        cur = self.cur
        conn = cur.connection
        last_feedback = time.monotonic()
        while not stop.is_set():
            message = cur.read_message()
            if message is None:
                if time.monotonic() - last_feedback >= FEEDBACK_EVERY:
                    cur.send_feedback(flush_lsn=self.flushed)
                    last_feedback = time.monotonic()
                select.select([conn], [], [], 0.5)
                continue
            if self.handle(pgoutput.parse(message.payload)):
                cur.send_feedback(flush_lsn=self.flushed)
                last_feedback = time.monotonic()

    def handle(self, record: pgoutput.Record) -> bool:
        """Take one record; True when a transaction ended (and the position
        may be confirmed)."""
        if isinstance(record, pgoutput.Relation):
            self.relations[record.oid] = record
            self.relay.forget_types(record)
        elif isinstance(record, pgoutput.Begin):
            self.begin, self.changes = record, []
        elif isinstance(record, pgoutput.Insert):
            relation = self.relations[record.relation_oid]
            if relation.name == MESSAGES and relation.schema == self.relay.schema:
                self.changes.append(Sent(record.new[0], record.new[1]))
            else:
                self.changes.append(Change(relation, "I", record.new, None))
        elif isinstance(record, pgoutput.Update):
            relation = self.relations[record.relation_oid]
            old = record.old if record.old is not None else record.key
            if old is None or record.old is None:
                _limited.warning(
                    "WAL capture: %s.%s has no REPLICA IDENTITY FULL: UPDATEs arrive without "
                    "their old row; run `flask dbnotify install-triggers`",
                    relation.schema,
                    relation.name,
                )
                old = tuple(None for _ in record.new)
            self.changes.append(Change(relation, "U", record.new, old))
        elif isinstance(record, pgoutput.Delete):
            old = record.old if record.old is not None else record.key
            self.changes.append(Change(self.relations[record.relation_oid], "D", None, old))
        elif isinstance(record, pgoutput.Truncate):
            tables = [
                (self.relations[oid].schema, self.relations[oid].name)
                for oid in record.relation_oids
                if oid in self.relations
            ]
            self.changes.append(Truncated(tables))
        elif isinstance(record, pgoutput.Commit):
            if record.end_lsn > self.relayed and self.changes and self.begin is not None:
                self.relay.relay(self.changes, self.begin.commit_time, record.end_lsn)
                self.relayed = record.end_lsn
            if any(isinstance(c, Change) and c.relation.name == DEFINITIONS for c in self.changes):
                # install-triggers changed what the watches capture: from
                # the next transaction on, as it says.
                self.relay.load_watches()
            self.flushed = max(self.flushed, record.end_lsn)
            self.changes, self.begin = [], None
            return True
        return False
