"""Typed channels: ``notify()`` with a dataclass (an instance, the class and
its fields, or its dotted path), ``on_message()`` receivers that get the
dataclass back with its fields typed again, on real servers; what cannot
be sent is refused before anything is sent; a payload that does not fit
reaches ``receiver_failed``; ``on_message(..., once=True)`` runs each
journaled message in exactly one of two listeners, even messages sent while
none ran; ``deliver()`` takes typed messages."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import InitVar, dataclass, field
from decimal import Decimal
from typing import Any, Optional

import pytest
import sqlalchemy as sa
from flask import Flask, current_app

from flask_dbnotify import DBNotify, _channels, _payload, notification_received, receiver_failed
from flask_dbnotify._items import Notification

from ._helpers import Backend, Recorder, poll_until

# -- channels ----------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Point:
    x: int
    y: float


@dataclass
class PostReads:
    model_id: int
    date: dt.date


@dataclass
class Everything:
    text: str
    count: int
    ratio: float
    flag: bool
    day: dt.date
    moment: dt.datetime
    naive: dt.datetime
    at: dt.time
    amount: Decimal
    small: Decimal
    ident: uuid.UUID
    color: Color
    level: Level
    point: Point
    points: list[Point]
    pair: tuple[int, str]
    amounts: tuple[Decimal, ...]
    scores: dict[str, float]
    maybe: int | None
    nothing: Optional[dt.date]  # noqa: UP045 - the typing.Optional spelling, on purpose
    tags: list[str] = field(default_factory=list)
    note: str = "none"


@dataclass
class Node:
    """Refers to itself."""

    name: str
    children: list[Node] = field(default_factory=list)


@dataclass
class WithDefaults:
    n: int
    tags: list[str] = field(default_factory=list)
    note: str = "none"


@dataclass
class Reserved:
    """A field named like one of notify()'s own arguments."""

    durable: bool
    n: int


@dataclass
class Odd:
    """A field typed with what typed channels do not carry."""

    ids: set[int]


@dataclass
class Tally:
    n: int


class NotADataclass:
    n: int


NAME = "tests.test_channels.PostReads"
TZ = dt.timezone(dt.timedelta(hours=5, minutes=30))


def everything() -> Everything:
    return Everything(
        text="héllo 'quoted' \"double\" \u2603",
        count=-(2**62),
        ratio=0.1,
        flag=True,
        day=dt.date(2024, 2, 29),
        moment=dt.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=TZ),
        naive=dt.datetime(2000, 1, 1, 0, 0),
        at=dt.time(7, 30, 1, 5, tzinfo=dt.UTC),
        amount=Decimal("12345678901234567890.123456789012345678901"),
        small=Decimal("0.1"),
        ident=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        color=Color.BLUE,
        level=Level.HIGH,
        point=Point(1, 2.5),
        points=[Point(3, 4.0), Point(-5, 1e300)],
        pair=(7, "seven"),
        amounts=(Decimal("1.10"), Decimal("-0.000000000000000000001")),
        scores={"a": 1.5, "b": -0.0},
        maybe=None,
        nothing=None,
        tags=["x", "y"],
    )


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture()
def messages() -> Iterator[Recorder]:
    """``notification_received`` of :data:`NAME` and of ``marker``, as
    ``(sender, payload)``."""
    rec = Recorder()

    def receive(sender: str, payload: Any, **extra: Any) -> None:
        rec.add((sender, payload))

    with (
        notification_received.connected_to(receive, sender=NAME),
        notification_received.connected_to(receive, sender="marker"),
    ):
        yield rec


@pytest.fixture()
def failures() -> Iterator[Recorder]:
    """``receiver_failed``, as ``(receiver, event, error)``."""
    rec = Recorder()

    def receive(sender: Flask, receiver: Any, event: Any, error: Exception, **extra: Any) -> None:
        rec.add((receiver, event, error))

    with receiver_failed.connected_to(receive):
        yield rec


def listening(backend: Backend, **config: Any) -> tuple[Flask, DBNotify]:
    app, ext = backend.make_app(**config)
    ext.install_triggers(app)
    return app, ext


def typed(ext: DBNotify, channel: Any, **options: Any) -> Recorder:
    """An ``on_message()`` receiver of ``channel`` recording what it gets."""
    rec = Recorder()

    def receiver(message: Any) -> None:
        rec.add(message)

    ext.on_message(channel, **options)(receiver)
    return rec


# -- on real servers ---------------------------------------------------------------


def test_the_three_forms_send_one_message_that_comes_back_typed(
    backend: Backend, messages: Recorder
) -> None:
    """An instance, the class with fields, and the dotted path send the same
    message: the channel is the class's dotted path and the payload a JSON
    object, as ``notification_received`` sees it; ``on_message()``
    receivers (by class or by path) get a ``PostReads`` whose date is a date."""
    app, ext = listening(backend)
    by_class = typed(ext, PostReads)
    by_path = typed(ext, NAME)
    ext.start(app)
    day = dt.date(2024, 5, 17)
    ext.notify(PostReads(model_id=1, date=day), app=app)
    ext.notify(PostReads, model_id=2, date=day, app=app)
    ext.notify(NAME, model_id=3, date=day, app=app)
    expected = [PostReads(n, day) for n in (1, 2, 3)]
    assert by_class.wait_for(3, "typed messages") == expected
    assert by_path.wait_for(3, "typed messages by path") == expected
    assert all(type(m.date) is dt.date for m in by_class.items)
    assert messages.wait_for(3, "notification_received") == [
        (NAME, {"model_id": n, "date": "2024-05-17"}) for n in (1, 2, 3)
    ]


def test_every_supported_type_round_trips(backend: Backend) -> None:
    """Dates, times and datetimes (their UTC offset kept, naive kept naive),
    exact decimals, UUIDs, enums, nested dataclasses and lists of them,
    tuples, dicts, ``Optional`` and defaults come back equal and typed."""
    app, ext = listening(backend)
    got = typed(ext, Everything)
    ext.start(app)
    sent = everything()
    ext.notify(sent, app=app)
    (received,) = got.wait_for(1, "the Everything message")
    assert received == sent
    assert received.moment.utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert received.naive.tzinfo is None and received.at.tzinfo is not None
    assert str(received.amount) == "12345678901234567890.123456789012345678901"
    assert received.small == Decimal("0.1") and str(received.amounts[0]) == "1.10"
    assert type(received.ident) is uuid.UUID and received.color is Color.BLUE
    assert received.level is Level.HIGH and type(received.points[0]) is Point
    assert type(received.pair) is tuple and type(received.amounts) is tuple
    assert math.copysign(1, received.scores["b"]) == -1


def test_bad_calls_raise_and_send_nothing(
    backend: Backend, messages: Recorder, failures: Recorder
) -> None:
    """Unknown or missing fields, classes that are not dataclasses, values
    of the wrong type or that JSON cannot hold, a payload beside fields,
    and a field named like one of notify()'s own arguments in the keyword
    form: each raises at the call, and the listener gets only the marker
    sent after them. A channel with such a field goes as an instance."""
    app, ext = listening(backend)
    reserved = typed(ext, Reserved)
    ext.start(app)
    day = dt.date(2024, 1, 1)
    bad: list[tuple[type[Exception], str, Callable[[], None]]] = [
        (TypeError, "has no field 'modelid'", lambda: ext.notify(PostReads, modelid=1, date=day)),
        (TypeError, "needs field 'date'", lambda: ext.notify(PostReads, model_id=1)),
        (TypeError, "needs field 'date'", lambda: ext.notify(NAME, model_id=1)),
        (TypeError, "is a dataclass", lambda: ext.notify(NotADataclass, n=1)),
        (TypeError, "is a dataclass", lambda: ext.notify("collections.OrderedDict", n=1)),
        (ValueError, "cannot import channel", lambda: ext.notify("no_such_mod.X", n=1)),
        (ValueError, "cannot import channel", lambda: ext.notify("cache", n=1)),
        (TypeError, "expected int", lambda: ext.notify(PostReads, model_id="1", date=day)),
        (TypeError, "expected int", lambda: ext.notify(PostReads(True, day))),  # type: ignore[arg-type]
        (TypeError, "expected date", lambda: ext.notify(PostReads(1, dt.datetime(2024, 1, 1)))),
        (ValueError, "Point.y: nan is not a JSON number", lambda: ext.notify(Point(1, math.nan))),
        (ValueError, "not a JSON number", lambda: ext.notify(Point(1, 10**400))),
        (TypeError, "durabel beside a payload", lambda: ext.notify("c", {}, durabel=True)),
        (TypeError, "expected a Node", lambda: ext.notify(Node("a", [Point(1, 2)]))),  # type: ignore[list-item]
        (TypeError, "not a payload", lambda: ext.notify(PostReads, {"model_id": 1}, date=day)),
        (TypeError, "not both", lambda: ext.notify(PostReads(1, day), model_id=2)),
        (TypeError, "field named 'durable'", lambda: ext.notify(Reserved, durable=True, n=1)),
        (TypeError, "set[int]", lambda: ext.notify(Odd({1}))),
    ]
    for error, text, call in bad:
        with pytest.raises(error, match=text.replace("[", r"\[").replace("(", r"\(")):
            call()
    # In an instance, the field is the channel's; durable= is notify()'s.
    ext.notify(Reserved(durable=False, n=7), durable=True, app=app)
    assert reserved.wait_for(1, "the Reserved instance") == [Reserved(False, 7)]
    ext.notify("marker", "end", app=app)
    assert messages.wait_for(1, "the marker") == [("marker", "end")]
    if backend.pg:
        # Journaled (durable=True), with no watch: a message row.
        bodies = [b for (b,) in backend.sql("SELECT body FROM dbnotify_journal")]
        assert [json.loads(b)["p"] for b in bodies] == [{"durable": False, "n": 7}]
    assert not failures.items


def test_payloads_that_do_not_fit_reach_receiver_failed(
    backend: Backend, messages: Recorder, failures: Recorder
) -> None:
    """Messages sent by hand (untyped, on the channel's name): one that does
    not fit the class is logged and reported with ``receiver_failed``
    (``event`` is the message as read), and the listener goes on; missing
    fields with defaults get them, keys of no field are ignored."""
    app, ext = listening(backend)
    got = typed(ext, PostReads)
    defaults = typed(ext, WithDefaults)
    ext.start(app)
    for payload in (
        {"model_id": "1", "date": "2024-01-01"},
        {"model_id": 1, "date": "not a date"},
        {"model_id": 1},
        ["not", "an", "object"],
    ):
        ext.notify(NAME, payload, app=app)
    ext.notify("tests.test_channels.WithDefaults", {"n": 1, "new_field": 2}, app=app)
    ext.notify(PostReads(5, dt.date(2024, 1, 2)), app=app)
    assert got.wait_for(1, "the good message") == [PostReads(5, dt.date(2024, 1, 2))]
    assert defaults.wait_for(1, "WithDefaults") == [WithDefaults(1, [], "none")]
    reports = failures.wait_for(4, "receiver_failed reports")
    assert [type(error) for _, _, error in reports] == [ValueError] * 4
    assert [str(error) for _, _, error in reports] == [
        "PostReads.model_id: expected int as JSON, got '1'",
        "PostReads.date: cannot read 'not a date' as date",
        "PostReads: field 'date' is missing",
        "PostReads: expected an object, got ['not', 'an', 'object']",
    ]
    assert all(isinstance(event, Notification) and event.channel == NAME for _, event, _ in reports)
    assert len(messages.wait_for(5, "every message on notification_received")) == 5


def test_connection_sends_when_the_transaction_commits(
    backend: Backend, messages: Recorder
) -> None:
    """``connection=`` keeps its meaning for typed messages: sent at commit,
    not at all on rollback."""
    app, ext = listening(backend)
    got = typed(ext, PostReads)
    ext.start(app)
    engine = backend.engine()
    day = dt.date(2024, 3, 1)
    with engine.connect() as conn:
        with conn.begin() as tx:
            ext.notify(PostReads, model_id=1, date=day, connection=conn, app=app)
            tx.rollback()
        with conn.begin():
            ext.notify(NAME, model_id=2, date=day, connection=conn, app=app)
            ext.notify(PostReads(3, day), durable=True, connection=conn, app=app)
            conn.execute(sa.text("SELECT 1"))
        # The same way (WAL capture relays it in commit order).
        with conn.begin():
            ext.notify("marker", "end", connection=conn, app=app)
    senders = [s for s, _ in messages.wait_for(3, "two messages and the marker")]
    assert senders == [NAME, NAME, "marker"]
    assert got.wait_for(2, "committed messages") == [PostReads(2, day), PostReads(3, day)]


def test_durable_typed_messages_sent_while_stopped_arrive_after_start(backend: Backend) -> None:
    """``durable=True`` journals a typed message like any other: one sent
    while the listener was stopped (in an app with a durable watch) is
    replayed after start(), once."""
    backend.sql("CREATE TABLE orders (id int PRIMARY KEY)")
    app, ext = backend.make_app()
    ext.watch("orders", durable=True)
    got = typed(ext, PostReads)
    ext.install_triggers(app)
    ext.start(app)
    day = dt.date(2024, 6, 1)
    ext.notify(PostReads(1, day), durable=True, app=app)
    got.wait_for(1, "the first message")
    ext.stop(app)
    ext.notify(PostReads, model_id=2, date=day, durable=True, app=app)
    ext.start(app)
    ext.notify(NAME, model_id=3, date=day, durable=True, app=app)
    got.wait_for(3, "messages")
    # The replayed one may come after the live one: on PostgreSQL a replay
    # waits for transactions running anywhere on the server to end.
    got.assert_no_more(3, lambda: ext.notify(PostReads(4, day), durable=True, app=app))
    assert sorted(m.model_id for m in got.items) == [1, 2, 3, 4]


# -- once ------------------------------------------------------------------------------

#: What the once receiver handled, as (app name, n); set per test.
handled: Recorder = Recorder()


def tally_once(message: Tally) -> None:
    if message.n == -2 and not current_app.config.get("TEST_FLAKY_DONE"):
        current_app.config["TEST_FLAKY_DONE"] = True
        raise RuntimeError("flaky")
    if message.n == -3 and not current_app.config.get("TEST_POISON_FIXED"):
        raise RuntimeError("poison")
    handled.add((current_app.name, message.n))


def tally_everywhere(message: Tally) -> None:
    handled.add(("everywhere:" + current_app.name, message.n))


def once_app(backend: Backend, **config: Any) -> tuple[Flask, DBNotify]:
    app, ext = backend.make_app(DBNOTIFY_CHECK_TRIGGERS=False, **config)
    ext.on_message(Tally, once=True)(tally_once)
    ext.on_message(Tally)(tally_everywhere)
    return app, ext


def once_handled(n: int) -> list[str]:
    return [name for name, m in handled.items if m == n and not name.startswith("everywhere:")]


@pytest.fixture()
def once_log() -> Iterator[None]:
    global handled
    handled = Recorder()
    yield


def claims(backend: Backend) -> dict[int, str]:
    rows = backend.sql(
        "SELECT event_id, state FROM dbnotify_claims WHERE receiver = ?",
        ("tests.test_channels.tally_once",),
    )
    return {event_id: state for event_id, state in rows}


def test_once_receivers_run_each_journaled_message_in_one_listener(
    backend: Backend, once_log: None
) -> None:
    """Two apps, each with its listener, compete for journaled messages:
    those sent while neither ran (after install-triggers registered the
    receiver) and those sent while both run, at once or in a transaction
    (relayed, with WAL capture). Each is handled by exactly
    one of them; an ordinary receiver gets the live ones in both apps. On
    PostgreSQL a message sent without durable=True is not the once
    receiver's."""
    a_app, a = once_app(backend)
    b_app, b = once_app(backend)
    a.install_triggers(a_app)  # registers the once receiver: from now on
    for n in range(10):
        a.notify(Tally(n), durable=True, app=a_app)
    a.start(a_app)
    b.start(b_app)
    for n in range(10, 30):
        (a if n % 2 else b).notify(Tally(n), durable=True, app=a_app if n % 2 else b_app)
    with backend.engine().begin() as conn:  # in a transaction (WAL capture: relayed)
        for n in (30, 31):
            a.notify(Tally, n=n, durable=True, connection=conn, app=a_app)
    # Untyped, as another app (or an earlier version) would send it.
    a.notify("tests.test_channels.Tally", {"n": 32}, durable=True, app=a_app)
    if backend.pg:
        a.notify(Tally(-1), app=a_app)  # not journaled: not for the once receiver
    a.notify(Tally(100), durable=True, app=a_app)
    poll_until(lambda: len(once_handled(100)) == 1, "message 100 handled once")
    poll_until(
        lambda: {n for _, n in handled.items if n >= 0} >= set(range(33)) | {100},
        "every message handled",
    )
    # Each run once, by one app: claims done, none left running.
    done = poll_until(
        lambda: (c := claims(backend)) and all(s == "done" for s in c.values()) and c,
        "every claim done",
    )
    assert len(done) == 34
    for n in [*range(33), 100]:
        assert len(once_handled(n)) == 1, f"message {n} handled by {once_handled(n)}"
    assert not once_handled(-1)
    wanted = set(range(10, 33)) | {100}
    for name in (a_app.name, b_app.name):
        poll_until(
            lambda name=name: (
                {n for got, n in handled.items if got == "everywhere:" + name} >= wanted
            ),
            f"every live message at {name}'s ordinary receiver",
        )


@pytest.mark.backends("postgresql", "sqlite", "mysql")  # the retry semantics are the once runner's
def test_once_receivers_retry_then_fail_as_on_once_does(
    backend: Backend, once_log: None, failures: Recorder
) -> None:
    """A once receiver of messages that raises is retried with backoff; one
    that keeps raising is marked failed and reported once with
    ``receiver_failed`` (``event`` the message as read, with its id); once
    the cause is fixed, an operator's replay for it runs it and marks the
    claim done."""
    app, ext = once_app(backend, DBNOTIFY_ONCE_ATTEMPTS=3, DBNOTIFY_ONCE_RETRY_DELAY=0.1)
    ext.install_triggers(app)
    ext.start(app)
    ext.notify(Tally(-2), durable=True, app=app)
    ext.notify(Tally(-3), durable=True, app=app)
    ext.notify(Tally(1), durable=True, app=app)
    poll_until(lambda: once_handled(-2), "the flaky message handled at its second attempt")
    ((receiver, event, error),) = failures.wait_for(1, "the poison message reported")
    assert receiver is tally_once and str(error) == "poison"
    assert isinstance(event, Notification) and event.payload == {"n": -3} and event.id
    states = poll_until(
        lambda: (c := claims(backend)) and "running" not in c.values() and c, "claims settled"
    )
    assert sorted(states.values()) == ["done", "done", "failed"]
    assert states[event.id] == "failed"
    assert once_handled(1) == [app.name]
    app.config["TEST_POISON_FIXED"] = True
    name = "tests.test_channels.tally_once"
    assert ext.replay(event.id, event.id, receiver=name, app=app) == 1
    assert claims(backend)[event.id] == "done"
    assert once_handled(-3) == [app.name]


# -- without a database ----------------------------------------------------------------


def test_on_message_refuses_channels_it_cannot_decode(sqlite_app: Any) -> None:
    """At registration: not a dataclass, an unsupported annotation, a dict
    whose keys are not str, a union other than ``X | None``, an init-only
    field (a message cannot give it back)."""
    app, ext = sqlite_app()

    @dataclass
    class IntKeys:
        m: dict[int, str]

    @dataclass
    class Either:
        v: int | str

    @dataclass
    class InitOnly:
        v: int
        seed: InitVar[int] = 0

    for channel, text in (
        (NotADataclass, "is a dataclass"),
        ("tests.test_channels.NotADataclass", "is a dataclass"),
        (Odd, "set[int]"),
        (IntKeys, "dict keys must be str"),
        (Either, "only X | None"),
        (InitOnly, "init-only field ('seed')"),
    ):
        with pytest.raises(TypeError, match=re.escape(text)):
            ext.on_message(channel)(lambda message: None)
    with pytest.raises(ValueError, match="named function"):
        ext.on_message(Tally, once=True)(lambda message: None)


def test_deliver_takes_typed_messages(sqlite_app: Any, failures: Recorder) -> None:
    """``deliver()`` sends a typed message, as encoded and decoded on the
    wire, to ``notification_received`` and the ``on_message()`` receivers
    (once receivers called directly), in this thread; a receiver that
    raises is reported; what cannot be sent raises."""
    app, ext = sqlite_app()
    got = typed(ext, Everything)
    once = typed(ext, PostReads, once=True)
    raw = Recorder()

    @ext.on_message(Node)
    def broken(message: Node) -> None:
        raise RuntimeError(message.name)

    def receive(sender: str, payload: Any, **extra: Any) -> None:
        raw.add((sender, payload))

    with notification_received.connected_to(receive):
        ext.deliver(
            everything(), PostReads(1, dt.date(2024, 1, 1)), Node("a", [Node("b")]), app=app
        )
    assert got.items == [everything()]
    assert once.items == [PostReads(1, dt.date(2024, 1, 1))]
    assert [s for s, _ in raw.items] == [
        "tests.test_channels.Everything",
        NAME,
        "tests.test_channels.Node",
    ]
    assert raw.items[1][1] == {"model_id": 1, "date": "2024-01-01"}
    ((receiver, event, error),) = failures.items
    assert receiver is broken and event.payload["children"][0]["name"] == "b"
    assert str(error) == "a"
    with pytest.raises(TypeError, match="expected int"):
        ext.deliver(PostReads("x", dt.date(2024, 1, 1)), app=app)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="typed messages"):
        ext.deliver("cache", app=app)


def test_codecs_round_trip_and_name_where_a_value_does_not_fit() -> None:
    """The mapping alone: a value survives JSON text exactly (Decimal
    digits and scale, -0.0, offsets); a recursive dataclass works; errors
    name the field."""
    for value in (everything(), Node("root", [Node("a"), Node("b", [Node("c")])])):
        name, payload = _channels.outgoing(value, None, {})
        text = _payload.encode_message(name, payload)
        assert text.startswith(_payload.message_prefix(name))
        (note,) = _payload.decode(text)
        assert isinstance(note, Notification)
        found = _channels.resolve(type(value))
        assert found.decode(note.payload, "x") == value
    record = _channels.resolve(Everything)
    payload = record.encode(everything(), "Everything")
    assert payload["amount"] == "12345678901234567890.123456789012345678901"
    assert payload["moment"] == "2024-02-29T23:59:58.123456+05:30"
    assert payload["color"] == "blue" and payload["level"] == 2
    # An int where a float is annotated, as type checkers allow: a float.
    assert _channels.resolve(Point).encode(Point(1, 2), "Point") == {"x": 1, "y": 2.0}
    payload["points"][1]["x"] = "5"
    with pytest.raises(ValueError, match=r"^Everything\.points\[1\]\.x: expected int"):
        record.decode(payload, "Everything")
    # A Decimal sent by hand as a JSON number keeps its digits too.
    (note,) = _payload.decode('{"v":1,"m":"x","u":"1","p":{"v":0.10000000000000000001}}')
    assert isinstance(note, Notification)

    @dataclass
    class Amount:
        v: Decimal

    assert _channels.resolve(Amount).decode(note.payload, "Amount").v == Decimal(
        "0.10000000000000000001"
    )
    with pytest.raises(TypeError, match="expected 2 items"):
        _channels.resolve(Everything).encode(
            dataclasses.replace(everything(), pair=(1, "a", 2)),  # type: ignore[arg-type]
            "Everything",
        )
