"""Partitioned tables, inheritance children, TRUNCATE, and what cannot be watched.

A watch covers its table and every partition and inheritance child below
it; a statement fires only the statement triggers of the table it names,
so each row change must arrive exactly once, as an event of the watched
name, whichever level of the tree the statement names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from flask import Flask

from flask_dbnotify import (
    ChangeEvent,
    DBNotify,
    Operation,
    WatchError,
    notification_received,
    row_changed,
    table_truncated,
)

from ._helpers import SQL, WAIT, Recorder, listening, marker

MakeApp = Callable[..., tuple[Flask, DBNotify]]

#: m is range-partitioned on id; m_p2 is itself partitioned (ids 180..199
#: are left free in it, 200 and up in m).
TREE = [
    "CREATE TABLE m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)",
    "CREATE TABLE m_p1 PARTITION OF m FOR VALUES FROM (0) TO (100)",
    "CREATE TABLE m_p2 PARTITION OF m FOR VALUES FROM (100) TO (200) PARTITION BY RANGE (id)",
    "CREATE TABLE m_p2a PARTITION OF m_p2 FOR VALUES FROM (100) TO (150)",
    "CREATE TABLE m_p2b PARTITION OF m_p2 FOR VALUES FROM (150) TO (180)",
]
TREE_TABLES = {"m", "m_p1", "m_p2", "m_p2a", "m_p2b"}
#: h <- h_child (one more column) <- h_grandchild, by inheritance.
FAMILY = [
    "CREATE TABLE h (id int PRIMARY KEY, v text)",
    "CREATE TABLE h_child (extra text) INHERITS (h)",
    "CREATE TABLE h_grandchild () INHERITS (h_child)",
]
DURABLE = pytest.mark.parametrize("durable", [False, True], ids=["fast", "durable"])
MARKER = ("message", "marker", "end")


class Sent(Recorder):
    """Records ``(signal, sender, event or payload)``, signal being "row",
    "truncate" or "message"."""

    def receiver(self, label: str) -> Callable[..., None]:
        def receive(sender: Any, **kwargs: Any) -> None:
            self.add((label, sender, kwargs.get("event", kwargs.get("payload"))))

        return receive


@pytest.fixture()
def sent() -> Iterator[Sent]:
    """What row_changed, table_truncated and notification_received send, in order."""
    rec = Sent()
    with ExitStack() as stack:
        for label, signal in (
            ("row", row_changed),
            ("truncate", table_truncated),
            ("message", notification_received),
        ):
            stack.enter_context(signal.connected_to(rec.receiver(label)))
        yield rec


def run(sql: SQL, statements: list[str]) -> None:
    for statement in statements:
        sql(statement)


def our_triggers(sql: SQL) -> dict[str, set[str]]:
    """Table -> names of the dbnotify triggers on it."""
    found: dict[str, set[str]] = {}
    for name, table in sql(
        "SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE NOT t.tgisinternal AND t.tgname LIKE 'dbnotify%'"
    ):
        found.setdefault(table, set()).add(name)
    return found


def delivered(
    sent: Sent, count: int, ext: DBNotify, app: Flask, since: int = 0
) -> list[tuple[str, str, ChangeEvent]]:
    """Wait for ``count`` items after the first ``since``, then prove with
    a marker that nothing else comes; return them (every one an event)."""
    items = sent.wait_for(since + count)[since : since + count]
    sent.assert_no_more(since + count, marker(ext, app))
    assert sent.items[-1] == MARKER
    assert all(isinstance(event, ChangeEvent) for _, _, event in items), items
    return items


def summary(items: list[tuple[str, str, ChangeEvent]]) -> list[tuple[Any, ...]]:
    """(signal, sender, event.table, op, pk) of each item."""
    return [(label, sender, e.table, e.op.value, e.pk) for label, sender, e in items]


def check_ids(sql: SQL, events: list[ChangeEvent], durable: bool) -> None:
    """Fast events carry no id; durable ones the ids of their journal rows,
    which are all the journal holds (one row per event)."""
    ids = [e.id for e in events]
    if not durable:
        assert ids == [None] * len(events), ids
        return
    assert all(type(i) is int for i in ids), ids
    journal = [i for (i,) in sql("SELECT id FROM public.dbnotify_journal ORDER BY id")]
    assert ids == journal, f"event ids {ids} are not the journal's rows {journal}"


@DURABLE
def test_writes_at_every_level_of_a_partition_tree_arrive_once(
    make_app: MakeApp, sql: SQL, sent: Sent, durable: bool
) -> None:
    """INSERT, UPDATE and DELETE naming the parent, a partition, a
    partitioned partition or a sub-partition each arrive once, as events of
    the watched parent; every table of the tree has the same triggers."""
    run(sql, TREE)
    app, ext = listening(make_app, "m", durable=durable)
    on = our_triggers(sql)
    assert set(on) == TREE_TABLES
    assert len(on["m"]) == (7 if durable else 4)  # 1 or 2 per row op, and TRUNCATE
    assert all(names == on["m"] for names in on.values()), on
    assert ext.status(app).watches == {"m": "installed"}

    run(
        sql,
        [
            "INSERT INTO m VALUES (1, 'a'), (120, 'b')",  # the parent, into m_p1 and m_p2a
            "INSERT INTO m_p1 VALUES (2, 'c')",  # a partition
            "INSERT INTO m_p2 VALUES (160, 'd')",  # a partitioned partition, into m_p2b
            "INSERT INTO m_p2a VALUES (110, 'e')",  # a sub-partition
            "UPDATE m SET v = 'A' WHERE id = 1",
            "UPDATE m_p2b SET v = 'D'",
            "DELETE FROM m_p2 WHERE id = 110",
            "DELETE FROM m_p1 WHERE id = 2",
            "DELETE FROM m WHERE id = 120",
        ],
    )
    items = delivered(sent, 10, ext, app)
    assert summary(items) == [
        ("row", "m", "m", "INSERT", 1),
        ("row", "m", "m", "INSERT", 120),
        ("row", "m", "m", "INSERT", 2),
        ("row", "m", "m", "INSERT", 160),
        ("row", "m", "m", "INSERT", 110),
        ("row", "m", "m", "UPDATE", 1),
        ("row", "m", "m", "UPDATE", 160),
        ("row", "m", "m", "DELETE", 110),
        ("row", "m", "m", "DELETE", 2),
        ("row", "m", "m", "DELETE", 120),
    ]
    events = [e for _, _, e in items]
    assert events[3].new == {"id": 160, "v": "d"}
    assert (events[6].new, events[6].old) == ({"id": 160, "v": "D"}, {"id": 160, "v": "d"})
    assert events[7].old == {"id": 110, "v": "e"}
    check_ids(sql, events, durable)


@DURABLE
def test_update_moving_a_row_to_another_partition_is_one_update(
    make_app: MakeApp, sql: SQL, sent: Sent, durable: bool
) -> None:
    """An UPDATE through the parent (or a partitioned partition) that moves
    a row to another partition arrives as one UPDATE with old and new rows,
    not as a DELETE and an INSERT."""
    run(sql, TREE)
    app, ext = listening(make_app, "m", durable=durable)
    run(
        sql,
        [
            "INSERT INTO m VALUES (1, 'a')",
            "UPDATE m SET id = 150 WHERE id = 1",  # m_p1 -> m_p2b
            "UPDATE m_p2 SET id = 120, v = 'b' WHERE id = 150",  # m_p2b -> m_p2a
        ],
    )
    assert sql("SELECT tableoid::regclass::text, id FROM m") == [("m_p2a", 120)]
    items = delivered(sent, 3, ext, app)
    assert summary(items) == [
        ("row", "m", "m", "INSERT", 1),
        ("row", "m", "m", "UPDATE", 150),
        ("row", "m", "m", "UPDATE", 120),
    ]
    _, moved, again = [e for _, _, e in items]
    assert (moved.old, moved.new, moved.changed) == (
        {"id": 1, "v": "a"},
        {"id": 150, "v": "a"},
        frozenset({"id"}),
    )
    assert (again.old, again.new, again.changed) == (
        {"id": 150, "v": "a"},
        {"id": 120, "v": "b"},
        frozenset({"id", "v"}),
    )
    check_ids(sql, [e for _, _, e in items], durable)


@pytest.mark.parametrize(
    ("ddl", "new_id"),
    [
        (["CREATE TABLE m_new PARTITION OF m FOR VALUES FROM (200) TO (300)"], 200),
        (["CREATE TABLE m_new PARTITION OF m_p2 FOR VALUES FROM (180) TO (200)"], 180),
        (
            [
                "CREATE TABLE m_new (v text, id int PRIMARY KEY)",  # another column order
                "ALTER TABLE m ATTACH PARTITION m_new FOR VALUES FROM (200) TO (300)",
            ],
            200,
        ),
    ],
    ids=["created", "created-sub-partition", "attached"],
)
def test_partition_added_after_install_is_outdated_until_installed_again(
    make_app: MakeApp, sql: SQL, sent: Sent, ddl: list[str], new_id: int
) -> None:
    """A partition created or attached after install-triggers has no
    triggers: status says "outdated" and names it, writes naming it are
    missed; installing again covers it and writes naming it arrive once."""
    run(sql, TREE)
    app, ext = listening(make_app, "m")
    status = ext.status(app)
    assert status.watches == {"m": "installed"}
    assert "m" not in status.details
    run(sql, ddl)

    status = ext.status(app)
    assert status.watches == {"m": "outdated"}
    assert "triggers missing on public.m_new" in status.details["m"], status.details
    assert "m_p" not in status.details["m"]  # only the new partition lacks them
    sql(f"INSERT INTO m VALUES ({new_id}, 'through the parent')")  # the parent's triggers
    sql(f"INSERT INTO m_new (id, v) VALUES ({new_id + 1}, 'missed')")  # none on m_new yet
    items = delivered(sent, 1, ext, app)
    assert summary(items) == [("row", "m", "m", "INSERT", new_id)]
    since = len(sent.items)

    ext.install_triggers(app)
    status = ext.status(app)
    assert status.watches == {"m": "installed"}
    assert "m" not in status.details
    on = our_triggers(sql)
    assert on["m_new"] == on["m"]
    sql(f"UPDATE m_new SET v = 'direct' WHERE id = {new_id + 1}")
    items = delivered(sent, 1, ext, app, since)
    assert summary(items) == [("row", "m", "m", "UPDATE", new_id + 1)]
    assert items[0][2].new == {"id": new_id + 1, "v": "direct"}


@DURABLE
def test_inheritance_children_are_covered(
    make_app: MakeApp, sql: SQL, sent: Sent, durable: bool
) -> None:
    """Writes naming an inheritance child or grandchild arrive once, as
    events of the watched parent, with the named table's columns; a write
    through the parent carries the parent's columns; a child added later is
    reported until installed again."""
    run(sql, FAMILY)
    app, ext = listening(make_app, "h", durable=durable)
    on = our_triggers(sql)
    assert set(on) == {"h", "h_child", "h_grandchild"}
    assert on["h_child"] == on["h_grandchild"] == on["h"]

    run(
        sql,
        [
            "INSERT INTO h VALUES (1, 'p')",
            "INSERT INTO h_child VALUES (2, 'c', 'x')",
            "INSERT INTO h_grandchild VALUES (3, 'g', 'y')",
            "UPDATE h SET v = 'C' WHERE id = 2",  # a child's row through the parent
            "UPDATE h_child SET extra = 'z' WHERE id = 3",  # a grandchild's through the child
            "DELETE FROM h_grandchild",
            "DELETE FROM ONLY h",
        ],
    )
    items = delivered(sent, 7, ext, app)
    assert summary(items) == [
        ("row", "h", "h", "INSERT", 1),
        ("row", "h", "h", "INSERT", 2),
        ("row", "h", "h", "INSERT", 3),
        ("row", "h", "h", "UPDATE", 2),
        ("row", "h", "h", "UPDATE", 3),
        ("row", "h", "h", "DELETE", 3),
        ("row", "h", "h", "DELETE", 1),
    ]
    events = [e for _, _, e in items]
    assert [(e.new, e.old) for e in events] == [
        ({"id": 1, "v": "p"}, None),
        ({"id": 2, "v": "c", "extra": "x"}, None),
        ({"id": 3, "v": "g", "extra": "y"}, None),
        ({"id": 2, "v": "C"}, {"id": 2, "v": "c"}),
        ({"id": 3, "v": "g", "extra": "z"}, {"id": 3, "v": "g", "extra": "y"}),
        (None, {"id": 3, "v": "g", "extra": "z"}),
        (None, {"id": 1, "v": "p"}),
    ]
    check_ids(sql, events, durable)
    since = len(sent.items)

    sql("CREATE TABLE h_late () INHERITS (h)")
    status = ext.status(app)
    assert status.watches == {"h": "outdated"}
    assert "public.h_late" in status.details["h"], status.details
    ext.install_triggers(app)
    assert ext.status(app).watches == {"h": "installed"}
    sql("INSERT INTO h_late VALUES (4, 'late')")
    items = delivered(sent, 1, ext, app, since)
    assert summary(items) == [("row", "h", "h", "INSERT", 4)]


@DURABLE
def test_truncate_arrives_once_on_table_truncated_only(
    make_app: MakeApp, sql: SQL, sent: Sent, durable: bool
) -> None:
    """TRUNCATE of the partitioned parent (which fires the TRUNCATE triggers
    of every table in the tree), of a partitioned partition, of a partition
    and of a sub-partition each send table_truncated once, in order with
    the row events, and nothing to row_changed."""
    run(sql, TREE)
    app, ext = listening(make_app, "m", durable=durable)
    run(
        sql,
        [
            "INSERT INTO m VALUES (1, 'a'), (120, 'b'), (160, 'c')",
            "TRUNCATE m",
            "INSERT INTO m VALUES (2, 'd')",
            "TRUNCATE m_p2",
            "TRUNCATE m_p1",
            "TRUNCATE m_p2a",
        ],
    )
    items = delivered(sent, 8, ext, app)
    assert summary(items) == [
        ("row", "m", "m", "INSERT", 1),
        ("row", "m", "m", "INSERT", 120),
        ("row", "m", "m", "INSERT", 160),
        ("truncate", "m", "m", "TRUNCATE", None),
        ("row", "m", "m", "INSERT", 2),
        ("truncate", "m", "m", "TRUNCATE", None),
        ("truncate", "m", "m", "TRUNCATE", None),
        ("truncate", "m", "m", "TRUNCATE", None),
    ]
    truncates = [e for label, _, e in items if label == "truncate"]
    for event in truncates:
        assert event.op is Operation.TRUNCATE
        assert (event.pk, event.new, event.old) == (None, None, None)
        assert event.changed == frozenset()
        assert event.row == {}
        assert event.timestamp is not None
    check_ids(sql, [e for _, _, e in items], durable)


@DURABLE
def test_truncate_of_an_inheritance_parent_arrives_once(
    make_app: MakeApp, sql: SQL, sent: Sent, durable: bool
) -> None:
    """TRUNCATE of a parent with children (all truncated, all their
    triggers fired) sends one table_truncated; TRUNCATE ONLY of it and of a
    child send one each."""
    run(sql, FAMILY)
    app, ext = listening(make_app, "h", durable=durable)
    run(
        sql,
        [
            "INSERT INTO h_grandchild VALUES (1, 'g', 'y')",
            "TRUNCATE h",
            "TRUNCATE ONLY h",
            "TRUNCATE h_child",
        ],
    )
    assert sql("SELECT count(*) FROM h") == [(0,)]
    items = delivered(sent, 4, ext, app)
    assert (
        summary(items)
        == [("row", "h", "h", "INSERT", 1)] + [("truncate", "h", "h", "TRUNCATE", None)] * 3
    )
    check_ids(sql, [e for _, _, e in items], durable)


def test_durable_truncate_committed_while_stopped_arrives_after_start(
    make_app: MakeApp, sql: SQL, sent: Sent
) -> None:
    """A durable watch journals TRUNCATE: one committed while the listener
    is stopped arrives after start(), once, in order, with its journal id."""
    run(sql, TREE)
    app, ext = listening(make_app, "m", durable=True)
    sql("INSERT INTO m VALUES (1, 'a')")
    sent.wait_for(1)
    ext.stop(app)
    run(sql, ["TRUNCATE m", "INSERT INTO m_p2a VALUES (120, 'b')", "TRUNCATE m_p2"])
    ext.start(app)
    sent.wait_for(4, timeout=3 * WAIT)
    items = delivered(sent, 4, ext, app)
    assert summary(items) == [
        ("row", "m", "m", "INSERT", 1),
        ("truncate", "m", "m", "TRUNCATE", None),
        ("row", "m", "m", "INSERT", 120),
        ("truncate", "m", "m", "TRUNCATE", None),
    ]
    check_ids(sql, [e for _, _, e in items], durable=True)


def test_on_receivers_get_truncates_only_when_they_ask(make_app: MakeApp, sql: SQL) -> None:
    """on("m", "truncate") receives TRUNCATEs, on("m") (insert, update and
    delete) does not; where= cannot apply to 'truncate'."""
    run(sql, TREE)
    app, ext = make_app()
    ext.watch("m")
    got = Recorder()

    @ext.on("m", "truncate")
    def truncate_only(event: ChangeEvent) -> None:
        got.add(("truncate_only", event.op.value, event.table))

    @ext.on("m")
    def by_default(event: ChangeEvent) -> None:
        got.add(("by_default", event.op.value, event.table))

    @ext.on("m", ["insert", "truncate"])
    def both(event: ChangeEvent) -> None:
        got.add(("both", event.op.value, event.table))

    def never(event: ChangeEvent) -> None:
        raise AssertionError("not registered")

    with pytest.raises(ValueError, match="truncate"):
        ext.on("m", "truncate", where={"id": 1})(never)
    with pytest.raises(ValueError, match="truncate"):
        ext.on("m", ["delete", "truncate"], where={"id": 1})(never)

    ext.install_triggers(app)
    ext.start(app)
    with notification_received.connected_to(got):
        run(sql, ["INSERT INTO m VALUES (1, 'a')", "TRUNCATE m_p1"])
        got.wait_for(4)
        got.assert_no_more(4, marker(ext, app))
    assert got.items == [
        ("by_default", "INSERT", "m"),
        ("both", "INSERT", "m"),
        ("truncate_only", "TRUNCATE", "m"),
        ("both", "TRUNCATE", "m"),
        "end",
    ]


@pytest.mark.parametrize(
    ("create", "kind"),
    [
        ("CREATE VIEW m_view AS SELECT * FROM base", "a view"),
        ("CREATE MATERIALIZED VIEW m_view AS SELECT * FROM base", "a materialized view"),
    ],
    ids=["view", "materialized-view"],
)
def test_watching_a_view_is_a_watch_error_saying_so(
    make_app: MakeApp, sql: SQL, create: str, kind: str
) -> None:
    """A view is found but refused: the error says what it is, not that it
    does not exist, and nothing is installed."""
    sql("CREATE TABLE base (id int PRIMARY KEY, v text)")
    sql(create)
    app, ext = make_app()
    ext.watch("base")
    ext.watch("m_view")
    with pytest.raises(WatchError, match=f"'m_view' is {kind}, not a table") as info:
        ext.install_triggers(app)
    assert "does not exist" not in str(info.value)
    assert our_triggers(sql) == {}
    status = ext.status(app)
    assert status.watches == {"base": "missing", "m_view": "error"}
    assert f"is {kind}" in status.details["m_view"]


@pytest.mark.parametrize("child", ["m_p2a", "h_child"])
def test_a_partition_or_child_alone_cannot_be_watched(
    make_app: MakeApp, sql: SQL, child: str
) -> None:
    """A statement naming the parent fires only the parent's statement
    triggers, so a watch of a partition or inheritance child alone would
    miss writes made through the parent: installing fails, naming the
    parent to watch instead."""
    run(sql, TREE + FAMILY)
    app, ext = make_app()
    ext.watch(child)
    parent = {"m_p2a": "public.m_p2", "h_child": "public.h"}[child]
    with pytest.raises(WatchError, match=rf"'{child}' is a partition or child of '{parent}'"):
        ext.install_triggers(app)
    assert our_triggers(sql) == {}
    assert ext.status(app).watches == {child: "error"}


@DURABLE
def test_a_truncate_after_a_change_is_not_folded_into_an_earlier_one(
    make_app: MakeApp, sql: SQL, sent: Sent, durable: bool
) -> None:
    """TRUNCATEs inside one statement (a DO block, or several statements in
    one query string) arrive as such: only a TRUNCATE with no change of the
    table since the previous one (which changes nothing) makes no event."""
    run(sql, TREE)
    app, ext = listening(make_app, "m", durable=durable)
    sql("DO $$ BEGIN TRUNCATE m; INSERT INTO m VALUES (6, 'y'); TRUNCATE m; TRUNCATE m_p1; END $$")
    sql("BEGIN; TRUNCATE m; INSERT INTO m_p2a VALUES (120, 'x'); TRUNCATE m_p2; COMMIT")
    items = delivered(sent, 6, ext, app)
    assert [(label, e.op.value) for label, _, e in items] == [
        ("truncate", "TRUNCATE"),
        ("row", "INSERT"),
        ("truncate", "TRUNCATE"),
        ("truncate", "TRUNCATE"),
        ("row", "INSERT"),
        ("truncate", "TRUNCATE"),
    ]
    assert all(sender == "m" for _, sender, _ in items)


def test_a_detached_partition_stops_sending_once_installed_again(
    make_app: MakeApp, sql: SQL, sent: Sent
) -> None:
    """A partition detached from the watched table keeps its triggers (status
    lists them as orphaned) until install-triggers runs again, which drops
    them: its writes are no longer the watched table's."""
    run(sql, TREE)
    app, ext = listening(make_app, "m")
    sql("ALTER TABLE m DETACH PARTITION m_p1")
    assert any("m_p1" in line for line in ext.status(app).orphaned)
    ext.install_triggers(app)
    assert "m_p1" not in our_triggers(sql)
    assert ext.status(app).orphaned == []
    sql("INSERT INTO m_p1 VALUES (1, 'gone')")
    sql("INSERT INTO m VALUES (120, 'kept')")
    (item,) = delivered(sent, 1, ext, app)
    assert summary([item]) == [("row", "m", "m", "INSERT", 120)]


def test_uninstall_removes_the_triggers_of_every_partition(
    make_app: MakeApp, sql: SQL, sent: Sent
) -> None:
    """uninstall_triggers() leaves no trigger anywhere in the tree: writes
    naming a sub-partition, and TRUNCATE, deliver nothing."""
    run(sql, TREE)
    app, ext = listening(make_app, "m")
    assert set(our_triggers(sql)) == TREE_TABLES
    ext.uninstall_triggers(app)
    assert our_triggers(sql) == {}
    assert ext.status(app).watches == {"m": "missing"}
    run(sql, ["INSERT INTO m_p2a VALUES (120, 'a')", "INSERT INTO m VALUES (1, 'b')", "TRUNCATE m"])
    sent.assert_no_more(0, marker(ext, app))
    assert sent.items == [MARKER]
