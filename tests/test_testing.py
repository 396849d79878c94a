"""The testing helpers: make_event() builds what the listener delivers,
DBNotify.deliver() runs receivers as the listener would (in the calling
thread, without a listener or a database), and collect_events() waits,
bounded, for real events from a running listener."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, current_app

from flask_dbnotify import (
    ChangeEvent,
    DBNotify,
    Operation,
    receiver_failed,
    row_changed,
    row_deleted,
    row_inserted,
    row_updated,
    table_truncated,
)
from flask_dbnotify.testing import collect_events, make_event

from ._helpers import WAIT, Recorder, SQLiteDB, listening

SqliteApp = Callable[..., tuple[Flask, DBNotify]]
ORDERS = "CREATE TABLE orders (id INTEGER PRIMARY KEY, status TEXT NOT NULL, qty INTEGER)"
ITEMS = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"


# -- make_event ------------------------------------------------------------------


def test_make_event_insert() -> None:
    """An INSERT: pk from new, no old, nothing changed, stamped now in UTC;
    the row is copied, so changing the dict given afterwards changes nothing."""
    row = {"id": 7, "status": "paid"}
    before = datetime.now(UTC)
    event = make_event("orders", "insert", row)
    after = datetime.now(UTC)
    assert isinstance(event, ChangeEvent)
    assert (event.table, event.op, event.pk) == ("orders", Operation.INSERT, 7)
    assert (event.new, event.old, event.changed) == (row, None, frozenset())
    assert (event.id, event.cut) == (None, False)
    assert event.timestamp is not None and before <= event.timestamp <= after
    assert event.timestamp.utcoffset() == timedelta(0)
    row["status"] = "refunded"
    assert event.new == {"id": 7, "status": "paid"}


@pytest.mark.parametrize("op", ["insert", "INSERT", "Insert", Operation.INSERT])
def test_make_event_takes_the_operation_as_on_does(op: Any) -> None:
    assert make_event("orders", op, {"id": 1}).op is Operation.INSERT


def test_make_event_update_computes_changed_as_the_listener_does() -> None:
    """changed: the columns whose value differs, and those old lacks; pk
    from new (the key may have changed)."""
    event = make_event(
        "orders",
        "update",
        new={"id": 2, "status": "paid", "qty": 3, "note": "x"},
        old={"id": 1, "status": "paid", "qty": 4},
    )
    assert event.op is Operation.UPDATE and event.pk == 2
    assert event.changed == {"id", "qty", "note"}


def test_make_event_update_takes_changed() -> None:
    """changed as given: it covers every column of the table, even those
    the watch does not carry."""
    event = make_event(
        "orders", "update", {"id": 1, "qty": 2}, {"id": 1, "qty": 2}, changed=["secret"]
    )
    assert event.changed == frozenset({"secret"})


def test_make_event_delete_and_composite_key() -> None:
    """A DELETE reads its pk from old; a key of several columns gives a tuple."""
    event = make_event(
        "lines", "delete", old={"order_id": 1, "n": 2, "x": 0}, key=("order_id", "n")
    )
    assert (event.op, event.pk, event.new, event.changed) == (
        Operation.DELETE,
        (1, 2),
        None,
        frozenset(),
    )
    assert event.old == {"order_id": 1, "n": 2, "x": 0}
    assert make_event("lines", "delete", old={"code": "a"}, key="code").pk == "a"


def test_make_event_truncate() -> None:
    event = make_event("orders", "truncate")
    assert (event.op, event.pk, event.new, event.old) == (Operation.TRUNCATE, None, None, None)
    assert event.row == {}


def test_make_event_passes_id_timestamp_and_cut() -> None:
    """A cut UPDATE carries the key columns only, and no changed."""
    stamp = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    event = make_event("orders", "update", {"id": 1}, {"id": 1}, id=41, timestamp=stamp, cut=True)
    assert (event.id, event.timestamp, event.cut, event.changed) == (41, stamp, True, frozenset())


def test_make_event_names_a_model_as_watch_does() -> None:
    """A Table or model class stands for its fullname, the row signals' sender."""
    table = sa.Table("orders", sa.MetaData(), sa.Column("id", sa.Integer), schema="sales")
    assert make_event(table, "insert", {"id": 1}).table == "sales.orders"


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("insert",), {}, "an INSERT event needs new="),
        (("insert", {"id": 1}, {"id": 1}), {}, "an INSERT event has no old"),
        (("delete",), {}, "a DELETE event needs old="),
        (("delete", {"id": 1}, {"id": 1}), {}, "a DELETE event has no new"),
        (("update", {"id": 1}), {}, "an UPDATE event needs old="),
        (("update",), {"old": {"id": 1}}, "an UPDATE event needs new="),
        (("truncate", {"id": 1}), {}, "a TRUNCATE event has no new"),
        (("truncate",), {"old": {"id": 1}}, "a TRUNCATE event has no old"),
        (("insert", {"code": 1}), {}, "the row has no key column 'id'"),
        (("delete", None, {"a": 1}), {"key": ("a", "b")}, "the row has no key column 'b'"),
        (("insert", {"id": 1}), {"key": ()}, "key= names no column"),
        (("insert", {"id": 1}), {"changed": ["id"]}, "changed= is for UPDATE"),
        (("truncate",), {"changed": []}, "changed= is for UPDATE"),
        (
            ("update", {"id": 1}, {"id": 1}),
            {"changed": [], "cut": True},
            "a cut event has no changed",
        ),
        (("upsert", {"id": 1}), {}, "unknown operation 'upsert'"),
    ],
)
def test_make_event_refuses_shapes_the_listener_never_delivers(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_event("orders", *args, **kwargs)


# -- deliver ---------------------------------------------------------------------


class Calls:
    """What receivers saw, each as (name, event, thread, app of current_app)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, ChangeEvent, threading.Thread, Flask]] = []

    def record(self, name: str, event: ChangeEvent) -> None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        self.items.append((name, event, threading.current_thread(), app))

    def names(self) -> list[str]:
        return [name for name, *_ in self.items]

    def signal(self, name: str) -> Callable[..., None]:
        def receiver(sender: str, event: ChangeEvent, **extra: Any) -> None:
            self.record(f"{name}:{sender}", event)

        return receiver


def test_deliver_runs_signals_then_on_receivers_in_this_thread(
    sqlite_app: SqliteApp, sqlite_path: str
) -> None:
    """In the documented order, in the calling thread, inside the app's
    context; with the listener never started and no database touched."""
    app, ext = sqlite_app()
    calls = Calls()

    @ext.on("orders")
    def on_order(event: ChangeEvent) -> None:
        calls.record("on", event)

    inserted, changed = calls.signal("inserted"), calls.signal("changed")
    event = make_event("orders", "insert", {"id": 1, "status": "new"})
    with row_inserted.connected_to(inserted), row_changed.connected_to(changed):
        assert ext.deliver(event) is None
    assert calls.names() == ["inserted:orders", "changed:orders", "on"]
    assert all(seen is event for _, seen, _, _ in calls.items)
    assert {thread for _, _, thread, _ in calls.items} == {threading.current_thread()}
    assert {seen_app for *_, seen_app in calls.items} == {app}
    assert not ext.is_running(app)
    assert not os.path.exists(sqlite_path), "deliver() touched the database"


def test_deliver_sends_each_operation_to_its_signals(sqlite_app: SqliteApp) -> None:
    """UPDATE and DELETE to their own signal and row_changed; TRUNCATE to
    table_truncated alone; receivers of another sender get nothing."""
    app, ext = sqlite_app()
    calls = Calls()
    receivers = [
        (row_updated, calls.signal("updated")),
        (row_deleted, calls.signal("deleted")),
        (row_changed, calls.signal("changed")),
        (table_truncated, calls.signal("truncated")),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, sender="orders")
    try:
        ext.deliver(
            make_event("orders", "update", {"id": 1, "qty": 2}, {"id": 1, "qty": 1}),
            make_event("orders", "delete", old={"id": 1}),
            make_event("orders", "truncate"),
            make_event("items", "delete", old={"id": 1}),
            app=app,
        )
    finally:
        for signal, receiver in receivers:
            signal.disconnect(receiver)
    assert calls.names() == [
        "updated:orders",
        "changed:orders",
        "deleted:orders",
        "changed:orders",
        "truncated:orders",
    ]


def test_a_receiver_connected_later_gets_the_next_event(sqlite_app: SqliteApp) -> None:
    """Whether a table has signal receivers is remembered between events,
    until any receiver connects: one connected for it, for ANY, or by a
    receiver during delivery gets the very next event."""
    app, ext = sqlite_app()
    calls = Calls()
    first, second, third = calls.signal("first"), calls.signal("second"), calls.signal("third")

    def connect_third(sender: Any, **kwargs: Any) -> None:
        row_changed.connect(third, sender="orders")

    event = make_event("orders", "insert", {"id": 1})
    other = calls.signal("other")
    with (
        row_inserted.connected_to(other, sender="items"),
        row_changed.connected_to(other, sender="items"),
    ):
        ext.deliver(event, app=app)
        with row_inserted.connected_to(first, sender="orders"):
            ext.deliver(event, app=app)
        with row_inserted.connected_to(second), row_inserted.connected_to(connect_third):
            try:
                ext.deliver(event, event, app=app)
            finally:
                row_changed.disconnect(third)
    assert calls.names() == [
        "first:orders",
        # row_changed, after row_inserted: third was connected in between.
        *["second:orders", "third:orders"] * 2,
    ]


def test_deliver_honours_operations_and_where(sqlite_app: SqliteApp) -> None:
    """on() receivers get the events of their operations whose row (new, or
    old for DELETE) matches where=; TRUNCATE only those that ask for it."""
    app, ext = sqlite_app()
    calls = Calls()

    @ext.on("orders", ["update", "delete"], where={"status": "paid"})
    def paid(event: ChangeEvent) -> None:
        calls.record("paid", event)

    @ext.on("orders", "truncate")
    def emptied(event: ChangeEvent) -> None:
        calls.record("emptied", event)

    events = {
        "insert paid": make_event("orders", "insert", {"id": 1, "status": "paid"}),
        "update to paid": make_event(
            "orders", "update", {"id": 1, "status": "paid"}, {"id": 1, "status": "new"}
        ),
        "update from paid": make_event(
            "orders", "update", {"id": 1, "status": "refunded"}, {"id": 1, "status": "paid"}
        ),
        "delete paid": make_event("orders", "delete", old={"id": 1, "status": "paid"}),
        "delete new": make_event("orders", "delete", old={"id": 2, "status": "new"}),
        "truncate": make_event("orders", "truncate"),
        "other table": make_event("items", "update", {"id": 1, "status": "paid"}, {"id": 1}),
    }
    ext.deliver(*events.values(), app=app)
    got = [(name, seen) for name, seen, *_ in calls.items]
    assert got == [
        ("paid", events["update to paid"]),
        ("paid", events["delete paid"]),
        ("emptied", events["truncate"]),
    ]


def test_deliver_isolates_a_raising_receiver(
    sqlite_app: SqliteApp, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver that raises is logged on flask_dbnotify.listener and
    reported with receiver_failed (sender: the app); the others still run,
    and deliver() itself does not raise."""
    app, ext = sqlite_app()
    calls = Calls()
    failures = Recorder()

    def broken_signal_receiver(sender: str, **extra: Any) -> None:
        raise RuntimeError("signal receiver broke")

    @ext.on("orders")
    def broken(event: ChangeEvent) -> None:
        raise KeyError("on receiver broke")

    @ext.on("orders")
    def after(event: ChangeEvent) -> None:
        calls.record("after", event)

    def failed(sender: Flask, **kwargs: Any) -> None:
        failures.add((sender, kwargs))

    event = make_event("orders", "insert", {"id": 1})
    with (
        row_changed.connected_to(broken_signal_receiver, sender="orders"),
        receiver_failed.connected_to(failed),
        caplog.at_level(logging.ERROR, logger="flask_dbnotify.listener"),
    ):
        ext.deliver(event, app=app)
    assert calls.names() == ["after"]
    assert [sender for sender, _ in failures.items] == [app, app]
    reported = [(kw["receiver"], kw["event"], type(kw["error"])) for _, kw in failures.items]
    assert reported == [(broken_signal_receiver, event, RuntimeError), (broken, event, KeyError)]
    logged = [r for r in caplog.records if r.name == "flask_dbnotify.listener"]
    assert [r.exc_info[0] for r in logged if r.exc_info] == [RuntimeError, KeyError]
    assert all("failed" in r.getMessage() for r in logged)


def test_deliver_calls_once_receivers_without_a_claim(
    sqlite_app: SqliteApp, sqlite_path: str
) -> None:
    """Once receivers are called directly, each time (there is no journal
    row to claim), with or without a journal id; no database is touched."""
    app, ext = sqlite_app()
    calls = Calls()
    ext.watch("orders", durable=True)

    @ext.on("orders", "insert", once=True)
    def once_only(event: ChangeEvent) -> None:
        calls.record("once", event)

    first = make_event("orders", "insert", {"id": 1})
    second = make_event("orders", "insert", {"id": 2}, id=12)
    ext.deliver(first, second, app=app)
    ext.deliver(first, app=app)
    assert [seen for _, seen, *_ in calls.items] == [first, second, first]
    assert not os.path.exists(sqlite_path), "deliver() touched the database"


def test_deliver_pushes_a_context_of_the_app_it_is_given(sqlite_app: SqliteApp) -> None:
    """With several apps, the one given (or the current app's) is the
    receivers' current_app and receiver_failed's sender."""
    first, ext = sqlite_app()
    second = Flask("second")
    second.config.update(first.config)
    ext.init_app(second)
    calls = Calls()

    @ext.on("orders")
    def seen(event: ChangeEvent) -> None:
        calls.record("on", event)

    event = make_event("orders", "insert", {"id": 1})
    ext.deliver(event, app=second)
    with first.app_context():
        ext.deliver(event)
    assert [app for *_, app in calls.items] == [second, first]
    with pytest.raises(RuntimeError, match="no app to use"):
        ext.deliver(event)
    ext.close(second)


def test_deliver_refuses_what_is_not_an_event(sqlite_app: SqliteApp) -> None:
    """Before delivering anything: no receiver runs."""
    app, ext = sqlite_app()
    calls = Calls()

    @ext.on("orders")
    def seen(event: ChangeEvent) -> None:
        calls.record("on", event)

    event = make_event("orders", "insert", {"id": 1})
    with pytest.raises(TypeError, match="deliver\\(\\) takes ChangeEvent objects"):
        ext.deliver(event, {"table": "orders"}, app=app)  # type: ignore[arg-type]
    assert calls.items == []


# -- collect_events --------------------------------------------------------------


def test_collect_events_gets_real_events_of_its_table(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB
) -> None:
    """From a started listener, after writes on another connection: the
    table's events in order, not another table's; then disconnected. The
    events are those make_event() builds for the same change."""
    sqlite_db(ORDERS)
    sqlite_db(ITEMS)
    app, ext = listening(sqlite_app, "orders", "items")
    before = len(row_changed.receivers), len(table_truncated.receivers)
    with collect_events("orders", count=2, timeout=WAIT) as got:
        assert len(row_changed.receivers) == before[0] + 1
        sqlite_db("INSERT INTO items VALUES (1, 'tea')")  # Delivered first, not collected.
        sqlite_db("INSERT INTO orders VALUES (1, 'new', 2)")
        sqlite_db("UPDATE orders SET status = 'paid' WHERE id = 1")
    assert [(e.table, e.op) for e in got] == [
        ("orders", Operation.INSERT),
        ("orders", Operation.UPDATE),
    ]
    assert (len(row_changed.receivers), len(table_truncated.receivers)) == before
    update = got[1]
    assert update.changed == {"status"}
    built = make_event(
        "orders", "update", update.new, update.old, id=update.id, timestamp=update.timestamp
    )
    assert built == update


def test_collect_events_of_every_table_and_truncate(sqlite_app: SqliteApp) -> None:
    """With no table: every table's events; TRUNCATE (table_truncated) too."""
    app, ext = sqlite_app()
    events = [
        make_event("orders", "insert", {"id": 1}),
        make_event("items", "truncate"),
    ]
    with collect_events(count=2, timeout=WAIT) as got:
        ext.deliver(*events, app=app)
    assert got == events
    with collect_events("items", timeout=WAIT) as got:
        ext.deliver(*events, app=app)
    assert got == events[1:]


def test_collect_events_says_what_did_not_arrive(
    sqlite_app: SqliteApp, sqlite_db: SQLiteDB
) -> None:
    """After the timeout: an AssertionError naming what it waited for and
    what came; the receivers are disconnected all the same."""
    sqlite_db(ORDERS)
    app, ext = listening(sqlite_app, "orders")
    arrived = Recorder()
    before = len(row_changed.receivers), len(table_truncated.receivers)
    with pytest.raises(AssertionError) as raised, row_changed.connected_to(arrived):
        with collect_events("orders", count=2, timeout=0.2):
            sqlite_db("INSERT INTO orders VALUES (1, 'new', 2)")
            arrived.wait_for(1)  # The one event is in before the wait starts.
    message = str(raised.value)
    assert "expected 2 events of 'orders' within 0.2s, got 1" in message
    assert "ChangeEvent(table='orders', op=<Operation.INSERT" in message
    assert (len(row_changed.receivers), len(table_truncated.receivers)) == before


def test_collect_events_does_not_wait_when_the_block_raises(sqlite_app: SqliteApp) -> None:
    """The block's own exception comes out at once (no AssertionError after
    the timeout), and the receivers are disconnected."""
    before = len(row_changed.receivers), len(table_truncated.receivers)
    with pytest.raises(KeyError, match="from the block"):
        with collect_events("orders", count=1, timeout=WAIT):
            raise KeyError("from the block")
    assert (len(row_changed.receivers), len(table_truncated.receivers)) == before


def test_collect_events_yields_a_list_of_events(sqlite_app: SqliteApp) -> None:
    """The events as a list: indexing, slicing, equality with a list."""
    app, ext = sqlite_app()
    event = make_event("orders", "insert", {"id": 1})
    with collect_events("orders", timeout=WAIT) as got:
        ext.deliver(event, app=app)
    assert isinstance(got, list) and got == [event] and got[0] is event and got[:1] == [event]


# -- the docs ------------------------------------------------------------------------


def test_the_examples_of_the_testing_page_pass(tmp_path: Path) -> None:
    """docs/testing.rst's application and its tests, run as printed, in a
    pytest of their own: its unit tests and its integration test pass."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "testing.rst").read_text()
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", page)
    files = {}
    for block in map(textwrap.dedent, blocks):
        name = block.partition("\n")[0].removeprefix("# ")
        files[name] = block
    assert set(files) == {"shop.py", "test_shop.py", "test_shop_live.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=6 * WAIT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout, done.stdout
