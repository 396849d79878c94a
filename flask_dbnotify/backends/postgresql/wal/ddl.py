"""What WAL capture needs in the database, built without a connection: our
tables (the journal the leader relays into, where the relay stands, what
each watch captures), no trigger of ours, every watched table (and its
partitions) with ``REPLICA IDENTITY FULL``, a publication of the watched
tables, and a logical replication slot with the built-in ``pgoutput``.

No column lists or row filters: UPDATEs and DELETEs need the old row
(``event.old``, ``event.changed``, ``when_changed``), which takes
``REPLICA IDENTITY FULL``, and PostgreSQL 15 then refuses a column list
that leaves any column out. The leader carries only the watch's columns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ....events import Operation
from ..catalog import Catalog, Resolved
from ..common import ident, literal, text_array
from ..ddl import create_tables, drop_trigger, drop_unused, shared_sql

#: The table ``notify(connection=...)`` writes to: published, relayed into
#: the journal like the watched tables' rows, deleted as relayed.
MESSAGES = "dbnotify_wal_messages"
#: What each watch captures (published, so the leader reloads it in its
#: place among the data changes).
DEFINITIONS = "dbnotify_wal_watches"
#: Where the relay stands (one row per slot: the end of the last
#: transaction relayed whole, the one relayed in part and how many of its
#: changes, and why events were missed when its slot was replaced), what
#: each watch captures, and messages on their way.
TABLES = {
    "dbnotify_wal": (
        "slot text PRIMARY KEY, lsn pg_lsn NOT NULL, relayed_at timestamptz, gap text, "
        "part_lsn pg_lsn, part_count bigint"
    ),
    DEFINITIONS: (
        "slot text NOT NULL, watch text NOT NULL, table_schema text NOT NULL, "
        "table_name text NOT NULL, head text NOT NULL, ops text NOT NULL, "
        "columns text[], when_changed text[], PRIMARY KEY (slot, watch)"
    ),
    MESSAGES: "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text NOT NULL",
}
#: Why events were missed, when ``install-triggers`` replaced a lost slot.
GAP = (
    "the replication slot %s was dropped or invalidated, and install-triggers made a new "
    "one: changes committed in between were not captured"
)
OPS = {Operation.INSERT: "I", Operation.UPDATE: "U", Operation.DELETE: "D"}


def head(r: Resolved) -> dict[str, object]:
    """What every journal row of the watch starts with (as triggers write)."""
    return {"v": 1, "t": r.watch.name, "k": list(r.pk)}


def create_slot(slot: str) -> str:
    """The slot, made where missing. It cannot be made in a transaction
    that has written anything: this runs on its own, after the rest."""
    return (
        f"SELECT pg_catalog.pg_create_logical_replication_slot({literal(slot)}, 'pgoutput') "
        f"WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_replication_slots "
        f"WHERE slot_name = {literal(slot)})"
    )


def replace_lost_slot(schema: str, slot: str) -> list[str]:
    """Where install made a slot before that is now missing or invalidated:
    note the gap for the next leader to report, and start the relay's
    position afresh (a new slot's positions may be lower, after a
    failover); then drop an invalidated slot, so that a new one is made.
    Never silently: every process running then hears ``gap=True``."""
    name, wal = literal(slot), ident(schema, "dbnotify_wal")
    usable = (
        f"SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = {name} "
        "AND wal_status IS DISTINCT FROM 'lost'"
    )
    return [
        f"UPDATE {wal} SET lsn = '0/0', part_lsn = NULL, gap = {literal(GAP % slot)} "
        f"WHERE slot = {name} AND NOT EXISTS ({usable})",
        f"INSERT INTO {wal} (slot, lsn) VALUES ({name}, '0/0') ON CONFLICT (slot) DO NOTHING",
        f"SELECT pg_catalog.pg_drop_replication_slot(slot_name) "
        f"FROM pg_catalog.pg_replication_slots WHERE slot_name = {name} AND wal_status = 'lost'",
    ]


def drop_slot(slot: str) -> list[str]:
    """End the leader's session, then drop the slot; again if a leader took
    it meanwhile (one may be connecting while this runs: the others try
    again a second later), for up to 10 seconds."""
    name = literal(slot)
    return [
        f"""DO $dbnotify$
BEGIN
  FOR attempt IN 1..100 LOOP
    PERFORM pg_catalog.pg_terminate_backend(active_pid, 5000)
      FROM pg_catalog.pg_replication_slots WHERE slot_name = {name} AND active_pid IS NOT NULL;
    BEGIN
      PERFORM pg_catalog.pg_drop_replication_slot(slot_name)
        FROM pg_catalog.pg_replication_slots WHERE slot_name = {name};
      RETURN;
    EXCEPTION WHEN object_in_use THEN
      PERFORM pg_catalog.pg_sleep(0.1);
    END;
  END LOOP;
  RAISE EXCEPTION 'the replication slot % stays in use: stop the application first', {name};
END
$dbnotify$"""
    ]


def definition(r: Resolved) -> tuple[str, str, list[str] | None, list[str] | None]:
    """What a watch captures, as ``dbnotify_wal_watches`` records it:
    (head, ops, columns, when_changed)."""
    w = r.watch
    return (
        json.dumps(head(r), ensure_ascii=False),
        "".join(OPS[op] for op in w.operations if op in OPS),
        None if w.columns is None else list(w.columns),
        None if w.when_changed is None else list(w.when_changed),
    )


def install_plan(
    catalog: Catalog,
    resolved: Sequence[Resolved],
    schema: str,
    slot: str,
    publication_exists: bool,
) -> list[str]:
    """The statements that make the database capture ``resolved`` through
    ``slot`` (the publication has the slot's name); the last creates the
    slot and must run outside the others' transaction."""
    statements = shared_sql(catalog, schema) + create_tables(catalog, schema, TABLES)
    # No trigger of ours captures a watched table in this mode (one left by
    # triggers mode would send its changes twice). Other tables' triggers
    # may be another app's, in triggers mode: they stay.
    covered = {oid for r in resolved for oid, _, _ in r.tree}
    drops = [drop_trigger(o) for o in catalog.triggers if o.table_oid in covered]
    statements += drops + drop_unused(catalog, set(), drops, schema)
    watches = ident(schema, DEFINITIONS)
    statements.append(f"DELETE FROM {watches} WHERE slot = {literal(slot)}")
    tables = []
    for r in resolved:
        head_text, ops, carried, changed = definition(r)
        values = [
            literal(slot),
            literal(r.watch.name),
            literal(r.schema),
            literal(r.table),
            literal(head_text),
            literal(ops),
            "NULL" if carried is None else text_array(carried),
            "NULL" if changed is None else text_array(changed),
        ]
        statements.append(f"INSERT INTO {watches} VALUES ({', '.join(values)})")
        for _, table_schema, table in r.tree:
            statements.append(f"ALTER TABLE {ident(table_schema, table)} REPLICA IDENTITY FULL")
        tables.append(ident(r.schema, r.table))
    # The watches' definitions are published too: the leader reads a change
    # of them in its place among the data changes, and reloads them.
    tables += [watches, ident(schema, MESSAGES)]
    publication, listed = ident(slot), ", ".join(tables)
    if publication_exists:
        statements.append(f"ALTER PUBLICATION {publication} SET TABLE {listed}")
    else:
        statements.append(
            f"CREATE PUBLICATION {publication} FOR TABLE {listed} "
            "WITH (publish = 'insert, update, delete, truncate', "
            "publish_via_partition_root = true)"
        )
    statements += replace_lost_slot(schema, slot)
    statements.append(create_slot(slot))
    return statements


def uninstall_plan(catalog: Catalog, schema: str, slot: str, everything: bool) -> list[str]:
    """Drop the publication, the slot and the watches' definitions (with
    ``everything``, every object of ours). ``REPLICA IDENTITY FULL`` stays:
    another replication may rely on it."""
    # The slot first: a leader streaming it would stop at a missing
    # publication, and lead again before the slot went.
    statements = [
        *drop_slot(slot),
        f"DROP PUBLICATION IF EXISTS {ident(slot)}",
        f"DELETE FROM {ident(schema, DEFINITIONS)} WHERE slot = {literal(slot)}"
        if DEFINITIONS in catalog.tables
        else "",
        # Stopped on purpose: a later install starts afresh, with no gap.
        f"DELETE FROM {ident(schema, 'dbnotify_wal')} WHERE slot = {literal(slot)}"
        if "dbnotify_wal" in catalog.tables
        else "",
    ]
    if everything:
        statements += [f"DROP TABLE IF EXISTS {ident(schema, name)}" for name in TABLES]
        statements += [
            f"DROP TABLE IF EXISTS {ident(schema, name)}"
            for name in catalog.tables
            if name not in TABLES
        ]
    return [s for s in statements if s]
