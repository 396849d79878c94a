"""Behind a real pgbouncer, in each pooling mode: what the application's
URL (DBNOTIFY_DATABASE_URI) and the listener's (DBNOTIFY_LISTEN_URI) can do.

- session: everything, the listener included.
- transaction: everything on the application's URL; a listener through it
  is deaf (LISTEN runs, nothing arrives), and says so.
- statement: the application's URL serves notify(), journal reads, once
  claims, status, pruning and uninstalling; install-triggers says in one
  line to use another URL. A listener through it is deaf too.

And the listener refuses a DBNOTIFY_LISTEN_URI that leads to another
database (pgbouncer's alias names do not count: the server says which).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from flask import Flask, current_app
from sqlalchemy.engine import make_url

from flask_dbnotify import ChangeEvent, DBNotify
from flask_dbnotify.errors import DBNotifyError, ListenerError

from ._helpers import SQL, Recorder, not_here, wait_for_state
from ._pgbouncer import PgBouncer

MakeApp = Callable[..., tuple[Flask, DBNotify]]
DEAF = "receives no notifications"


@pytest.fixture(scope="module")
def pgbouncer(pg_server: str) -> Iterator[PgBouncer]:
    try:
        bouncer = PgBouncer(pg_server)
    except RuntimeError as exc:
        not_here(f"pgbouncer tests NOT RUN: {exc}")
    yield bouncer
    bouncer.close()


def charge(event: ChangeEvent) -> None:
    """The once receiver: records which payments it handled."""
    current_app.config["CHARGED"].add(event.pk)


def shop(make_app: MakeApp, sql: SQL, database_uri: str, **config: Any) -> tuple[Flask, DBNotify]:
    """An app watching ``orders`` (fast) and ``payments`` (durable, with a
    once receiver), on ``database_uri``; triggers not installed."""
    sql("CREATE TABLE IF NOT EXISTS orders (id int PRIMARY KEY, note text)")
    sql("CREATE TABLE IF NOT EXISTS payments (id int PRIMARY KEY, amount int)")
    app, ext = make_app(
        DBNOTIFY_DATABASE_URI=database_uri, DBNOTIFY_RECONNECT_MAX_DELAY=0.5, **config
    )
    app.config["CHARGED"] = Recorder()
    ext.watch("orders")
    ext.watch("payments", durable=True)
    ext.on("payments", "insert", once=True)(charge)
    return app, ext


def everything_arrives(app: Flask, ext: DBNotify, sql: SQL, events: Recorder) -> None:
    """A fast row event, a durable one (read from the journal), its once
    receiver's claim, a message and a journaled message all arrive; status
    and pruning work."""
    sql("INSERT INTO orders VALUES (1, 'fast')")
    sql("INSERT INTO payments VALUES (1, 100)")
    ext.notify("cache", {"key": "menu"}, app=app)
    ext.notify("cache", {"key": "durable"}, durable=True, app=app)
    got = events.wait_for(4, "two events and two messages")
    assert got[0].table == "orders" and got[0].pk == 1 and got[0].id is None, got
    assert got[1].table == "payments" and got[1].pk == 1 and got[1].id is not None, got
    assert got[2:] == [{"key": "menu"}, {"key": "durable"}], got
    assert app.config["CHARGED"].wait_for(1, "the once receiver's run") == [1]

    status = ext.status(app)
    assert status.watches == {"orders": "installed", "payments": "installed"}, status
    assert status.health["journal"].startswith("2 rows"), status.health
    app.extensions["dbnotify"].backend.feed().prune(3600.0)


# -- session pooling: everything ---------------------------------------------------


def test_session_pooling_serves_both_urls(
    pgbouncer: PgBouncer, make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """Both URLs through pgbouncer in session mode, under an alias name:
    install-triggers, the listener (it hears its own check), fast and
    durable events, messages, a once receiver, status and pruning."""
    url = pgbouncer.url("session")
    app, ext = shop(make_app, sql, url, DBNOTIFY_LISTEN_URI=url)
    ext.install_triggers(app)
    ext.start(app)
    state = wait_for_state(ext, app, lambda s: s.heard_at is not None, "a hearing check")
    assert state.connected and not state.deaf, state
    everything_arrives(app, ext, sql, events)
    status = ext.status(app)
    assert status.health["listener URL"].endswith(": receives notifications"), status.health
    # (A pooler's server session left listening by another test counts too.)
    assert int(status.health["listeners"]) >= 1, status.health
    assert not status.warnings, status.warnings


# -- transaction pooling: the application's URL ------------------------------------


def test_transaction_pooling_serves_the_application_url(
    pgbouncer: PgBouncer, pg_url: str, make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """DBNOTIFY_DATABASE_URI through pgbouncer in transaction mode, the
    listener direct: everything works, install-triggers included."""
    app, ext = shop(make_app, sql, pgbouncer.url("transaction"), DBNOTIFY_LISTEN_URI=pg_url)
    ext.install_triggers(app)
    ext.start(app)
    wait_for_state(ext, app, lambda s: s.heard_at is not None, "a hearing check")
    everything_arrives(app, ext, sql, events)
    assert not ext.listener_state(app).deaf


# -- statement pooling: the application's URL ---------------------------------------


def test_statement_pooling_serves_the_application_url_but_install(
    pgbouncer: PgBouncer, pg_url: str, make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """DBNOTIFY_DATABASE_URI through pgbouncer in statement mode, the
    listener direct: install-triggers fails with one line saying which
    URL to use (the DDL can still be printed); installed over a direct URL,
    everything else works: the listener's start and journal reads,
    notify(), once claims, status, pruning, uninstalling."""
    app, ext = shop(make_app, sql, pgbouncer.url("statement"), DBNOTIFY_LISTEN_URI=pg_url)
    with pytest.raises(DBNotifyError) as raised:
        ext.install_triggers(app)
    message = str(raised.value)
    assert "statement pooling" in message and "session-pooled" in message, message
    assert "\n" not in message, message
    result = app.test_cli_runner().invoke(args=["dbnotify", "install-triggers"])
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {message}\n", result.output
    assert any("CREATE TRIGGER" in s for s in ext.install_sql(app))

    installer, installer_ext = shop(make_app, sql, pg_url)
    installer_ext.install_triggers(installer)

    ext.start(app)
    everything_arrives(app, ext, sql, events)
    ext.uninstall_triggers(app)
    assert ext.status(app).watches == {"orders": "missing", "payments": "missing"}


# -- a listener through transaction or statement pooling is deaf -------------------


@pytest.mark.parametrize("mode", ["transaction", "statement"])
def test_a_listener_through_a_pooler_is_found_deaf(
    mode: str,
    pgbouncer: PgBouncer,
    pg_url: str,
    make_app: MakeApp,
    sql: SQL,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DBNOTIFY_DATABASE_URI through pgbouncer in transaction or statement
    mode, and no DBNOTIFY_LISTEN_URI: LISTEN runs, nothing arrives. The
    listener's check (a notification sent to itself from another session)
    does not arrive within DBNOTIFY_CONNECT_TIMEOUT: listener_state() says
    deaf, one warning names the likely cause and the fix, and status shows
    it."""
    caplog.set_level(logging.WARNING, logger="flask_dbnotify")
    installer, installer_ext = shop(make_app, sql, pg_url)
    installer_ext.install_triggers(installer)
    app, ext = shop(make_app, sql, pgbouncer.url(mode), DBNOTIFY_CONNECT_TIMEOUT=1)
    t_start = time.monotonic()
    ext.start(app)
    sql("INSERT INTO orders VALUES (1, 'never heard')")
    state = wait_for_state(ext, app, lambda s: s.deaf, "the deaf verdict")
    found = time.monotonic() - t_start
    print(f"\n{mode} pooling: the listener was found deaf {found:.2f}s after start()")
    assert state.connected and state.running, state
    assert state.received == 0 and state.heard_at is None, state

    warnings = [r.getMessage() for r in caplog.records if DEAF in r.getMessage()]
    where = f"PostgreSQL at 127.0.0.1:{pgbouncer.port} (database {mode}_pool, user "
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"the listener's connection to {where}"), warnings
    assert "pgbouncer" in warnings[0] and "DBNOTIFY_LISTEN_URI" in warnings[0], warnings

    status = ext.status(app)
    assert status.health["listener URL"].startswith(where), status.health
    assert status.health["listener URL"].endswith(": receives NO notifications"), status.health
    assert any(DEAF in w and "session-pooled" in w for w in status.warnings), status.warnings


# -- the listener's check on a direct connection ------------------------------------


def test_hearing_checks_are_not_messages_and_cannot_be_forged_into_any(
    pg_url: str, make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """A direct listener hears its check at once; the check is not counted
    as received nor delivered. What others send to the check channel (it
    is in pg_stat_activity) is dropped, whatever it looks like."""
    app, ext = shop(make_app, sql, pg_url)
    ext.install_triggers(app)
    ext.start(app)
    state = wait_for_state(ext, app, lambda s: s.heard_at is not None, "a hearing check")
    assert not state.deaf and state.received == 0, state
    # Every listening session's check channel: pgbouncer's server sessions
    # left listening by the deaf listeners of other tests are named so too.
    queries = sql(
        "SELECT query FROM pg_stat_activity WHERE application_name = 'flask-dbnotify listener' "
        "AND datname = current_database()"
    )
    channels = {c for (q,) in queries for c in re.findall(r'LISTEN "(dbnotify_check_\w+)"', q)}
    assert channels, queries
    message = '{"v": 1, "m": "cache", "u": "forged", "p": "forged"}'
    for channel in channels:
        sql("SELECT pg_notify(%s, %s), pg_notify(%s, 'junk')", (channel, message, channel))
    ext.notify("marker", "end", app=app)
    assert events.wait_for(1, "the marker") == ["end"]
    assert ext.listener_state(app).received == 1


# -- DBNOTIFY_LISTEN_URI must lead to the same database -----------------------------


@pytest.fixture()
def other_database(pg_server: str) -> Iterator[str]:
    """A second database on the test server, dropped afterwards."""
    name = f"{make_url(pg_server).database}_other"
    admin = psycopg2.connect(pg_server)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            cur.execute(f'CREATE DATABASE "{name}"')
        yield make_url(pg_server).set(database=name).render_as_string(hide_password=False)
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


def test_a_listen_uri_to_another_database_is_refused(
    other_database: str, pg_url: str, make_app: MakeApp, sql: SQL
) -> None:
    """start() raises, naming both databases as the server names them and
    what to do; status warns the same."""
    app, ext = shop(make_app, sql, pg_url, DBNOTIFY_LISTEN_URI=other_database)
    ext.install_triggers(app)
    with pytest.raises(ListenerError) as raised:
        ext.start(app)
    message = str(raised.value)
    ours, theirs = make_url(pg_url).database, make_url(other_database).database
    assert message.startswith("the listener cannot listen at PostgreSQL at "), message
    assert f"leads to database {theirs!r} of the server started at " in message, message
    assert f"to database {ours!r} of the server started at " in message, message
    assert message.endswith(
        "point DBNOTIFY_LISTEN_URI at the same database as DBNOTIFY_DATABASE_URI"
    ), message
    assert not ext.is_running(app)

    status = ext.status(app)
    assert status.health["listener URL"].endswith(": another database"), status.health
    assert any(f"database {theirs!r}" in w for w in status.warnings), status.warnings
