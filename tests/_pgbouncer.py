"""A real pgbouncer for the tests, in front of the test database's server.

One process serves three pools, one per pooling mode, each under an alias
name of its own that leads to the same database: ``URL`` as a client of the
application would write it, through pgbouncer in that mode.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import make_url

MODES = ("session", "transaction", "statement")
WAIT = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _quote(value: str) -> str:
    """A value in pgbouncer's connection strings (libpq style)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PgBouncer:
    """``pgbouncer`` on a free port of 127.0.0.1, trusting every client,
    logging to a file; :meth:`close` stops it."""

    def __init__(self, server_url: str) -> None:
        binary = shutil.which("pgbouncer") or next(
            (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
        )
        if binary is None:
            raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
        url = make_url(server_url)
        self.user = url.username or "postgres"
        self.port = _free_port()
        # Readable by the unprivileged user pgbouncer runs as when we are root.
        self.dir = Path(tempfile.mkdtemp(prefix="dbnotify-pgbouncer-"))
        self.dir.chmod(0o755)
        target = [f"host={_quote(url.host or '127.0.0.1')}", f"port={url.port or 5432}"]
        target += [f"dbname={_quote(url.database or 'postgres')}", f"user={_quote(self.user)}"]
        if url.password:
            target.append(f"password={_quote(url.password)}")
        databases = "\n".join(
            f"{mode}_pool = {' '.join(target)} pool_mode={mode}" for mode in MODES
        )
        (self.dir / "users.txt").write_text(f'"{self.user}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"""[databases]
{databases}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir / "users.txt"}
pool_mode = session
max_client_conn = 200
default_pool_size = 10
log_connections = 0
log_disconnections = 0
"""
        )
        for path in self.dir.iterdir():
            path.chmod(0o644)
        command = [binary]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # it refuses to run as root
        command.append(str(self.dir / "pgbouncer.ini"))
        self.log_path = self.dir / "pgbouncer.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_until_up()
        except BaseException:
            self.close()
            raise

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer not listening within {WAIT}s: {self.log()}")
            time.sleep(0.02)

    def url(self, mode: str) -> str:
        """The URL of the test database through the pool in ``mode``."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{mode}_pool"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        shutil.rmtree(self.dir, ignore_errors=True)
