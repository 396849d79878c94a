"""The Flask extension contract: registration, config, watch(), on(),
start()/stop(), receivers that fail, lifecycle signals, several apps."""

from __future__ import annotations

import gc
import logging
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_dbnotify import (
    ChangeEvent,
    DBNotify,
    ListenerError,
    Operation,
    listener_connected,
    receiver_failed,
    row_changed,
    row_inserted,
)

from ._helpers import SQL, WAIT, Backend, Recorder

MakeApp = Callable[..., tuple[Flask, DBNotify]]
ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nothing"


@pytest.fixture()
def bare_app() -> Iterator[Callable[..., Flask]]:
    """Build a Flask app with the given config and no extension yet; any
    DBNotify registered on it is stopped and disposed of afterwards."""
    made: list[Flask] = []

    def factory(**config: Any) -> Flask:
        app = Flask(f"bare_app_{len(made)}")
        app.config.update(config)
        made.append(app)
        return app

    yield factory
    for app in made:
        state = app.extensions.get("dbnotify")
        if state is not None:
            state.ext.close(app)


@pytest.fixture()
def sqlite_url(sqlite_path: str) -> str:
    """A database URL for checks that never ask the database (registration,
    config, argument validation): a SQLite file, so no server is needed."""
    return "sqlite:///" + sqlite_path


def orders_table(sql: Callable[..., Any]) -> None:
    sql("CREATE TABLE orders (id integer PRIMARY KEY, status text, note text)")


def pks(items: list[Any]) -> list[tuple[str, Any]]:
    return [(str(e.op), e.pk) for e in items]


# -- registration and config -------------------------------------------------


def test_constructor_and_init_app_register_state(sqlite_url: str, bare_app: Any) -> None:
    """Both registration forms put the extension's state in app.extensions."""
    app1 = bare_app(DBNOTIFY_DATABASE_URI=sqlite_url, DBNOTIFY_AUTOSTART=False)
    ext1 = DBNotify(app1)
    assert app1.extensions["dbnotify"].ext is ext1

    app2 = bare_app(DBNOTIFY_DATABASE_URI=sqlite_url, DBNOTIFY_AUTOSTART=False)
    ext2 = DBNotify()
    assert "dbnotify" not in app2.extensions
    ext2.init_app(app2)
    assert app2.extensions["dbnotify"].ext is ext2


def test_registering_twice_raises_with_fix(sqlite_url: str, bare_app: Any) -> None:
    """A second registration on the same app, by the same or another
    DBNotify, raises RuntimeError that says what to do instead."""
    app = bare_app(DBNOTIFY_DATABASE_URI=sqlite_url, DBNOTIFY_AUTOSTART=False)
    ext = DBNotify(app)
    for again in (lambda: ext.init_app(app), lambda: DBNotify(app)):
        with pytest.raises(RuntimeError) as info:
            again()
        message = str(info.value)
        assert "already registered" in message
        assert "app.extensions['dbnotify']" in message, message
    assert app.extensions["dbnotify"].ext is ext


def test_sqlalchemy_uri_is_the_fallback(pg_url: str, bare_app: Any, events: Recorder) -> None:
    """Without DBNOTIFY_DATABASE_URI, SQLALCHEMY_DATABASE_URI is used."""
    app = bare_app(SQLALCHEMY_DATABASE_URI=pg_url, DBNOTIFY_AUTOSTART=False)
    ext = DBNotify(app)
    ext.start(app)
    ext.notify("hello", {"n": 1}, app=app)
    assert events.wait_for(1, "the message") == [{"n": 1}]


def test_dbnotify_uri_wins_over_sqlalchemy_uri(
    pg_url: str, bare_app: Any, events: Recorder
) -> None:
    """DBNOTIFY_DATABASE_URI is used when both keys are set."""
    app = bare_app(
        DBNOTIFY_DATABASE_URI=pg_url,
        SQLALCHEMY_DATABASE_URI=UNREACHABLE,
        DBNOTIFY_AUTOSTART=False,
    )
    ext = DBNotify(app)
    ext.start(app)
    ext.notify("hello", "x", app=app)
    assert events.wait_for(1, "the message") == ["x"]


class _PasswordCatcher:
    """A TCP server speaking just enough of the PostgreSQL protocol to ask
    for a cleartext password and record it, then refuse the login."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(WAIT)
        self.port: int = self.sock.getsockname()[1]
        self.passwords: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                self._login(conn)
        except (OSError, struct.error):
            return  # the client went away: nothing recorded

    def _login(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        # SSLRequest / GSSENCRequest get "N"; then the StartupMessage.
        while True:
            (length,) = struct.unpack("!I", conn.recv(4, socket.MSG_WAITALL))
            body = conn.recv(length - 4, socket.MSG_WAITALL)
            if struct.unpack("!I", body[:4])[0] in (80877103, 80877104):
                conn.sendall(b"N")
                continue
            break
        conn.sendall(b"R" + struct.pack("!II", 8, 3))  # cleartext password, please
        kind = conn.recv(1, socket.MSG_WAITALL)
        (length,) = struct.unpack("!I", conn.recv(4, socket.MSG_WAITALL))
        body = conn.recv(length - 4, socket.MSG_WAITALL)
        if kind == b"p":
            self.passwords.append(body.rstrip(b"\0").decode())
        fields = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
        conn.sendall(b"E" + struct.pack("!I", len(fields) + 4) + fields)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(WAIT)


@pytest.mark.parametrize("key", ["DBNOTIFY_DATABASE_URI", "SQLALCHEMY_DATABASE_URI"])
def test_url_object_keeps_its_password(bare_app: Any, key: str) -> None:
    """A sqlalchemy URL object (which Flask-SQLAlchemy accepts as
    SQLALCHEMY_DATABASE_URI) is used with its real password, not the masked
    one its str() shows."""
    server = _PasswordCatcher()
    try:
        url = sa.URL.create(
            "postgresql",
            username="app",
            password="s3cret",
            host="127.0.0.1",
            port=server.port,
            database="shop",
            query={"sslmode": "disable"},
        )
        app = bare_app(DBNOTIFY_AUTOSTART=False, **{key: url})
        ext = DBNotify(app)
        with pytest.raises(ListenerError):
            ext.start(app)
    finally:
        server.close()
    assert server.passwords == ["s3cret"], f"the listener sent password {server.passwords!r}"


def test_no_database_uri_names_both_keys(bare_app: Any) -> None:
    """With no database URL at all, the error names both config keys."""
    app = bare_app(DBNOTIFY_AUTOSTART=False)
    with pytest.raises(RuntimeError) as info:
        DBNotify(app)
    assert "DBNOTIFY_DATABASE_URI" in str(info.value)
    assert "SQLALCHEMY_DATABASE_URI" in str(info.value)
    assert "dbnotify" not in app.extensions


def test_unsupported_database_url_names_it(bare_app: Any) -> None:
    """A URL of a database the extension cannot use raises ValueError naming it."""
    url = "oracle://someone@db.example/shop"
    app = bare_app(DBNOTIFY_DATABASE_URI=url, DBNOTIFY_AUTOSTART=False)
    with pytest.raises(ValueError) as info:
        DBNotify(app)
    assert url in str(info.value)
    assert "dbnotify" not in app.extensions


# Values a setting accepts, as Python code, a plain os.environ string, or
# what Flask's from_prefixed_env() makes of one; and what it means.
GOOD_CONFIG = [
    ("DBNOTIFY_AUTOSTART", True, "autostart", True),
    ("DBNOTIFY_AUTOSTART", False, "autostart", False),
    ("DBNOTIFY_AUTOSTART", "false", "autostart", False),
    ("DBNOTIFY_AUTOSTART", "False", "autostart", False),
    ("DBNOTIFY_AUTOSTART", "0", "autostart", False),
    ("DBNOTIFY_AUTOSTART", 0, "autostart", False),
    ("DBNOTIFY_AUTOSTART", "no", "autostart", False),
    ("DBNOTIFY_AUTOSTART", " OFF ", "autostart", False),
    ("DBNOTIFY_AUTOSTART", "TRUE", "autostart", True),
    ("DBNOTIFY_AUTOSTART", "1", "autostart", True),
    ("DBNOTIFY_AUTOSTART", 1, "autostart", True),
    ("DBNOTIFY_AUTOSTART", "Yes", "autostart", True),
    ("DBNOTIFY_AUTOSTART", "on", "autostart", True),
    ("DBNOTIFY_CHECK_TRIGGERS", "off", "check_triggers", False),
    ("DBNOTIFY_FAST_MESSAGES", "no", "fast_messages", False),
    ("DBNOTIFY_CONNECT_TIMEOUT", "30", "connect_timeout", 30.0),
    ("DBNOTIFY_CONNECT_TIMEOUT", " 2.5 ", "connect_timeout", 2.5),
    ("DBNOTIFY_CONNECT_TIMEOUT", 7, "connect_timeout", 7.0),
    ("DBNOTIFY_CONNECT_TIMEOUT", 0.25, "connect_timeout", 0.25),
    ("DBNOTIFY_RECONNECT_MAX_DELAY", "60", "reconnect_max_delay", 60.0),
    ("DBNOTIFY_PROBE_INTERVAL", 2**31 - 1, "probe_interval", 2147483647.0),
    ("DBNOTIFY_PAYLOAD_RETENTION", "86400", "payload_retention", 86400.0),
    ("DBNOTIFY_POLL_INTERVAL", "0.01", "poll_interval", 0.01),
    ("DBNOTIFY_ONCE_RETRY_DELAY", 0.5, "once_retry_delay", 0.5),
    ("DBNOTIFY_ONCE_LEASE", "600", "once_lease", 600.0),
    ("DBNOTIFY_KEEPALIVE_IDLE", "30", "keepalive_idle", 30),
    ("DBNOTIFY_KEEPALIVE_IDLE", 30.0, "keepalive_idle", 30),
    ("DBNOTIFY_KEEPALIVE_IDLE", 1, "keepalive_idle", 1),
    ("DBNOTIFY_KEEPALIVE_IDLE", 32767, "keepalive_idle", 32767),
    ("DBNOTIFY_QUEUE_SIZE", "500", "queue_size", 500),
    ("DBNOTIFY_QUEUE_SIZE", 10**9, "queue_size", 10**9),
    ("DBNOTIFY_ONCE_ATTEMPTS", "1", "once_attempts", 1),
    ("DBNOTIFY_ONCE_ATTEMPTS", 1000, "once_attempts", 1000),
    ("DBNOTIFY_SCHEMA", "dbnotify", "schema", "dbnotify"),
]


@pytest.mark.parametrize(("key", "value", "attribute", "expected"), GOOD_CONFIG)
def test_config_values_that_are_accepted(
    sqlite_url: str, bare_app: Any, key: str, value: Any, attribute: str, expected: Any
) -> None:
    """Each setting takes values of its own type, and the strings an
    environment variable gives; the extension reads them as meant."""
    config = {"DBNOTIFY_DATABASE_URI": sqlite_url, "DBNOTIFY_AUTOSTART": False, key: value}
    app = bare_app(**config)
    ext = DBNotify(app)
    got = getattr(app.extensions["dbnotify"].settings, attribute)
    assert got == expected and type(got) is type(expected), f"{key}={value!r} gave {got!r}"
    assert ext.is_running(app) is (key == "DBNOTIFY_AUTOSTART" and expected)
    assert app.config[key] == value, "init_app must leave the value it was given"


BOOL_RULE = "'true', 'false', '1', '0', 'yes', 'no', 'on', 'off' (in any case)"
SECONDS_RULE = "a number of seconds greater than 0 and at most 2147483647"
BAD_CONFIG = [
    ("DBNOTIFY_AUTOSTART", "maybe", BOOL_RULE),
    ("DBNOTIFY_AUTOSTART", "", BOOL_RULE),
    ("DBNOTIFY_AUTOSTART", 2, BOOL_RULE),
    ("DBNOTIFY_AUTOSTART", None, BOOL_RULE),
    ("DBNOTIFY_AUTOSTART", "disabled", BOOL_RULE),
    ("DBNOTIFY_CHECK_TRIGGERS", "nope", BOOL_RULE),
    ("DBNOTIFY_FAST_MESSAGES", [], BOOL_RULE),
    ("DBNOTIFY_CONNECT_TIMEOUT", math.nan, SECONDS_RULE),
    ("DBNOTIFY_CONNECT_TIMEOUT", math.inf, SECONDS_RULE),
    ("DBNOTIFY_CONNECT_TIMEOUT", "NaN", SECONDS_RULE),
    ("DBNOTIFY_CONNECT_TIMEOUT", "inf", SECONDS_RULE),
    ("DBNOTIFY_CONNECT_TIMEOUT", 0, SECONDS_RULE),
    ("DBNOTIFY_CONNECT_TIMEOUT", "0", SECONDS_RULE),
    ("DBNOTIFY_CONNECT_TIMEOUT", "five", SECONDS_RULE),
    ("DBNOTIFY_CONNECT_TIMEOUT", 2**31, SECONDS_RULE),
    ("DBNOTIFY_RECONNECT_MAX_DELAY", -1, SECONDS_RULE),
    ("DBNOTIFY_PROBE_INTERVAL", True, SECONDS_RULE),
    ("DBNOTIFY_PAYLOAD_RETENTION", -math.inf, SECONDS_RULE),
    ("DBNOTIFY_POLL_INTERVAL", None, SECONDS_RULE),
    ("DBNOTIFY_ONCE_RETRY_DELAY", "1s", SECONDS_RULE),
    ("DBNOTIFY_ONCE_LEASE", 10**400, SECONDS_RULE),
    ("DBNOTIFY_KEEPALIVE_IDLE", 0.5, "a whole number of seconds, from 1 to 32767"),
    ("DBNOTIFY_KEEPALIVE_IDLE", "10.5", "a whole number of seconds, from 1 to 32767"),
    ("DBNOTIFY_KEEPALIVE_IDLE", 0, "a whole number of seconds, from 1 to 32767"),
    ("DBNOTIFY_KEEPALIVE_IDLE", 32768, "a whole number of seconds, from 1 to 32767"),
    ("DBNOTIFY_KEEPALIVE_IDLE", math.nan, "a whole number of seconds, from 1 to 32767"),
    ("DBNOTIFY_KEEPALIVE_IDLE", None, "a whole number of seconds, from 1 to 32767"),
    ("DBNOTIFY_QUEUE_SIZE", 0, "a whole number, 1 or more"),
    ("DBNOTIFY_QUEUE_SIZE", 1.5, "a whole number, 1 or more"),
    ("DBNOTIFY_QUEUE_SIZE", "many", "a whole number, 1 or more"),
    ("DBNOTIFY_QUEUE_SIZE", False, "a whole number, 1 or more"),
    ("DBNOTIFY_ONCE_ATTEMPTS", 0, "a whole number, from 1 to 1000"),
    ("DBNOTIFY_ONCE_ATTEMPTS", 1001, "a whole number, from 1 to 1000"),
    ("DBNOTIFY_SCHEMA", "", "a schema name (a non-empty string, without %)"),
    ("DBNOTIFY_SCHEMA", 5, "a schema name (a non-empty string, without %)"),
    ("DBNOTIFY_SCHEMA", "50%_off", "a schema name (a non-empty string, without %)"),
    ("DBNOTIFY_DATABASE_URI", 5, "a database URL, as a string or a sqlalchemy.engine.URL"),
    ("DBNOTIFY_LISTEN_URI", 5, "a database URL, as a string or a sqlalchemy.engine.URL"),
]


@pytest.mark.parametrize(("key", "value", "rule"), BAD_CONFIG)
def test_bad_config_names_the_key_the_value_and_the_rule(
    sqlite_url: str, bare_app: Any, key: str, value: Any, rule: str
) -> None:
    """A value of the wrong type, not finite, or out of range raises
    ValueError in init_app, saying which key, which value, and what it
    takes; nothing is registered and no listener starts."""
    config = {"DBNOTIFY_DATABASE_URI": sqlite_url, key: value}
    if key != "DBNOTIFY_AUTOSTART":
        config["DBNOTIFY_AUTOSTART"] = False
    app = bare_app(**config)
    with pytest.raises(ValueError) as info:
        DBNotify(app)
    message = str(info.value)
    assert message.startswith(f"{key} must be "), message
    assert rule in message, message
    assert message.endswith(f", not {value!r}"), message
    assert "dbnotify" not in app.extensions


def test_config_from_prefixed_env(
    sqlite_url: str, bare_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings given as FLASK_DBNOTIFY_* environment variables and read
    with app.config.from_prefixed_env() mean what they say."""
    for name, value in {
        "FLASK_DBNOTIFY_DATABASE_URI": sqlite_url,
        "FLASK_DBNOTIFY_AUTOSTART": "off",
        "FLASK_DBNOTIFY_CHECK_TRIGGERS": "false",
        "FLASK_DBNOTIFY_CONNECT_TIMEOUT": "3",
        "FLASK_DBNOTIFY_POLL_INTERVAL": "0.2",
        "FLASK_DBNOTIFY_KEEPALIVE_IDLE": "30",
        "FLASK_DBNOTIFY_SCHEMA": "dbnotify",
    }.items():
        monkeypatch.setenv(name, value)
    app = bare_app()
    app.config.from_prefixed_env()
    ext = DBNotify(app)
    settings = app.extensions["dbnotify"].settings
    assert not ext.is_running(app)
    assert (settings.autostart, settings.check_triggers) == (False, False)
    assert (settings.connect_timeout, settings.poll_interval) == (3.0, 0.2)
    assert (settings.keepalive_idle, settings.schema) == (30, "dbnotify")

    monkeypatch.setenv("FLASK_DBNOTIFY_KEEPALIVE_IDLE", "0.5")
    app = bare_app()
    app.config.from_prefixed_env()
    with pytest.raises(ValueError, match=r"^DBNOTIFY_KEEPALIVE_IDLE must be .*, not 0\.5$"):
        DBNotify(app)


def test_bad_config_under_the_flask_command_is_one_line(sqlite_url: str) -> None:
    """Loaded by the `flask` command, a bad setting from the environment
    ends the command with that one line, before any listener starts."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FLASK_DBNOTIFY_DATABASE_URI": sqlite_url,
        "FLASK_DBNOTIFY_AUTOSTART": "sometimes",
    }
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "flask"),
            "--app",
            "tests.apps.env_app",
            "dbnotify",
            "status",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("Error: DBNOTIFY_AUTOSTART must be true or false"), lines
    assert lines[0].endswith(", not 'sometimes'"), lines


def test_defaults_are_visible_in_config(sqlite_url: str, bare_app: Any) -> None:
    """init_app fills in every default with setdefault: values the user set stay."""
    app = bare_app(DBNOTIFY_DATABASE_URI=sqlite_url, DBNOTIFY_CONNECT_TIMEOUT=2.5)
    DBNotify(app)
    assert app.config["DBNOTIFY_CONNECT_TIMEOUT"] == 2.5
    assert app.config["DBNOTIFY_AUTOSTART"] is True
    assert app.config["DBNOTIFY_SCHEMA"] == "public"
    for key in (
        "DBNOTIFY_LISTEN_URI",
        "DBNOTIFY_CHECK_TRIGGERS",
        "DBNOTIFY_RECONNECT_MAX_DELAY",
        "DBNOTIFY_PROBE_INTERVAL",
        "DBNOTIFY_KEEPALIVE_IDLE",
    ):
        assert key in app.config, key
    assert isinstance(app.config["DBNOTIFY_RECONNECT_MAX_DELAY"], (int, float))


# -- watch() ----------------------------------------------------------------


def test_every_kind_of_target_and_its_sender(make_app: MakeApp, sql: SQL, pg_url: str) -> None:
    """A string, "schema.table", a Table, a declarative model and a
    Flask-SQLAlchemy model can all be watched; the sender of row signals is
    the string as given, or the table's fullname."""
    sql("CREATE SCHEMA shop")
    sql("CREATE TABLE orders (id int PRIMARY KEY)")
    sql("CREATE TABLE shop.items (id int PRIMARY KEY)")
    sql("CREATE TABLE shop.lines (id int PRIMARY KEY)")
    sql("CREATE TABLE products (id int PRIMARY KEY, name text)")
    sql("CREATE TABLE widgets (id int PRIMARY KEY)")

    lines = sa.Table(
        "lines", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True), schema="shop"
    )

    class Base(DeclarativeBase):
        pass

    class Product(Base):
        __tablename__ = "products"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    db = SQLAlchemy()

    class Widget(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "widgets"
        id: Mapped[int] = mapped_column(primary_key=True)

    # SQLAlchemy 2.1 defaults to psycopg 3 for postgresql://; use psycopg2.
    psycopg2_url = sa.make_url(pg_url).set(drivername="postgresql+psycopg2")
    app, ext = make_app(SQLALCHEMY_DATABASE_URI=psycopg2_url.render_as_string(hide_password=False))
    db.init_app(app)
    ext.watch("orders")
    ext.watch("shop.items")
    ext.watch(lines)
    ext.watch(Product)
    ext.watch(Widget)
    ext.install_triggers(app)

    got = Recorder()

    def record(sender: Any, event: ChangeEvent, **extra: Any) -> None:
        got.add((sender, event.table, event.pk))

    with row_changed.connected_to(record):
        ext.start(app)
        sql("INSERT INTO orders VALUES (1)")
        sql("INSERT INTO shop.items VALUES (2)")
        sql("INSERT INTO shop.lines VALUES (3)")
        sql("INSERT INTO products VALUES (4, 'pen')")
        with app.app_context():
            db.session.add(Widget(id=5))
            db.session.commit()
            db.engine.dispose()
        assert got.wait_for(5) == [
            ("orders", "orders", 1),
            ("shop.items", "shop.items", 2),
            ("shop.lines", "shop.lines", 3),
            ("products", "products", 4),
            ("widgets", "widgets", 5),
        ]


@pytest.mark.parametrize("operations", ["upsert", ["insert", "merge"], []])
def test_bad_operations_raise(sqlite_app: MakeApp, operations: Any) -> None:
    """Operations other than insert/update/delete/truncate (or none) raise ValueError."""
    app, ext = sqlite_app()
    with pytest.raises(ValueError):
        ext.watch("orders", operations)
    with pytest.raises(ValueError):
        ext.on("orders", operations)(lambda event: None)
    assert "orders" not in ext.watches


def test_operations_accept_any_case_and_enum(sqlite_app: MakeApp) -> None:
    """Operations may be given as "insert", "INSERT" or Operation.INSERT."""
    app, ext = sqlite_app()
    watch = ext.watch("orders", ["insert", "UPDATE", Operation.DELETE])
    assert set(watch.operations) == {Operation.INSERT, Operation.UPDATE, Operation.DELETE}


def test_watching_twice_raises_with_fix(sqlite_app: MakeApp) -> None:
    """Watching the same name twice raises ValueError telling to use one call."""
    app, ext = sqlite_app()
    ext.watch("orders", "insert")
    with pytest.raises(ValueError) as info:
        ext.watch("orders", "delete")
    assert "orders" in str(info.value)
    assert "one watch() call" in str(info.value)


def test_when_changed_needs_update(sqlite_app: MakeApp) -> None:
    """when_changed on a watch without UPDATE raises ValueError."""
    app, ext = sqlite_app()
    with pytest.raises(ValueError) as info:
        ext.watch("orders", ["insert", "delete"], when_changed=["status"])
    assert "update" in str(info.value).lower()


def test_model_with_unknown_column_fails_at_watch_time(sqlite_app: MakeApp) -> None:
    """A typo in columns= or when_changed= of a model watch raises at watch()."""

    class Base(DeclarativeBase):
        pass

    class Customer(Base):
        __tablename__ = "customers"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str]

    app, ext = sqlite_app()
    with pytest.raises(ValueError) as info:
        ext.watch(Customer, columns=["id", "emial"])
    assert "emial" in str(info.value)
    with pytest.raises(ValueError) as info:
        ext.watch(Customer, when_changed=["mail"])
    assert "mail" in str(info.value)
    assert ext.watches == {}


# -- on() -------------------------------------------------------------------


def test_where_on_unknown_model_column_raises(sqlite_app: MakeApp) -> None:
    """With a model target, a typo in where= raises at on() time, as it does
    in watch(columns=...), instead of a receiver that silently never runs."""

    class Base(DeclarativeBase):
        pass

    class Customer(Base):
        __tablename__ = "customers"
        id: Mapped[int] = mapped_column(primary_key=True)
        status: Mapped[str]

    app, ext = sqlite_app()
    with pytest.raises(ValueError) as info:
        ext.on(Customer, where={"stauts": "active"})(lambda event: None)
    assert "stauts" in str(info.value)


def test_on_keeps_a_strong_reference(backend: Backend) -> None:
    """A lambda registered with on() and referenced nowhere else still runs."""
    orders_table(backend.sql)
    app, ext = backend.make_app()
    got = Recorder()
    ext.on("orders")(lambda event: got.add(event))
    gc.collect()
    ext.install_triggers(app)
    ext.start(app)
    backend.sql("INSERT INTO orders (id) VALUES (1)")
    assert pks(got.wait_for(1)) == [("INSERT", 1)]


def test_on_filters_operations(backend: Backend) -> None:
    """on(target, "delete") runs for deletes only."""
    orders_table(backend.sql)
    app, ext = backend.make_app()
    got = Recorder()
    ext.on("orders", "delete")(got.add)
    ext.install_triggers(app)
    ext.start(app)
    backend.sql("INSERT INTO orders (id) VALUES (1)")
    backend.sql("UPDATE orders SET status = 'x' WHERE id = 1")
    backend.sql("DELETE FROM orders WHERE id = 1")
    backend.sql("INSERT INTO orders (id) VALUES (2)")
    backend.sql("DELETE FROM orders WHERE id = 2")  # the marker
    assert pks(got.wait_for(2)) == [("DELETE", 1), ("DELETE", 2)]


def test_on_where_filters_rows(backend: Backend) -> None:
    """where= lets through only rows with those values: the new row, or the
    old row for DELETE."""
    orders_table(backend.sql)
    app, ext = backend.make_app()
    got = Recorder()
    ext.on("orders", where={"status": "paid"})(got.add)
    ext.install_triggers(app)
    ext.start(app)
    backend.sql("INSERT INTO orders (id, status) VALUES (1, 'new'), (2, 'paid')")
    backend.sql("UPDATE orders SET status = 'paid' WHERE id = 1")
    backend.sql("UPDATE orders SET status = 'new' WHERE id = 2")
    backend.sql("DELETE FROM orders WHERE id = 1")  # was paid
    backend.sql("DELETE FROM orders WHERE id = 2")  # was new
    backend.sql("INSERT INTO orders (id, status) VALUES (3, 'paid')")  # the marker
    assert pks(got.wait_for(4)) == [
        ("INSERT", 2),
        ("UPDATE", 1),
        ("DELETE", 1),
        ("INSERT", 3),
    ]


def test_on_for_an_operation_not_watched_raises(sqlite_app: MakeApp) -> None:
    """on() for an operation the watch does not cover raises ValueError with a fix."""
    app, ext = sqlite_app()
    ext.watch("orders", "insert")
    with pytest.raises(ValueError) as info:
        ext.on("orders", "delete")(lambda event: None)
    assert "delete" in str(info.value)
    assert "watch(operations=" in str(info.value)
    assert ext.subscriptions.get("orders", ()) == ()


def test_on_watches_implicitly_and_watch_replaces_it(backend: Backend) -> None:
    """on() on an unwatched table watches it; a later explicit watch() of it
    is accepted and is the one that counts."""
    orders_table(backend.sql)
    app, ext = backend.make_app()
    got = Recorder()
    ext.on("orders", "insert")(got.add)
    assert "orders" in ext.watches
    ext.install_triggers(app)
    ext.start(app)
    backend.sql("INSERT INTO orders VALUES (1, 'new', 'first')")
    (first,) = got.wait_for(1)
    assert first.new == {"id": 1, "status": "new", "note": "first"}

    ext.watch("orders", "insert", columns=["status"])
    ext.install_triggers(app)
    backend.sql("INSERT INTO orders VALUES (2, 'paid', 'second')")
    second = got.wait_for(2)[1]
    assert second.new == {"id": 2, "status": "paid"}
    with pytest.raises(ValueError):
        ext.watch("orders")


def test_explicit_watch_must_cover_existing_on(sqlite_app: MakeApp) -> None:
    """An explicit watch() that no longer covers an on() receiver raises."""
    app, ext = sqlite_app()
    ext.on("orders", "delete")(lambda event: None)
    with pytest.raises(ValueError) as info:
        ext.watch("orders", "insert")
    assert "delete" in str(info.value)


def test_where_on_a_column_not_carried_raises(sqlite_app: MakeApp) -> None:
    """where= on a column the watch does not carry raises ValueError naming it."""
    app, ext = sqlite_app()
    ext.watch("orders", columns=["id", "status"])
    with pytest.raises(ValueError) as info:
        ext.on("orders", where={"note": "x"})(lambda event: None)
    assert "note" in str(info.value)
    assert "columns" in str(info.value)


# -- start() and stop() -----------------------------------------------------


def test_start_returns_when_listening_and_restarts(backend: Backend, events: Recorder) -> None:
    """A row committed right after start() returns arrives, every time,
    across stop()/start() cycles; stop() twice is fine; is_running() follows."""
    orders_table(backend.sql)
    app, ext = backend.make_app()
    ext.watch("orders", "insert")
    ext.install_triggers(app)
    assert not ext.is_running(app)
    for n in range(1, 5):
        ext.start(app)
        assert ext.is_running(app)
        backend.sql("INSERT INTO orders (id) VALUES (?)", (n,))
        assert pks(events.wait_for(n))[-1] == ("INSERT", n)
        ext.stop(app)
        assert not ext.is_running(app)
        ext.stop(app)
        assert not ext.is_running(app)
    assert pks(events.items) == [("INSERT", n) for n in range(1, 5)]


def test_start_twice_keeps_one_listener(backend: Backend, events: Recorder) -> None:
    """start() on a running listener does nothing: each row arrives once."""
    orders_table(backend.sql)
    app, ext = backend.make_app()
    ext.watch("orders", "insert")
    ext.install_triggers(app)
    ext.start(app)
    ext.start(app)
    backend.sql("INSERT INTO orders (id) VALUES (1)")
    events.wait_for(1)
    events.assert_no_more(1, marker=lambda: ext.notify("marker", app=app))


def test_start_with_unreachable_database_raises_fast(make_app: MakeApp) -> None:
    """start() against a closed port raises ListenerError at once and leaves
    no thread behind."""
    app, ext = make_app(DBNOTIFY_DATABASE_URI=UNREACHABLE)
    before = set(threading.enumerate())
    began = time.monotonic()
    with pytest.raises(ListenerError):
        ext.start(app)
    elapsed = time.monotonic() - began
    assert elapsed < 3.0, f"start() took {elapsed:.1f}s to report a refused connection"
    assert not ext.is_running(app)
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []


# -- receivers that fail -------------------------------------------------------


def test_failing_receiver_is_logged_and_reported(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver that raises is logged and reported by receiver_failed
    (sender the app; receiver, event, error); later receivers and later
    events still arrive."""
    caplog.set_level(logging.ERROR, logger="flask_dbnotify")
    orders_table(backend.sql)
    app, ext = backend.make_app()
    ext.watch("orders")
    ext.install_triggers(app)
    errors: list[Exception] = []

    def bad(sender: Any, event: ChangeEvent, **extra: Any) -> None:
        errors.append(RuntimeError(f"bad receiver, row {event.pk}"))
        raise errors[-1]

    good = Recorder()
    failed = Recorder()

    def on_failed(sender: Any, **kwargs: Any) -> None:
        failed.add((sender, kwargs))

    with (
        row_inserted.connected_to(bad),
        row_changed.connected_to(good),
        receiver_failed.connected_to(on_failed),
    ):
        ext.start(app)
        backend.sql("INSERT INTO orders (id) VALUES (1)")
        backend.sql("INSERT INTO orders (id) VALUES (2)")
        assert pks(good.wait_for(2)) == [("INSERT", 1), ("INSERT", 2)]
        reports = failed.wait_for(2, "receiver_failed reports")
    assert len(reports) == 2
    for (sender, kwargs), pk, error in zip(reports, (1, 2), errors, strict=True):
        assert sender is app
        assert kwargs["receiver"] is bad
        assert isinstance(kwargs["event"], ChangeEvent) and kwargs["event"].pk == pk
        assert kwargs["error"] is error
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[1] in errors]
    assert len(logged) == 2, caplog.text
    assert all(r.levelno >= logging.ERROR for r in logged)


def test_failing_receiver_failed_receiver_does_not_stop_delivery(backend: Backend) -> None:
    """A receiver_failed receiver that raises itself does not stop delivery."""
    orders_table(backend.sql)
    app, ext = backend.make_app()
    ext.watch("orders")
    ext.install_triggers(app)

    def bad(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("bad")

    def worse(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("worse")

    good = Recorder()
    failed = Recorder()
    with (
        row_inserted.connected_to(bad),
        row_changed.connected_to(good),
        receiver_failed.connected_to(worse),
        receiver_failed.connected_to(failed),
    ):
        ext.start(app)
        backend.sql("INSERT INTO orders (id) VALUES (1)")
        backend.sql("INSERT INTO orders (id) VALUES (2)")
        assert pks(good.wait_for(2)) == [("INSERT", 1), ("INSERT", 2)]
        failed.wait_for(2, "receiver_failed reports")
    assert ext.is_running(app)


def test_failing_on_function_is_reported(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """An on() function that raises is logged and reported the same way; the
    next on() function and the next events still run."""
    caplog.set_level(logging.ERROR, logger="flask_dbnotify")
    orders_table(backend.sql)
    app, ext = backend.make_app()
    boom = ValueError("boom")

    @ext.on("orders")
    def bad(event: ChangeEvent) -> None:
        raise boom

    good = Recorder()
    ext.on("orders")(good.add)
    ext.install_triggers(app)
    failed = Recorder()

    def on_failed(sender: Any, **kwargs: Any) -> None:
        failed.add((sender, kwargs))

    with receiver_failed.connected_to(on_failed):
        ext.start(app)
        backend.sql("INSERT INTO orders (id) VALUES (1)")
        backend.sql("INSERT INTO orders (id) VALUES (2)")
        assert pks(good.wait_for(2)) == [("INSERT", 1), ("INSERT", 2)]
        reports = failed.wait_for(2, "receiver_failed reports")
    for (sender, kwargs), pk in zip(reports, (1, 2), strict=True):
        assert sender is app
        assert kwargs["receiver"] is bad
        assert kwargs["event"].pk == pk
        assert kwargs["error"] is boom
    assert [r for r in caplog.records if r.exc_info and r.exc_info[1] is boom], caplog.text


# -- lifecycle and start-up checks ---------------------------------------------


def test_listener_connected_on_start(backend: Backend) -> None:
    """start() sends listener_connected with the real app as sender,
    reconnect=False and gap=False."""
    app, ext = backend.make_app()
    got = Recorder()

    def on_connected(sender: Any, **kwargs: Any) -> None:
        got.add((sender, kwargs))

    with listener_connected.connected_to(on_connected):
        ext.start(app)
        ((sender, kwargs),) = got.wait_for(1, "listener_connected")
    assert sender is app, f"sender is {sender!r}, not the app itself"
    assert type(sender) is Flask
    assert kwargs == {"reconnect": False, "gap": False}


class _FlagHandler(logging.Handler):
    """Sets ``seen`` when a record matching ``predicate`` is logged."""

    def __init__(self, predicate: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.predicate = predicate
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.predicate(record):
            self.seen.set()


def test_missing_triggers_warn_at_start(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    """Starting with a watch whose triggers are not installed logs a warning
    naming the watch and the command that installs them."""
    caplog.set_level(logging.WARNING, logger="flask_dbnotify")
    orders_table(backend.sql)
    app, ext = backend.make_app()
    ext.watch("orders")

    def matches(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "orders" in message and "flask dbnotify install-triggers" in message

    # On the root logger, after caplog's handler: when it fires, caplog has the record.
    handler = _FlagHandler(matches)
    logger = logging.getLogger()
    logger.addHandler(handler)
    try:
        ext.start(app)
        assert handler.seen.wait(WAIT), (
            f"no warning about the missing triggers within {WAIT}s; logged: {caplog.text!r}"
        )
    finally:
        logger.removeHandler(handler)
    warned = [r for r in caplog.records if matches(r)]
    assert warned and all(r.levelno == logging.WARNING for r in warned)


def test_two_apps_each_get_events(backend: Backend) -> None:
    """Two apps in one process, each with its own DBNotify and listener,
    each receive every event, in their own app context."""
    orders_table(backend.sql)
    app1, ext1 = backend.make_app()
    app2, ext2 = backend.make_app()
    got1, got2 = Recorder(), Recorder()

    def recorder(got: Recorder) -> Callable[[ChangeEvent], None]:
        def receive(event: ChangeEvent) -> None:
            got.add((current_app._get_current_object(), event.pk))  # type: ignore[attr-defined]

        return receive

    ext1.on("orders", "insert")(recorder(got1))
    ext2.on("orders", "insert")(recorder(got2))
    ext1.install_triggers(app1)
    ext2.install_triggers(app2)
    ext1.start(app1)
    ext2.start(app2)
    assert ext1.is_running(app1) and ext2.is_running(app2)
    backend.sql("INSERT INTO orders (id) VALUES (1)")
    backend.sql("INSERT INTO orders (id) VALUES (2)")
    assert got1.wait_for(2, "events in app 1") == [(app1, 1), (app1, 2)]
    assert got2.wait_for(2, "events in app 2") == [(app2, 1), (app2, 2)]

    ext1.stop(app1)
    assert not ext1.is_running(app1) and ext2.is_running(app2)
    backend.sql("INSERT INTO orders (id) VALUES (3)")
    assert got2.wait_for(3, "events in app 2")[-1] == (app2, 3)


def test_autostart_inside_a_click_program_that_is_not_flask(pg_url: str) -> None:
    """A server started from its own click command (not Flask's CLI) still
    gets its listener: only Flask's CLI commands other than run skip it."""
    import click
    from click.testing import CliRunner

    started: list[bool] = []

    @click.command()
    def serve() -> None:
        app = Flask("click_server")
        app.config.update(DBNOTIFY_DATABASE_URI=pg_url, DBNOTIFY_CHECK_TRIGGERS=False)
        ext = DBNotify(app)
        started.append(ext.is_running(app))
        ext.stop(app)

    result = CliRunner().invoke(serve)
    assert result.exit_code == 0, result.output
    assert started == [True]
