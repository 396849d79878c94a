"""Find, or start for the run, a PostgreSQL server for the test suite.

Resolution order of :func:`find_or_start_postgres`:

1. ``$DBNOTIFY_TEST_POSTGRES_URL``, used as is (an error if it does not answer);
2. a server on 127.0.0.1:5432 as user ``postgres``, database ``postgres``;
3. a throwaway server in a temporary directory on a free port, with the
   binaries shipped by the ``pgserver`` wheel, else the system's
   ``initdb``/``pg_ctl``.

``DBNOTIFY_TEST_POSTGRES_SKIP_LOCAL=1`` skips step 2 (to exercise step 3).

:func:`start_private_postgres` starts a :class:`ThrowawayServer` that a test
may stop and start again (the shared server is never stopped).
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import psycopg2

logger = logging.getLogger(__name__)

ENV_URL = "DBNOTIFY_TEST_POSTGRES_URL"
ENV_SKIP_LOCAL = "DBNOTIFY_TEST_POSTGRES_SKIP_LOCAL"
LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
START_TIMEOUT = 60.0
#: What a server needs for logical replication slots (the shared server runs
#: wal_level=replica and is never reconfigured). Decoding reads flushed WAL
#: only, and a throwaway server commits asynchronously (synchronous_commit =
#: off), which would hold a commit back from a slot for up to 3 x
#: wal_writer_delay: commits flush here.
LOGICAL_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "synchronous_commit": "on",
}
FIX_HINT = (
    f"Set {ENV_URL}=postgresql://USER@HOST:PORT/DBNAME to a server you run, "
    "or `pip install pgserver` so a throwaway server can be started."
)


class Found(NamedTuple):
    """A server for the run: its URL, what stops it (if we started it),
    and one line saying which server it is and why."""

    url: str
    cleanup: Callable[[], None]
    summary: str


def _version(url: str) -> str:
    with psycopg2.connect(url, connect_timeout=3) as conn, conn.cursor() as cur:
        cur.execute("SHOW server_version")
        (version,) = cur.fetchone() or ("?",)
    conn.close()
    return f"PostgreSQL {str(version).split()[0]}"


def _address(url: str) -> str:
    match = re.search(r"@([^/]+)/", url)
    return match.group(1) if match else url


def _connect_error(url: str) -> str | None:
    """None if ``url`` accepts a connection, else why not."""
    try:
        psycopg2.connect(url, connect_timeout=3).close()
    except psycopg2.Error as exc:
        return str(exc).strip() or type(exc).__name__
    return None


def _binary_dirs() -> list[tuple[str, Path]]:
    """Candidate directories holding initdb, pg_ctl and postgres, best first."""
    found: list[tuple[str, Path]] = []
    # pgserver is used only as a distribution of binaries: its server API
    # listens on a Unix socket only, and as root it runs `useradd pgserver`
    # and chmods o+rx every parent directory of its data and install dirs.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        found.append(("pgserver", Path(spec.origin).parent / "pginstall" / "bin"))
    system = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)],
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path is not None:
        system.append(Path(on_path).resolve().parent)
    found += [("system", d) for d in dict.fromkeys(system)]
    needed = ("initdb", "pg_ctl", "postgres")
    return [(kind, d) for kind, d in found if all((d / n).is_file() for n in needed)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


class ThrowawayServer:
    """A PostgreSQL server of our own, in a temporary directory, on a free
    port of 127.0.0.1 (as ``nobody`` when run as root).

    It can be stopped and started again on the same port with the same data
    (to take the database away from a client and give it back);
    :meth:`destroy` stops it for good and removes its files.
    """

    def __init__(self, bindir: Path, settings: dict[str, str] | None = None) -> None:
        self.settings = settings or {}
        # PostgreSQL refuses to run as root, so as root run it as `nobody`.
        self.user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        self.tmp = Path(tempfile.mkdtemp(prefix="dbnotify-pg-"))
        if self.user is not None:
            os.chown(self.tmp, self.user.pw_uid, self.user.pw_gid)
        self.data, self.log_file = self.tmp / "data", self.tmp / "server.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.bindir = bindir
        self.port = 0
        self.url = ""
        atexit.register(self.destroy)  # safety net if the caller never runs cleanup
        try:
            self._init(bindir)
            self.start()
        except BaseException:
            self.destroy()
            raise
        logger.info(
            "started throwaway PostgreSQL from %s at %s (data in %s)", bindir, self.url, self.tmp
        )

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        user = self.user
        return subprocess.run(
            list(args),
            cwd=self.tmp,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            extra_groups=None if user is None else [],
        )

    def _init(self, bindir: Path) -> None:
        tmp = self.tmp
        try:
            self._run(str(bindir / "postgres"), "--version", timeout=30)
        except PermissionError:
            # `nobody` cannot reach e.g. a venv under /root (mode 700): copy
            # pgserver's tree, keeping the layout its RPATH
            # ($ORIGIN/../../../pgserver.libs) expects.
            site = bindir.parents[2]
            if bindir != site / "pgserver" / "pginstall" / "bin":
                raise RuntimeError(f"{bindir} is not executable by user nobody") from None
            for sub in ("bin", "lib", "share"):
                shutil.copytree(bindir.parent / sub, tmp / "pg/pgserver/pginstall" / sub)
            if (site / "pgserver.libs").is_dir():
                shutil.copytree(site / "pgserver.libs", tmp / "pg/pgserver.libs")
            bindir = tmp / "pg/pgserver/pginstall/bin"
        self.bindir = bindir
        res = self._run(
            str(bindir / "initdb"),
            *("-D", str(self.data), "-U", "postgres", "-A", "trust"),
            *("-E", "UTF8", "--locale=C", "--no-sync"),
        )
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{res.stdout}{res.stderr}")
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                "unix_socket_directories = ''\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                + "".join(f"{name} = {value}\n" for name, value in self.settings.items())
            )

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self) -> None:
        """Start the server; return once it accepts connections."""
        deadline = time.monotonic() + START_TIMEOUT
        try:
            res = self._run(
                str(self.bindir / "pg_ctl"),
                *("-D", str(self.data), "-l", str(self.log_file)),
                *("-w", "-t", str(int(START_TIMEOUT)), "start"),
                timeout=START_TIMEOUT + 10,
            )
        except subprocess.TimeoutExpired:
            res = subprocess.CompletedProcess([], 1, "", "pg_ctl start hung")
        error = _connect_error(self.url) if res.returncode == 0 else res.stderr.strip()
        while error is not None and res.returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            error = _connect_error(self.url)
        if error is not None:
            raise RuntimeError(
                f"throwaway PostgreSQL ({self.bindir}) did not come up (waited at most "
                f"{START_TIMEOUT:.0f} s): {error}\nserver log tail:\n{_tail(self.log_file)}"
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl -m MODE``: ``fast`` ends every session
        with an error, ``immediate`` kills the server as a crash would)."""
        res = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", timeout=30
        )
        if res.returncode != 0:
            raise RuntimeError(f"pg_ctl stop -m {mode} failed: {res.stderr.strip()}")

    def destroy(self) -> None:
        """Stop the server if it runs, and remove its directory."""
        if not self.tmp.exists():
            return
        try:
            if self.running:
                res = self._run(
                    str(self.bindir / "pg_ctl"),
                    *("-D", str(self.data), "-m", "fast", "-w", "stop"),
                    timeout=30,
                )
                if res.returncode != 0:
                    logger.warning("pg_ctl stop failed: %s", res.stderr.strip())
                    pid = int((self.data / "postmaster.pid").read_text().split()[0])
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as exc:
            logger.warning("could not stop throwaway PostgreSQL in %s: %s", self.tmp, exc)
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_private_postgres(settings: dict[str, str] | None = None) -> ThrowawayServer:
    """Start a throwaway server for one test module to stop and start at
    will (never the shared server), with ``settings`` added to its
    postgresql.conf; raise RuntimeError if none can start."""
    tried: list[str] = []
    for kind, bindir in _binary_dirs():
        try:
            return ThrowawayServer(bindir, settings)
        except (RuntimeError, OSError, KeyError, subprocess.SubprocessError) as exc:
            tried.append(f"{kind} ({bindir}): {exc}")
    if not tried:
        tried.append("no initdb/pg_ctl/postgres: neither pgserver nor the system's")
    raise RuntimeError("could not start a private PostgreSQL:\n  - " + "\n  - ".join(tried))


def find_or_start_postgres() -> Found:
    """A usable server; its ``cleanup`` stops what was started."""
    url = os.environ.get(ENV_URL)
    if url:
        error = _connect_error(url)
        if error is not None:
            raise RuntimeError(f"{ENV_URL}={url} does not answer: {error}")
        return Found(url, lambda: None, f"${ENV_URL}: {_version(url)} at {_address(url)}")

    tried: list[str] = [f"${ENV_URL}: not set"]
    local = _address(LOCAL_URL)
    if os.environ.get(ENV_SKIP_LOCAL) == "1":
        tried.append(f"{LOCAL_URL}: skipped ({ENV_SKIP_LOCAL}=1)")
        no_local = f"{local} skipped ({ENV_SKIP_LOCAL}=1)"
    else:
        error = _connect_error(LOCAL_URL)
        if error is None:
            summary = f"the local server, {_version(LOCAL_URL)} at {local}"
            return Found(LOCAL_URL, lambda: None, summary)
        tried.append(f"{LOCAL_URL}: {error}")
        no_local = f"no server at {local} ({error.splitlines()[0]})"

    candidates = _binary_dirs()
    if not any(kind == "pgserver" for kind, _ in candidates):
        tried.append("pgserver: not installed")
    if not any(kind == "system" for kind, _ in candidates):
        tried.append("system initdb/pg_ctl: none in /usr/lib/postgresql/*/bin or PATH")
    for kind, bindir in candidates:
        try:
            server = ThrowawayServer(bindir)
            return Found(
                server.url,
                server.destroy,
                f"{no_local}; started a throwaway {_version(server.url)} at "
                f"{_address(server.url)} ({kind} binaries), removed at the end",
            )
        except (RuntimeError, OSError, KeyError, subprocess.SubprocessError) as exc:
            logger.warning("could not start PostgreSQL from %s: %s", bindir, exc)
            tried.append(f"{kind} ({bindir}): {exc}")
    tried_text = "\n  - ".join(tried)
    raise RuntimeError(f"no PostgreSQL server for the tests. Tried:\n  - {tried_text}\n{FIX_HINT}")
