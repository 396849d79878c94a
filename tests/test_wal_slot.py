"""WAL capture when its replication slot is lost: dropped, or invalidated
because it held more WAL than the server keeps. What was committed in
between cannot be delivered; it must never pass silently. ``status``
reports the slot, the leader logs it, ``install-triggers`` makes a new
slot, and every running process then hears ``listener_connected`` with
``gap=True`` before the new slot's events."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from flask import Flask

from flask_dbnotify import (
    ChangeEvent,
    DBNotify,
    listener_connected,
    notification_received,
    row_changed,
)
from flask_dbnotify.backends.postgresql.wal import leader

from ._helpers import SQL, Recorder, listening, marker, poll_until
from .test_wal import ORDERS, MakeApp

GAP = {"reconnect": True, "gap": True}


@pytest.fixture()
def timeline() -> Iterator[Recorder]:
    """Row events, listener_connected's arguments and messages, in one
    order."""
    rec = Recorder()
    with (
        row_changed.connected_to(rec),
        listener_connected.connected_to(rec),
        notification_received.connected_to(rec),
    ):
        yield rec


def started(wal_app: MakeApp, wal_sql: SQL, timeline: Recorder) -> tuple[Flask, DBNotify, str]:
    wal_sql(ORDERS)
    app, ext = listening(wal_app, "orders")
    timeline.wait_for(1, "listener_connected")
    slot = app.config["DBNOTIFY_SLOT"]
    wal_sql("INSERT INTO orders VALUES (1, 'before', 1)")
    timeline.wait_for(2, "the row committed before the slot was lost")
    return app, ext, slot


def drop_slot(wal_sql: SQL, slot: str) -> None:
    """What an operator might do: end the leader's session, drop its slot."""
    wal_sql(
        "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots "
        "WHERE slot_name = %s AND active_pid IS NOT NULL",
        (slot,),
    )
    poll_until(
        lambda: _drop(wal_sql, slot),
        "the slot to be dropped (the leader may take it again meanwhile)",
    )


def _drop(wal_sql: SQL, slot: str) -> bool:
    try:
        wal_sql("SELECT pg_drop_replication_slot(%s)", (slot,))
    except psycopg2.errors.ObjectInUse:
        wal_sql(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = %s AND active_pid IS NOT NULL",
            (slot,),
        )
        return False
    return True


def after_gap(items: list[Any]) -> list[Any]:
    """What arrived from the first gap on, rows as (op, pk)."""
    start = items.index(GAP)
    return [(e.op.value, e.pk) if isinstance(e, ChangeEvent) else e for e in items[start:]]


def row_keys(timeline: Recorder) -> list[Any]:
    return [e.pk for e in timeline.items if isinstance(e, ChangeEvent)]


def test_a_dropped_slot_is_reported_and_replaced_with_a_gap(
    wal_app: MakeApp, wal_sql: SQL, timeline: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    app, ext, slot = started(wal_app, wal_sql, timeline)
    leader._limited.reset()  # an earlier test may have logged the same line
    with caplog.at_level(logging.ERROR, "flask_dbnotify"):
        drop_slot(wal_sql, slot)
        wal_sql("INSERT INTO orders VALUES (2, 'while no slot', 1)")
        status = ext.status(app)
        assert status.health["slot"] == f"{slot}: MISSING"
        assert any("does not exist" in w and "gap=True" in w for w in status.warnings)
        poll_until(
            lambda: "does not exist or was invalidated" in caplog.text,
            "the leader to log that the slot is gone",
        )
    assert GAP not in timeline.items, "no gap reported before a new slot exists"

    ext.install_triggers(app)
    wal_sql("INSERT INTO orders VALUES (3, 'after', 1)")
    timeline.wait_for(4, "the gap, then the row committed after the new slot")
    assert after_gap(timeline.items) == [GAP, ("INSERT", 3)]
    assert row_keys(timeline) == [1, 3]
    # Reported once: the new slot's leader cleared it.
    assert not any("install-triggers made" in w for w in ext.status(app).warnings)
    timeline.assert_no_more(4, marker(ext, app))


def test_an_invalidated_slot_is_replaced_with_a_gap_when_no_process_ran(
    wal_app: MakeApp, wal_sql: SQL, timeline: Recorder, logical_url: str
) -> None:
    """The app stopped; writes went on until the slot held more WAL than
    max_slot_wal_keep_size, and a checkpoint invalidated it. install makes
    a new one; the first process to start reports the gap, then delivers
    the new slot's events."""
    app, ext, slot = started(wal_app, wal_sql, timeline)
    ext.close(app)
    admin = psycopg2.connect(logical_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
            cur.execute("SELECT pg_reload_conf()")
        wal_sql("INSERT INTO orders VALUES (2, 'lost with the slot', 1)")
        for _ in range(4):
            # More than a segment of WAL each time, then a checkpoint that
            # removes what the slot needed.
            wal_sql("CREATE TABLE IF NOT EXISTS junk (t text)")
            wal_sql("INSERT INTO junk SELECT repeat('x', 1000) FROM generate_series(1, 20000)")
            wal_sql("SELECT pg_switch_wal()")
            wal_sql("CHECKPOINT")
            (state,) = wal_sql(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            )[0]
            if state == "lost":
                break
        assert state == "lost"
    finally:
        with admin.cursor() as cur:
            cur.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            cur.execute("SELECT pg_reload_conf()")
        admin.close()
    assert any("invalidated" in w for w in ext.status(app).warnings)

    ext.install_triggers(app)
    assert wal_sql(
        "SELECT wal_status <> 'lost' FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ) == [(True,)]
    wal_sql("INSERT INTO orders VALUES (3, 'after', 1)")
    ext.start(app)
    timeline.wait_for(5, "a new connect, the gap, and the row committed after")
    assert after_gap(timeline.items) == [GAP, ("INSERT", 3)]
    assert row_keys(timeline) == [1, 3]


def test_uninstall_then_install_starts_afresh_without_a_gap(
    wal_app: MakeApp, wal_sql: SQL, timeline: Recorder
) -> None:
    """Stopping capture on purpose is not a gap: uninstall forgets the
    relay's position with the slot."""
    app, ext, slot = started(wal_app, wal_sql, timeline)
    ext.close(app)
    ext.uninstall_triggers(app)
    ext.install_triggers(app)
    ext.start(app)
    wal_sql("INSERT INTO orders VALUES (2, 'after', 1)")
    timeline.wait_for(4, "a new connect and the row")
    assert GAP not in timeline.items
    assert row_keys(timeline) == [1, 2]
