"""What SQLite's triggers cost a writer, counted in CPU instructions.

Run:  .venv/bin/python benchmarks/sqlite_instructions.py [--rows 20000]

Wall-clock write costs on a shared machine move by more than the
differences between the triggers; ``valgrind --tool=callgrind`` counts the
instructions a run executes instead, the same on every run of the same
code (on any load). Each contender's triggers are installed on a table of
its own in a new file, and a process per contender runs one
``--rows``-row INSERT transaction, and another that INSERT and then an
UPDATE of every row; subtracting the same process with no rows, and the
INSERT from the pair, leaves what a row of each costs.

- plain: the table without triggers, the yardstick.
- bare outbox: ``INSERT INTO outbox (row_id) VALUES (NEW.id)``.
- flask-dbnotify: the triggers ``install-triggers`` creates.
- SQLNotify (the bench extra): the triggers it creates, taken from the
  database after it started watching INSERT and UPDATE.

Needs valgrind (on every machine kind here; ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

TABLE = "CREATE TABLE {name} (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, at TEXT)"

#: One run: the schema, then (in one transaction each) the INSERT and the
#: UPDATE of every row, as another process would write them.
RUN = r"""
import json, sqlite3, sys
schema, table, rows = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
conn = sqlite3.connect(sys.argv[4], isolation_level=None)
conn.execute("PRAGMA journal_mode = WAL")
conn.execute("PRAGMA synchronous = NORMAL")
for statement in schema:
    conn.execute(statement)
conn.execute("BEGIN")
conn.execute(f"WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s "
             f"WHERE value < {rows}) INSERT INTO {table} (name, qty, at) "
             f"SELECT 'item ' || value, value, datetime() FROM s")
conn.execute("COMMIT")
if sys.argv[5] == "update":
    conn.execute("BEGIN")
    conn.execute(f"UPDATE {table} SET qty = qty + 1")
    conn.execute("COMMIT")
"""


def schema_of(path: str, table: str) -> list[str]:
    """The statements that make ``table`` and everything its triggers
    write to, as they stand in ``path``, and the rows of our shapes."""
    conn = sqlite3.connect(path)
    try:
        tables = [
            sql
            for name, sql in conn.execute(
                "SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND sql IS NOT NULL"
            )
            if name != table and not name.startswith("sqlite_")
        ]
        triggers = [
            sql
            for (sql,) in conn.execute(
                "SELECT sql FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = ?", (table,)
            )
        ]
        shapes = []
        if any("dbnotify_shapes" in sql for sql in tables):
            shapes = [
                "INSERT INTO dbnotify_shapes VALUES ({}, {})".format(*map(_literal, row))
                for row in conn.execute("SELECT key, header FROM dbnotify_shapes")
            ]
    finally:
        conn.close()
    return [TABLE.format(name=table), *tables, *shapes, *triggers]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def ours(workdir: str) -> list[str]:
    from flask import Flask

    from flask_dbnotify import DBNotify

    path = os.path.join(workdir, "ours.db")
    with sqlite3.connect(path) as conn:
        conn.execute(TABLE.format(name="ours"))
    app = Flask("bench")
    app.config.update(DBNOTIFY_DATABASE_URI=f"sqlite:///{path}", DBNOTIFY_AUTOSTART=False)
    dbnotify = DBNotify(app)
    dbnotify.watch("ours", operations=["insert", "update"])
    dbnotify.install_triggers(app)
    return schema_of(path, "ours")


def peer(workdir: str) -> list[str]:
    from _common import Arrivals
    from sqlite import start_peer  # benchmarks/sqlite.py

    path = os.path.join(workdir, "peer.db")
    with sqlite3.connect(path) as conn:
        conn.execute(TABLE.format(name="peer"))
    start_peer(path, Arrivals())()
    return schema_of(path, "peer")


def instructions(schema: list[str], table: str, rows: int, update: bool, workdir: str) -> int:
    path = tempfile.mktemp(suffix=".db", dir=workdir)
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            RUN,
            json.dumps(schema),
            table,
            str(rows),
            path,
            "update" if update else "insert",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    found = re.search(r"Collected : (\d+)", out)
    if found is None:
        raise SystemExit(f"callgrind printed no count:\n{out}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    workdir = tempfile.mkdtemp(prefix="dbnotify-bench-")
    contenders = {
        "plain": ([TABLE.format(name="plain")], "plain"),
        "bare outbox": (
            [
                TABLE.format(name="bare"),
                "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, row_id INTEGER)",
                "CREATE TRIGGER bare_i AFTER INSERT ON bare BEGIN "
                "INSERT INTO outbox (row_id) VALUES (NEW.id); END",
                "CREATE TRIGGER bare_u AFTER UPDATE ON bare BEGIN "
                "INSERT INTO outbox (row_id) VALUES (NEW.id); END",
            ],
            "bare",
        ),
        "flask-dbnotify": (ours(workdir), "ours"),
    }
    try:
        contenders["SQLNotify (peer)"] = (peer(workdir), "peer")
    except ImportError as exc:
        print(f"SQLNotify not measured ({exc}): pip install -e '.[bench]'")
    rows = args.rows
    jobs = [
        (name, n, update)
        for name in contenders
        for n, update in ((0, False), (rows, False), (rows, True))
    ]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        counts = dict(
            zip(
                jobs,
                pool.map(lambda job: instructions(*contenders[job[0]], *job[1:], workdir), jobs),
                strict=True,
            )
        )
    insert = {n: (counts[n, rows, False] - counts[n, 0, False]) / rows for n in contenders}
    update = {n: (counts[n, rows, True] - counts[n, rows, False]) / rows for n in contenders}
    print(
        f"SQLite {sqlite3.sqlite_version}: CPU instructions per row (callgrind) of a "
        f"{rows:,}-row INSERT transaction and of an UPDATE of every row, against the plain table"
    )
    print(f"{'':18} {'INSERT':>10} {'':7} {'UPDATE':>10}")
    for name in contenders:
        print(
            f"{name:18} {insert[name]:10,.0f} {insert[name] / insert['plain']:6.2f}x "
            f"{update[name]:10,.0f} {update[name] / update['plain']:6.2f}x"
        )
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
