"""The listener on a real PostgreSQL: its dedicated connection, foreign
payloads, reconnecting, and fork()."""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flask_dbnotify import (
    ChangeEvent,
    DBNotify,
    listener_connected,
    listener_disconnected,
    row_changed,
)

from ._helpers import (
    SQL,
    WAIT,
    Recorder,
    listener_backends,
    orders_app,
    poll_until,
    wait_for_backends,
)

MakeApp = Callable[..., tuple[Flask, DBNotify]]


def test_listener_connection_is_dedicated(make_app: MakeApp, sql: SQL) -> None:
    """Each running listener has exactly one session of its own, idle (not in
    a transaction), having run nothing but LISTEN; stop() ends it."""
    wait_for_backends(sql, 0, "before any start")
    app1, ext1 = orders_app(make_app, sql)
    app2, ext2 = make_app()
    ext2.watch("orders")

    ext1.start(app1)
    ((pid1, state, query),) = listener_backends(sql)
    assert state == "idle", f"listener session is {state!r}"
    assert query.upper().startswith("LISTEN"), query

    ext2.start(app2)
    rows = listener_backends(sql)
    assert len(rows) == 2, rows
    assert {state for _, state, _ in rows} == {"idle"}, rows
    assert pid1 in {pid for pid, _, _ in rows}

    # Delivering events must not leave the session inside a transaction.
    got = Recorder()
    with row_changed.connected_to(got):
        sql("INSERT INTO orders VALUES (1, 'x')")
        got.wait_for(2, "the row in both apps")
    assert {state for _, state, _ in listener_backends(sql)} == {"idle"}

    ext1.stop(app1)
    ((pid2, _, _),) = wait_for_backends(sql, 1, "after stopping app 1")
    assert pid2 != pid1
    ext2.stop(app2)
    wait_for_backends(sql, 0, "after stopping both apps")


def test_foreign_and_malformed_payloads_are_skipped(
    make_app: MakeApp, sql: SQL, events: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """Notifications on our channel that are not ours are skipped, logged
    once however many come (rate-limited); events after them arrive."""
    from flask_dbnotify.backends.postgresql import journal

    journal.skipped.reset()
    caplog.set_level(logging.WARNING, logger="flask_dbnotify")
    app, ext = orders_app(make_app, sql)
    ext.start(app)
    sql("SELECT pg_notify('dbnotify', 'garbage')")
    sql("""SELECT pg_notify('dbnotify', '{"v":99}')""")
    sql("""SELECT pg_notify('dbnotify', '{"v":1,"t":"orders"}')""")
    sql("SELECT pg_notify('dbnotify', '[1, 2]')")
    # Well-formed JSON of the right shape with wrong insides: an UPDATE row
    # that is not [new, old], and a timestamp no datetime can hold.
    head = '{"v":1,"t":"orders","k":["id"],'
    sql("SELECT pg_notify('dbnotify', %s)", (head + '"o":"U","ts":1,"r":[[1,2]]}',))
    sql("SELECT pg_notify('dbnotify', %s)", (head + '"o":"I","ts":1e400,"r":[{}]}',))
    sql("INSERT INTO orders VALUES (1, 'after')")
    (event,) = events.wait_for(1)
    assert event.pk == 1 and event.new == {"id": 1, "note": "after"}
    assert ext.is_running(app)
    skipped = [
        r
        for r in caplog.records
        if r.name.startswith("flask_dbnotify") and r.levelno >= logging.WARNING
    ]
    assert len(skipped) == 1, caplog.text
    events.assert_no_more(1, marker=lambda: ext.notify("marker", app=app))


def test_reconnects_after_the_session_is_killed(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """pg_terminate_backend on the listener's session: it reconnects by
    itself, reports listener_disconnected(error) then
    listener_connected(reconnect=True, gap=True), and events flow again."""
    app, ext = orders_app(make_app, sql, DBNOTIFY_RECONNECT_MAX_DELAY=0.5)
    lifecycle = Recorder()

    def on_connected(sender: Any, **kwargs: Any) -> None:
        lifecycle.add(("connected", sender, kwargs))

    def on_disconnected(sender: Any, **kwargs: Any) -> None:
        lifecycle.add(("disconnected", sender, kwargs))

    with (
        listener_connected.connected_to(on_connected),
        listener_disconnected.connected_to(on_disconnected),
    ):
        ext.start(app)
        lifecycle.wait_for(1, "the first listener_connected")
        sql("INSERT INTO orders VALUES (1, 'before')")
        events.wait_for(1)
        ((old_pid, _, _),) = listener_backends(sql)
        assert sql("SELECT pg_terminate_backend(%s)", (old_pid,)) == [(True,)]

        items = lifecycle.wait_for(3, "listener_disconnected and listener_connected")
        sql("INSERT INTO orders VALUES (2, 'after')")
        assert [e.pk for e in events.wait_for(2)] == [1, 2]
    first, lost, again = items[:3]
    assert first == ("connected", app, {"reconnect": False, "gap": False})
    assert lost[0] == "disconnected" and lost[1] is app
    assert isinstance(lost[2]["error"], Exception)
    assert again == ("connected", app, {"reconnect": True, "gap": True})
    ((new_pid, state, _),) = listener_backends(sql)
    assert new_pid != old_pid and state == "idle"
    assert ext.is_running(app)


def _read_line(fd: int, buf: bytearray, what: str) -> str:
    """Read one line from ``fd`` within WAIT seconds; "" at end of file."""
    deadline = time.monotonic() + WAIT
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"the child did not report {what} within {WAIT}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            return ""
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


def _reap(pid: int) -> int:
    """Wait (bounded) for the child to exit; return its exit code."""
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], WAIT)[0]:
            raise AssertionError(f"child {pid} did not exit within {WAIT}s")
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_fork_child_gets_its_own_listener_and_parent_keeps_its(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """After fork() the child listens on its own connection and receives
    events; the parent's session survives the child (the child discards the
    inherited connection rather than closing it) and keeps receiving."""
    app, ext = orders_app(make_app, sql)
    ext.start(app)
    ((parent_pid_db, _, _),) = listener_backends(sql)
    parent = os.getpid()
    r, w = os.pipe()
    child_got = threading.Event()
    disconnected = Recorder()

    def report_connected(sender: Any, **kwargs: Any) -> None:
        if os.getpid() != parent:
            os.write(w, b"connected\n")

    def report_event(sender: Any, event: ChangeEvent, **kwargs: Any) -> None:
        if os.getpid() != parent:
            os.write(w, f"event {event.pk}\n".encode())
            child_got.set()

    with (
        listener_connected.connected_to(report_connected),
        row_changed.connected_to(report_event),
        listener_disconnected.connected_to(disconnected),
    ):
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                os.close(r)
                code = 0 if child_got.wait(WAIT) else 2
                ext.stop(app)
            finally:
                os._exit(code)
        os.close(w)
        buf = bytearray()
        try:
            assert _read_line(r, buf, "its listener connected") == "connected"
            rows = listener_backends(sql)
            assert parent_pid_db in {p for p, _, _ in rows}, (
                f"the parent's listener session ended after fork(): {rows!r}"
            )
            assert len(rows) == 2, f"parent and child should each listen: {rows!r}"

            sql("INSERT INTO orders VALUES (1, 'both')")
            assert _read_line(r, buf, "the event") == "event 1"
            assert [e.pk for e in events.wait_for(1)] == [1]
            assert _read_line(r, buf, "its exit") == ""
        finally:
            os.close(r)
            code = _reap(pid)
        assert code == 0, f"child exited with {code}"

        wait_for_backends(sql, 1, "after the child exited")
        sql("INSERT INTO orders VALUES (2, 'parent only')")
        assert [e.pk for e in events.wait_for(2)] == [1, 2]
    assert disconnected.items == [], "the parent's listener lost its connection"
    assert listener_backends(sql)[0][0] == parent_pid_db


def test_close_leaves_no_connection_and_the_app_usable(make_app: MakeApp, sql: SQL) -> None:
    """close() stops the listener and closes the pooled connections too;
    afterwards the app connects again when used."""
    app, ext = orders_app(make_app, sql)
    ext.start(app)
    ext.notify("cache", "warm", app=app)  # through the pool

    def others() -> int:
        ((count,),) = sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        return int(count)

    assert others() >= 1
    ext.close(app)
    poll_until(lambda: others() == 0, "every connection of the app closed")
    assert not ext.is_running(app)
    ext.start(app)
    ext.notify("cache", "again", app=app)
    assert ext.listener_state(app).connected
