"""Operators replay journaled events (``flask dbnotify replay``) and forget
retired once receivers (``flask dbnotify forget-receiver``)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flask_dbnotify import ChangeEvent, DBNotify, notification_received, row_changed

from ._helpers import SQL, Recorder, listening, poll_until

MakeApp = Callable[..., tuple[Flask, DBNotify]]


def test_replay_dispatches_journaled_events_again_in_this_thread(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """replay(since) sends journaled row changes and messages through the
    signals and receivers again, in id order, in the calling thread; 600
    durable messages in between (more than a page) are replayed too."""
    sql("CREATE TABLE orders (id int PRIMARY KEY, item text)")
    app, ext = listening(make_app, "orders", durable=True)
    seen: list[tuple[int, str]] = []

    @ext.on("orders", "insert")
    def record(event: ChangeEvent) -> None:
        seen.append((event.pk, threading.current_thread().name))

    sql("INSERT INTO orders VALUES (1, 'a')")
    for n in range(600):  # more than one page of replay, none of them rows
        ext.notify("noise", n, durable=True, app=app)
    sql("INSERT INTO orders VALUES (2, 'b'), (3, 'c')")
    live = [e for e in events.wait_for(603) if isinstance(e, ChangeEvent)]
    assert [e.pk for e in live] == [1, 2, 3]
    first = live[0].id
    assert first is not None

    ext.stop(app)
    replayed, noise = Recorder(), Recorder()
    with (
        row_changed.connected_to(replayed),
        notification_received.connected_to(noise, sender="noise"),
    ):
        assert ext.replay(first, app=app) == 603
    me = threading.current_thread().name
    assert [e.pk for e in replayed.items] == [1, 2, 3]
    assert noise.items == list(range(600))
    assert [e.id for e in replayed.items] == [e.id for e in live]
    assert seen[3:] == [(1, me), (2, me), (3, me)]


def test_replay_until_and_for_one_receiver(make_app: MakeApp, sql: SQL, events: Recorder) -> None:
    """--until bounds the ids; --receiver calls only that receiver, and an
    unknown name is a usage error naming the known ones."""
    sql("CREATE TABLE orders (id int PRIMARY KEY)")
    app, ext = listening(make_app, "orders", durable=True)
    calls: dict[str, list[int]] = {"a": [], "b": []}

    @ext.on("orders")
    def receiver_a(event: ChangeEvent) -> None:
        calls["a"].append(event.pk)

    @ext.on("orders")
    def receiver_b(event: ChangeEvent) -> None:
        calls["b"].append(event.pk)

    sql("INSERT INTO orders SELECT g FROM generate_series(1, 5) g")
    got = events.wait_for(5)
    ids = [e.id for e in got]
    ext.stop(app)
    calls["a"].clear()
    calls["b"].clear()

    runner = app.test_cli_runner()
    result = runner.invoke(
        args=[
            "dbnotify",
            "replay",
            "--since",
            str(ids[1]),
            "--until",
            str(ids[3]),
            "--receiver",
            receiver_a.__module__ + "." + receiver_a.__qualname__,
        ]
    )
    assert result.exit_code == 0, result.output
    assert "replayed 3 event(s)" in result.output
    assert calls == {"a": [2, 3, 4], "b": []}

    result = runner.invoke(args=["dbnotify", "replay", "--since", "1", "--receiver", "nope"])
    assert result.exit_code == 2
    assert "receiver_a" in result.output and "receiver_b" in result.output


def claims(path: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT receiver, event_id, state FROM dbnotify_claims ORDER BY event_id"
        ).fetchall()
    finally:
        conn.close()


def test_replay_heals_a_failed_once_event_and_forget_drops_a_receiver(
    sqlite_app: MakeApp, sqlite_path: str
) -> None:
    """After a once receiver failed for good, fixing it and replaying the
    event for that receiver marks the claim done and status no longer
    counts it failed; forget-receiver drops a retired receiver's state."""
    path = sqlite_path
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, n INTEGER)")
    conn.commit()
    app, ext = sqlite_app(DBNOTIFY_ONCE_ATTEMPTS=1)
    broken = True
    handled: list[int] = []

    @ext.on("jobs", "insert", once=True)
    def process(event: ChangeEvent) -> None:
        if broken:
            raise RuntimeError("not yet")
        handled.append(event.pk)

    ext.install_triggers(app)
    ext.start(app)
    conn.execute("INSERT INTO jobs VALUES (1, 1)")
    conn.commit()
    name = process.__module__ + "." + process.__qualname__
    poll_until(lambda: claims(path) == [(name, 1, "failed")], "the claim to fail for good")
    ext.stop(app)
    assert "failed" in ext.status(app).health[f"once {name}"]
    assert f"failed {name} #1" in ext.status(app).health

    broken = False
    result = app.test_cli_runner().invoke(
        args=["dbnotify", "replay", "--since", "1", "--receiver", name]
    )
    assert result.exit_code == 0, result.output
    assert handled == [1]
    assert claims(path) == [(name, 1, "done")]
    assert ext.status(app).health[f"once {name}"].endswith(", 0 failed")

    result = app.test_cli_runner().invoke(args=["dbnotify", "forget-receiver", name])
    assert result.exit_code == 0, result.output
    assert claims(path) == []
    assert f"once {name}" not in ext.status(app).health
    conn.close()


@pytest.mark.parametrize("once", [True, False])
def test_replay_of_an_empty_range_replays_nothing(
    sqlite_app: MakeApp, sqlite_path: str, once: bool
) -> None:
    """Ids past the end of the journal replay nothing and say so."""
    path = sqlite_path
    sqlite3.connect(path).execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY)").connection.close()
    app, ext = sqlite_app(DBNOTIFY_ONCE_ATTEMPTS=1)

    @ext.on("jobs", once=once)
    def handler(event: ChangeEvent) -> None:
        raise AssertionError("nothing to replay")

    ext.install_triggers(app)
    result = app.test_cli_runner().invoke(args=["dbnotify", "replay", "--since", "1000"])
    assert result.exit_code == 0, result.output
    assert "replayed 0 event(s)" in result.output
