"""The README's test command on a machine with no PostgreSQL and no
MySQL/MariaDB server: the run starts a throwaway one of each, says so,
and passes.

The throwaway server is built differently from a distribution's (pgserver's
binaries have no libxml, for one), so the tests that lean on the server's
features run against it here, in a network namespace with only loopback
where one can be made (as root), else with the local server skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import _mariadb
from ._postgres import ENV_SKIP_LOCAL, ENV_URL

ROOT = Path(__file__).resolve().parent.parent
# The modules that use the most of the server: column types, DDL, roles,
# partitions, and the hardening of what we install.
MODULES = [
    "tests/test_events.py",
    "tests/test_triggers.py",
    "tests/test_security.py",
    "tests/test_partitions.py",
    "tests/test_hardening.py",
]


def _isolated() -> list[str]:
    """A command prefix that runs in a new network namespace holding only
    loopback, or ``[]`` where this user cannot make one."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if os.geteuid() != 0 or unshare is None or ip is None:
        return []
    probe = subprocess.run(
        [unshare, "--net", ip, "link", "set", "lo", "up"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        return []
    return [unshare, "--net", "sh", "-c", f'{ip} link set lo up && exec "$0" "$@"']


def test_the_suite_passes_where_no_server_runs() -> None:
    prefix = _isolated()
    env = {k: v for k, v in os.environ.items() if k not in (ENV_URL, _mariadb.ENV_URL)}
    if not prefix:
        env[ENV_SKIP_LOCAL] = env[_mariadb.ENV_SKIP_LOCAL] = "1"
    # Their SQLite cases need no server, and the suite runs them anyway;
    # their binary-log cases start a server of their own wherever they run.
    done = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "not sqlite and not binlog",
            *MODULES,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"the run failed against a throwaway server:\n{out[-6000:]}"
    said = [line for line in out.splitlines() if line.startswith("PostgreSQL for the tests")]
    assert said, f"the run did not say which server it used:\n{out[:3000]}"
    first = said[0]
    expected = "no server at 127.0.0.1:5432" if prefix else "127.0.0.1:5432 skipped"
    assert first.startswith(f"PostgreSQL for the tests: {expected}"), first
    assert "; started a throwaway PostgreSQL" in first, first
    mysql = [line for line in out.splitlines() if line.startswith("MySQL/MariaDB for the tests")]
    expected = "no server at 127.0.0.1:3306" if prefix else "127.0.0.1:3306 skipped"
    assert mysql and mysql[0].startswith(f"MySQL/MariaDB for the tests: {expected}"), mysql
    assert "; started a throwaway mariadbd" in mysql[0], mysql
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary
