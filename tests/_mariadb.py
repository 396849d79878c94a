"""Find, or start for the run, a MySQL/MariaDB server for the test suite.

Resolution order of :func:`find_or_start_mariadb`:

1. ``$DBNOTIFY_TEST_MYSQL_URL`` (``mysql+pymysql://...``), used as is (an
   error if it does not answer);
2. a server on 127.0.0.1:3306 as ``root`` without a password;
3. a throwaway ``mariadbd`` in a temporary directory on a free port
   (Debian's ``mariadb-server`` package has it).

``DBNOTIFY_TEST_MYSQL_SKIP_LOCAL=1`` skips step 2 (to exercise step 3).
:class:`ThrowawayMariaDB` is also what tests and benchmarks start when
they need a server of their own (with the binary log on, say): the shared
one is never reconfigured.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, NamedTuple

import pymysql
import sqlalchemy as sa

ENV_URL = "DBNOTIFY_TEST_MYSQL_URL"
ENV_SKIP_LOCAL = "DBNOTIFY_TEST_MYSQL_SKIP_LOCAL"
LOCAL_URL = "mysql+pymysql://root@127.0.0.1:3306/"
START_TIMEOUT = 60.0


class Found(NamedTuple):
    url: str
    summary: str
    cleanup: Any


def connect(url: str, database: str | None = None, **kwargs: Any) -> Any:
    """A PyMySQL connection (autocommit) to the server of ``url``."""
    parts = sa.make_url(url)
    return pymysql.connect(
        host=parts.host or "127.0.0.1",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        database=database if database is not None else (parts.database or None),
        autocommit=True,
        charset="utf8mb4",
        **kwargs,
    )


def _answers(url: str) -> str | None:
    """Why ``url`` does not answer, or None when it does."""
    try:
        connect(url, connect_timeout=3).close()
    except pymysql.MySQLError as exc:
        return str(exc)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )


class ThrowawayMariaDB:
    """A mariadbd in a directory of its own, on a free port, root without a
    password; ``binlog=True`` turns the row-based binary log on."""

    def __init__(self, binlog: bool = False, extra: tuple[str, ...] = ()) -> None:
        server, install = _tool("mariadbd"), _tool("mariadb-install-db")
        if server is None or install is None:
            raise RuntimeError(
                "no MySQL/MariaDB server answers and mariadbd is not installed "
                "(Debian: apt-get install mariadb-server), or set "
                f"{ENV_URL}=mysql+pymysql://USER:PASSWORD@HOST:PORT/"
            )
        self.dir = tempfile.mkdtemp(prefix="dbnotify-mariadb-")
        self.port = free_port()
        data = os.path.join(self.dir, "data")
        subprocess.run(
            [
                install,
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
        )
        args = [
            server,
            "--no-defaults",
            f"--datadir={data}",
            "--user=root",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={os.path.join(self.dir, 'sock')}",
            "--innodb-flush-log-at-trx-commit=2",
            "--max-connections=300",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
        ]
        if binlog:
            args += [
                f"--log-bin={os.path.join(self.dir, 'binlog')}",
                "--server-id=1",
                "--binlog-format=ROW",
                "--binlog-row-image=FULL",
                "--binlog-row-metadata=FULL",
                "--sync-binlog=0",
            ]
        self.args = args + list(extra)
        self.url = f"mysql+pymysql://root@127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(os.path.join(self.dir, "error.log"), "a") as log:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while (why := _answers(self.url)) is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"mariadbd did not start ({why}): see {self.dir}/error.log")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def find_or_start_mariadb() -> Found:
    """The run's server; RuntimeError saying why when there is none."""
    url = os.environ.get(ENV_URL)
    if url:
        why = _answers(url)
        if why is not None:
            raise RuntimeError(f"{ENV_URL}={url} does not answer: {why}")
        return Found(url, f"{url} (from {ENV_URL})", lambda: None)
    if os.environ.get(ENV_SKIP_LOCAL) == "1":
        why = "127.0.0.1:3306 skipped"
    else:
        failure = _answers(LOCAL_URL)
        if failure is None:
            return Found(LOCAL_URL, f"the local server ({LOCAL_URL})", lambda: None)
        why = f"no server at 127.0.0.1:3306 ({failure})"
    server = ThrowawayMariaDB()
    summary = f"{why}; started a throwaway mariadbd on port {server.port}"
    return Found(server.url, summary, server.cleanup)
