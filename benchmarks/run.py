"""Every benchmark, one after the other: ``.venv/bin/python benchmarks/run.py``.

Each script runs its contenders side by side in one process run and prints
its own table with ratios (see docs/benchmarks.rst for today's figures):

- postgresql.py: raw psycopg2 loop, Flask-DBNotify, SQLNotify (bench extra)
- sqlite.py:     bare polling loop, Flask-DBNotify, SQLNotify (bench extra)
- sqlite_instructions.py: what SQLite's triggers cost a writer, in CPU
                 instructions (callgrind): repeatable on a busy machine
- durable.py:    fast vs durable watches, replay after an outage
- memory.py:     a listener's RSS over a million events
- processes.py:  one vs eight listening processes
- write_cost.py: what each capture costs writers, in the same rounds
- wal.py:        triggers against WAL capture (a throwaway server of its own)
- mysql.py:      bare polling loop and Flask-DBNotify on MariaDB, and what
                 triggers and the binary log cost its writers (a throwaway
                 mariadbd of its own)

PostgreSQL scripts use $DBNOTIFY_BENCH_URL (default: the local server's
``test`` database) and create their own tables there; wal.py needs
``wal_level = logical`` and starts a throwaway server instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPTS = [
    "postgresql.py",
    "sqlite.py",
    "sqlite_instructions.py",
    "durable.py",
    "memory.py",
    "processes.py",
    "write_cost.py",
    "wal.py",
    "mysql.py",
]


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    failed = []
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        if subprocess.run([sys.executable, os.path.join(here, script)]).returncode:
            failed.append(script)
        print(flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
