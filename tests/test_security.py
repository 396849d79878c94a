"""Attacks on what install-triggers creates, run as real low-privilege roles.

``low`` logs in with PostgreSQL's defaults only (CONNECT, TEMP, USAGE on
public); ``writer`` may also INSERT, UPDATE, DELETE and TRUNCATE one table.
Each test runs an attack from docs/security.rst and shows it fails, or
shows what the trust model says a role can do.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from flask import Flask

from flask_dbnotify import DBNotify, DBNotifyError, row_changed, row_inserted, table_truncated

from ._helpers import SQL, WAIT, Recorder, Role, listening, marker, roles_on

MakeApp = Callable[..., tuple[Flask, DBNotify]]


@pytest.fixture()
def roles(pg_url: str, sql: SQL) -> Iterator[Callable[[str], Role]]:
    # As in a new database (the pg_url fixture makes public anew).
    sql("GRANT USAGE ON SCHEMA public TO PUBLIC")
    with roles_on(sql, pg_url) as make:
        yield make


ORDERS = "CREATE TABLE orders (id int PRIMARY KEY, status text)"


def writer_of(roles: Callable[[str], Role], sql: SQL, table: str = "orders") -> Role:
    role = roles("writer")
    sql(f"GRANT INSERT, UPDATE, DELETE, TRUNCATE ON {table} TO {role.name}")
    return role


def our_functions(sql: SQL) -> list[tuple[str, str]]:
    return [
        (str(oid), name)
        for oid, name in sql(
            "SELECT p.oid::regprocedure, p.proname FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'public' AND p.proname LIKE 'dbnotify%%'"
        )
    ]


def listen_as(role: Role) -> Any:
    conn = role.connect()
    with conn.cursor() as cur:
        cur.execute("LISTEN dbnotify")
    return conn


def notifications(conn: Any, count: int) -> list[str]:
    """The payloads of the next ``count`` notifications on ``conn``."""
    got: list[str] = []
    deadline = time.monotonic() + WAIT
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"expected {count} notifications, got {got!r}")
        select.select([conn], [], [], left)
        conn.poll()
        got += [n.payload for n in conn.notifies]
        conn.notifies.clear()
    return got


@pytest.mark.parametrize("durable", [False, True])
def test_no_role_can_attach_our_functions(
    make_app: MakeApp, sql: SQL, roles: Callable[[str], Role], durable: bool
) -> None:
    """The escalation: a role with no grants attaches each installed trigger
    function to a temp table of its own whose values run its own code.
    PostgreSQL refuses: our functions are executable by their owner only."""
    sql(ORDERS)
    app, ext = make_app()
    ext.watch("orders", durable=durable)
    ext.install_triggers(app)
    low = roles("low")
    low.run("CREATE TEMP TABLE mine (id int PRIMARY KEY, status text)")
    functions = our_functions(sql)
    assert len(functions) == (7 if durable else 4)
    for signature, _ in functions:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            low.run(
                "CREATE TRIGGER x AFTER INSERT ON mine REFERENCING NEW TABLE AS dbnotify_new "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {signature}"
            )
        ((allowed,),) = sql(
            "SELECT has_function_privilege(%s, %s::regprocedure, 'EXECUTE')",
            (low.name, signature),
        )
        assert not allowed, signature
    assert not low.is_superuser()


@pytest.mark.parametrize("durable", [False, True])
def test_a_types_own_code_runs_with_the_writers_rights(
    make_app: MakeApp, sql: SQL, roles: Callable[[str], Role], durable: bool
) -> None:
    """A watched column's type belongs to the writer, who gives it a cast to
    json that tries ALTER ROLE ... SUPERUSER and records who it ran as. The
    cast runs while the trigger turns the row into JSON: as the writer,
    never as the role that installed the triggers."""
    writer = roles("writer")
    sql(f"CREATE SCHEMA lair AUTHORIZATION {writer.name}")
    writer.run("CREATE TYPE lair.mood AS ENUM ('calm', 'angry')")
    writer.run("CREATE TABLE lair.seen (who text)")
    writer.run("GRANT INSERT ON lair.seen TO PUBLIC")
    writer.run(
        f"""
        CREATE FUNCTION lair.mood_json(m lair.mood) RETURNS json LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO lair.seen VALUES (current_user);
          BEGIN
            EXECUTE 'ALTER ROLE {writer.name} SUPERUSER';
          EXCEPTION WHEN insufficient_privilege THEN NULL;
          END;
          RETURN to_json(m::text);
        END $$"""
    )
    writer.run("CREATE CAST (lair.mood AS json) WITH FUNCTION lair.mood_json(lair.mood)")
    sql("CREATE TABLE moods (id int PRIMARY KEY, mood lair.mood)")
    sql(f"GRANT INSERT ON moods TO {writer.name}")
    app, ext = listening(make_app, "moods", durable=durable)
    got = Recorder()
    with row_inserted.connected_to(got, sender="moods"):
        writer.run("INSERT INTO moods VALUES (1, 'angry')")
        (event,) = got.wait_for(1, "the writer's row")
    assert event.new == {"id": 1, "mood": "angry"}
    assert not writer.is_superuser()
    assert {who for (who,) in sql("SELECT who FROM lair.seen")} == {writer.name}


def test_writers_need_no_rights_on_our_objects(
    make_app: MakeApp, sql: SQL, roles: Callable[[str], Role]
) -> None:
    """A role that may write only the watched table delivers every
    operation, in fast and durable mode alike."""
    sql(ORDERS)
    sql("CREATE TABLE ledger (id int PRIMARY KEY, status text)")
    writer = writer_of(roles, sql)
    sql(f"GRANT INSERT, UPDATE, DELETE, TRUNCATE ON ledger TO {writer.name}")
    app, ext = make_app()
    ext.watch("orders")
    ext.watch("ledger", durable=True)
    ext.install_triggers(app)
    ext.start(app)
    got, truncated = Recorder(), Recorder()
    with row_changed.connected_to(got), table_truncated.connected_to(truncated):
        # Without SELECT, a writer's UPDATE and DELETE can have no WHERE.
        for table in ("orders", "ledger"):
            writer.run(f"INSERT INTO {table} VALUES (1, 'new'), (2, 'new')")
            writer.run(f"UPDATE {table} SET status = 'paid'")
            writer.run(f"DELETE FROM {table}")
            writer.run(f"TRUNCATE {table}")
        items = got.wait_for(12, "events from the writer")
        truncates = truncated.wait_for(2, "truncates from the writer")
    assert [(e.table, e.op.value, e.pk) for e in items] == [
        (t, op, pk)
        for t in ("orders", "ledger")
        for op in ("INSERT", "UPDATE", "DELETE")
        for pk in (1, 2)
    ]
    assert [e.id is not None for e in items] == [False] * 6 + [True] * 6
    assert [(e.table, e.id is not None) for e in truncates] == [("orders", False), ("ledger", True)]


def test_no_role_can_write_or_read_the_journal(
    make_app: MakeApp, sql: SQL, roles: Callable[[str], Role]
) -> None:
    """Our tables grant nothing to anyone: a role without grants can neither
    forge journal rows nor read them, nor touch once receivers' claims."""
    sql(ORDERS)
    app, ext = make_app()
    ext.watch("orders", durable=True)
    ext.install_triggers(app)
    sql("INSERT INTO orders VALUES (1, 'secret')")
    writer = writer_of(roles, sql)
    for table in ("dbnotify_journal", "dbnotify_receivers", "dbnotify_claims"):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            writer.run(f"SELECT * FROM public.{table}")
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        writer.run("INSERT INTO public.dbnotify_journal (watch, body) VALUES ('orders', '{}')")


def test_forged_hand_over_settings_are_never_journaled(
    make_app: MakeApp, sql: SQL, roles: Callable[[str], Role], events: Recorder
) -> None:
    """A durable trigger hands rows to its journal-writing half in settings
    the writer can also set. Whatever the writer sets beforehand, only what
    the trigger computed for this statement reaches the journal."""
    sql(ORDERS)
    writer = writer_of(roles, sql)
    app, ext = listening(make_app, "orders", durable=True)
    conn = writer.connect()
    forged = '{"id": 666, "status": "forged"}'
    with conn.cursor() as cur:
        for first in (forged, "#2"):  # the rows, or the number of slots 2 and up
            cur.execute("SET dbnotify.s1_1 = %s", (first,))
            cur.execute("SET dbnotify.s1_2 = %s", (forged,))
            cur.execute("SET dbnotify.s1_3 = %s", (forged,))
            cur.execute("UPDATE orders SET status = 'x'")  # no rows: nothing to journal
        cur.execute("INSERT INTO orders VALUES (1, 'real')")
    (event,) = events.wait_for(1, "the real row")
    events.assert_no_more(1, marker(ext, app))
    assert event.new == {"id": 1, "status": "real"}
    assert sql("SELECT count(*) FROM dbnotify_journal WHERE body LIKE '%%forged%%'") == [(0,)]


def test_durable_mode_ignores_forged_and_replayed_notifications(
    make_app: MakeApp, sql: SQL, roles: Callable[[str], Role], events: Recorder
) -> None:
    """With durable watches and DBNOTIFY_FAST_MESSAGES off, notifications
    that carry an event or a message themselves are ignored (our triggers
    never send those), and a captured durable notification sent again
    delivers nothing twice: only the journal, which nobody else can write,
    is believed."""
    sql(ORDERS)
    low = roles("low")
    app, ext = make_app(DBNOTIFY_FAST_MESSAGES=False)
    ext.watch("orders", durable=True)
    ext.install_triggers(app)
    ext.start(app)
    spy = listen_as(low)
    sql("INSERT INTO orders VALUES (1, 'real')")
    (captured,) = notifications(spy, 1)
    assert '"J"' in captured and "real" not in captured
    events.wait_for(1, "the real row")
    forged_row = (
        '{"v": 1, "t": "orders", "o": "D", "k": ["id"], "ts": 1, "s": 1, '
        '"r": [{"id": 1, "status": "real"}]}'
    )
    forged_message = '{"v": 1, "m": "orders", "u": "x", "p": "forged"}'
    stored = '{"v": 1, "ref": 1}'  # 0.1's stored payloads are not read any more
    for payload in (captured, captured, forged_row, forged_message, stored, captured):
        low.run("SELECT pg_notify('dbnotify', %s)", (payload,))
    ext.notify("marker", "end", durable=True, app=app)
    items = events.wait_for(2, "the real row and the marker")
    assert items[1] == "end", items
    assert [e.op.value for e in items[:1]] == ["INSERT"]


def test_fast_mode_trusts_every_role_that_can_connect(
    make_app: MakeApp, sql: SQL, roles: Callable[[str], Role], events: Recorder
) -> None:
    """What the trust model says of fast mode: any role that can connect
    reads the rows by LISTEN and can send events and messages of its own."""
    sql(ORDERS)
    low = roles("low")
    app, ext = listening(make_app, "orders")
    spy = listen_as(low)
    sql("INSERT INTO orders VALUES (1, 'visible')")
    (seen,) = notifications(spy, 1)
    assert "visible" in seen
    events.wait_for(1, "the real row")
    low.run(
        "SELECT pg_notify('dbnotify', %s)",
        ('{"v": 1, "t": "orders", "o": "D", "k": ["id"], "ts": 1, "s": 1, "r": [{"id": 1}]}',),
    )
    (_, forged) = events.wait_for(2, "the forged row")
    assert forged.op.value == "DELETE"


def test_we_drop_only_what_we_made(make_app: MakeApp, sql: SQL) -> None:
    """A user's trigger named dbnotify_audit on a watched table (its function
    in another schema) and an unrelated public.dbnotify_helper() survive
    install-triggers, uninstall-triggers and uninstall-triggers --all."""
    sql(ORDERS)
    sql("CREATE SCHEMA audit")
    sql(
        "CREATE FUNCTION audit.dbnotify_audit() RETURNS trigger LANGUAGE plpgsql "
        "AS $$BEGIN RETURN NULL; END$$"
    )
    sql(
        "CREATE TRIGGER dbnotify_audit AFTER INSERT ON orders "
        "FOR EACH ROW EXECUTE FUNCTION audit.dbnotify_audit()"
    )
    sql("CREATE FUNCTION public.dbnotify_helper() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    sql("CREATE TABLE public.dbnotify_notes (id int)")
    app, ext = make_app()
    ext.watch("orders")

    def theirs() -> list[tuple[Any, ...]]:
        return sql(
            "SELECT 'trigger', tgname FROM pg_trigger WHERE tgname = 'dbnotify_audit' "
            "UNION ALL SELECT 'function', proname FROM pg_proc "
            "WHERE proname IN ('dbnotify_audit', 'dbnotify_helper') "
            "UNION ALL SELECT 'table', relname FROM pg_class WHERE relname = 'dbnotify_notes' "
            "ORDER BY 1, 2"
        )

    before = theirs()
    assert len(before) == 4
    ext.install_triggers(app)
    assert theirs() == before
    assert not any("dbnotify_audit" in o or "helper" in o for o in ext.status(app).orphaned)
    ext.uninstall_triggers(app)
    assert theirs() == before
    ext.install_triggers(app)
    ext.uninstall_triggers(app, everything=True)
    assert theirs() == before
    assert our_functions(sql) == [("dbnotify_helper()", "dbnotify_helper")]


def test_a_table_named_like_ours_is_not_taken(make_app: MakeApp, sql: SQL) -> None:
    """A table of someone else's that has one of our table names stops
    install-triggers with a clear error instead of being used or dropped."""
    sql(ORDERS)
    sql("CREATE TABLE dbnotify_journal (note text)")
    app, ext = make_app()
    ext.watch("orders")
    with pytest.raises(DBNotifyError, match="not made by Flask-DBNotify"):
        ext.install_triggers(app)
    assert sql("SELECT count(*) FROM pg_class WHERE relname = 'dbnotify_journal'") == [(1,)]


LEGACY = """
CREATE TABLE public.dbnotify_payload (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  created_at timestamptz NOT NULL DEFAULT now(), body text NOT NULL);
CREATE FUNCTION public.dbnotify_spill(body text) RETURNS text LANGUAGE sql VOLATILE
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp
  AS 'INSERT INTO "public"."dbnotify_payload" (body) VALUES ($1) RETURNING id::text';
CREATE FUNCTION public.dbnotify_orders_i_0123456789() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp
  AS $$BEGIN PERFORM pg_notify('dbnotify', '{}'); RETURN NULL; END$$;
CREATE TRIGGER dbnotify_orders_i_0123456789 AFTER INSERT ON orders
  REFERENCING NEW TABLE AS dbnotify_new FOR EACH STATEMENT
  EXECUTE FUNCTION public.dbnotify_orders_i_0123456789();
"""


def test_installing_again_fixes_an_earlier_versions_install(
    make_app: MakeApp, sql: SQL, roles: Callable[[str], Role]
) -> None:
    """An install made by an earlier version (SECURITY DEFINER functions any
    role could run, dbnotify_spill()) is reported by status, and replaced
    by running install-triggers again."""
    sql(ORDERS)
    sql(LEGACY)
    app, ext = make_app()
    ext.watch("orders")
    status = ext.status(app)
    assert status.watches["orders"] == "outdated"
    assert any("earlier version" in w for w in status.warnings), status.warnings
    assert any("may be executed by roles other than its owner" in w for w in status.warnings)
    ext.install_triggers(app)
    status = ext.status(app)
    assert status.watches["orders"] == "installed"
    assert status.warnings == []
    names = {name for _, name in our_functions(sql)}
    assert "dbnotify_spill" not in names and "dbnotify_orders_i_0123456789" not in names
    assert sql("SELECT to_regclass('public.dbnotify_payload')") == [(None,)]
    low = roles("low")
    for signature, _ in our_functions(sql):
        ((allowed,),) = sql(
            "SELECT has_function_privilege(%s, %s::regprocedure, 'EXECUTE')",
            (low.name, signature),
        )
        assert not allowed


BOOM = """
CREATE TYPE mood AS ENUM ('calm', 'boom');
CREATE FUNCTION mood_json(m mood) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
  IF m = 'boom' THEN
    -- What turning a row of over 1 GB into JSON raises, without the wait.
    RAISE SQLSTATE '54000' USING MESSAGE = 'out of memory';
  END IF;
  RETURN to_json(m::text);
END $$;
CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood);
CREATE TABLE moods (id int PRIMARY KEY, mood mood);
"""


@pytest.mark.parametrize("durable", [False, True])
def test_rows_that_cannot_become_json_arrive_cut(
    make_app: MakeApp, sql: SQL, events: Recorder, durable: bool
) -> None:
    """A row too large to turn into JSON (PostgreSQL's 1 GB limit) does not
    fail the write: it arrives cut, with its key, in its place among the
    statement's other rows, which arrive whole."""
    sql(BOOM)
    app, ext = listening(make_app, "moods", durable=durable)
    sql("INSERT INTO moods VALUES (1, 'calm'), (2, 'boom'), (3, 'calm')")
    sql("INSERT INTO moods VALUES (4, 'boom')")
    sql("UPDATE moods SET mood = 'boom' WHERE id = 1")
    sql("DELETE FROM moods WHERE id IN (2, 3)")
    got = events.wait_for(7, "every row, whole or cut")
    events.assert_no_more(7, marker(ext, app))
    assert [(e.op.value, e.pk, e.cut, e.new, e.old) for e in got] == [
        ("INSERT", 1, False, {"id": 1, "mood": "calm"}, None),
        ("INSERT", 2, True, {"id": 2}, None),
        ("INSERT", 3, False, {"id": 3, "mood": "calm"}, None),
        ("INSERT", 4, True, {"id": 4}, None),
        ("UPDATE", 1, True, {"id": 1}, {"id": 1}),
        ("DELETE", 2, True, None, {"id": 2}),
        ("DELETE", 3, False, None, {"id": 3, "mood": "calm"}),
    ]
    assert all((e.id is not None) == durable for e in got)


def test_a_cut_row_whose_key_is_gone_still_does_not_fail_the_write(
    make_app: MakeApp, sql: SQL, events: Recorder
) -> None:
    """Even when the key cannot be read either (its column renamed since
    install-triggers), the write succeeds; the rows arrive cut, keyless."""
    sql(BOOM)
    app, ext = listening(make_app, "moods")
    sql("ALTER TABLE moods RENAME COLUMN id TO ident")
    sql("INSERT INTO moods VALUES (1, 'boom'), (2, 'calm')")
    assert sql("SELECT count(*) FROM moods") == [(2,)]
    got = events.wait_for(2, "two keyless cut rows")
    assert [(e.cut, e.pk, e.new) for e in got] == [(True, None, {})] * 2
