"""The connection budget: an idle process holds one connection to the
database, its listener's. 64 listening processes (8 hosts of 8 workers)
fit under PostgreSQL's default ``max_connections = 100``, and every one of
them receives every row.

The processes are forked from one (tests/apps/fleet.py), as a preloading
server forks its workers; the server is a private one, so the shared
server's connections are neither used nor counted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy.engine import make_url

from flask_dbnotify import DBNotify

from ._helpers import SQL, Lines, not_here, poll_until
from ._postgres import ThrowawayServer, start_private_postgres

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 64
ROWS = 50
LISTENER_NAME = "flask-dbnotify listener"


@pytest.fixture(scope="module")
def small_server() -> Iterator[ThrowawayServer]:
    try:
        server = start_private_postgres({"max_connections": "100"})
    except RuntimeError as exc:
        not_here(f"private PostgreSQL server NOT STARTED: {exc}")
    yield server
    server.destroy()


def sessions(sql: SQL) -> list[tuple[str, str]]:
    """``(application_name, state)`` of every client session on the
    database but ``sql``'s own."""
    return sql(
        "SELECT application_name, state FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend'"
    )


def test_64_processes_listen_under_max_connections_100(small_server: ThrowawayServer) -> None:
    admin = SQL(small_server.url)
    admin("DROP DATABASE IF EXISTS budget")
    admin("CREATE DATABASE budget")
    url = make_url(small_server.url).set(database="budget").render_as_string(hide_password=False)
    sql = SQL(url)
    sql("CREATE TABLE orders (id int PRIMARY KEY, note text)")
    app = Flask(__name__)
    app.config.update(DBNOTIFY_DATABASE_URI=url, DBNOTIFY_AUTOSTART=False)
    ext = DBNotify(app)
    ext.watch("orders")
    ext.install_triggers(app)
    ext.close(app)
    # A closed session leaves pg_stat_activity a moment after the client
    # has gone.
    poll_until(lambda: sessions(sql) == [], "no session left once the app is closed")

    fleet = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.fleet", url, str(PROCESSES)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    out = Lines(fleet.stdout, "the fleet's stdout")
    try:
        listening: set[int] = set()
        failed: list[str] = []
        deadline = time.monotonic() + 120
        while len(listening) + len(failed) < PROCESSES:
            what, pid, *rest = out.readline(
                f"{PROCESSES} processes listening", max(deadline - time.monotonic(), 0.0)
            ).split(" ", 2)
            if what == "listening":
                listening.add(int(pid))
            elif what == "failed":
                failed.append(f"{pid}: {rest}")
        assert not failed, f"{len(failed)} of {PROCESSES} could not listen: {failed[:3]}"

        # Once idle, each process keeps its listener's connection only.
        def idle() -> list[tuple[str, str]]:
            now = sessions(sql)
            return now if len(now) == PROCESSES else []

        held = poll_until(idle, f"{PROCESSES} sessions, one per process", timeout=60)
        assert {name for name, _ in held} == {LISTENER_NAME}, held

        for first in range(0, ROWS, 10):
            sql(
                "INSERT INTO orders SELECT g, 'row' FROM generate_series(%s, %s) g",
                (first + 1, first + 10),
            )
        got: dict[int, set[int]] = {pid: set() for pid in listening}
        deadline = time.monotonic() + 60
        wanted = set(range(1, ROWS + 1))
        while any(rows != wanted for rows in got.values()):
            left = max(deadline - time.monotonic(), 0.0)
            what, pid, pk = out.readline(f"{ROWS} rows in each process", left).split(" ")
            assert what == "got", what
            got[int(pid)].add(int(pk))
        assert set(got) == listening
    finally:
        os.killpg(fleet.pid, signal.SIGTERM)
        try:
            fleet.wait(30)
            stuck = False
        except subprocess.TimeoutExpired:
            os.killpg(fleet.pid, signal.SIGKILL)  # the children too: one group
            fleet.wait(10)
            stuck = True
        assert fleet.stdout is not None and fleet.stderr is not None
        errors = fleet.stderr.read().decode(errors="replace")
        fleet.stdout.close()
        fleet.stderr.close()
        sql.close()
        admin("DROP DATABASE IF EXISTS budget WITH (FORCE)")
        admin.close()
    assert not stuck, f"the fleet did not stop within 30 s of SIGTERM: {errors[-3000:]}"
    assert "Traceback" not in errors, errors[-3000:]
