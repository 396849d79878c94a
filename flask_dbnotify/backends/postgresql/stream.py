"""The listener's connection: LISTEN, wait in ``select()``, read."""

from __future__ import annotations

import secrets
import select
import time
from typing import Any

import psycopg2
import psycopg2.extensions

from ...errors import DBNotifyError
from ..base import Stream
from ..common import reason
from .common import CHANNEL, IDENTITY, LISTENER_NAME, check_channel, ident
from .connection import cannot_connect, discard


class PostgreSQLStream(Stream):
    """A dedicated connection that LISTENs and runs nothing else but a
    liveness probe.

    It is an asynchronous psycopg2 connection (always autocommit), so every
    query waits in ``select()`` with a deadline: a peer that stops answering
    without closing (a stalled proxy or load balancer) is noticed by the
    probe's timeout, not only by TCP keepalives.

    With our channel it listens on a channel of its own, where the listener
    sends itself hearing checks from another session: a connection that
    answers queries can still receive nothing (a pooler in transaction or
    statement mode hands the LISTENing server session to other clients).
    """

    def __init__(self, where: str, connect: dict[str, Any], settings: Any) -> None:
        self.timeout = settings.connect_timeout
        kwargs = {
            "application_name": LISTENER_NAME,
            "connect_timeout": max(1, int(settings.connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": settings.keepalive_idle,
            "keepalives_interval": max(1, settings.keepalive_idle // 3),
            "keepalives_count": 3,
            # Abort sends that go unacknowledged (a vanished peer).
            "tcp_user_timeout": int(settings.keepalive_idle * 2000),
            **connect,
            # Pieces of long messages are cut at UTF-8 character boundaries.
            "client_encoding": "UTF8",
        }
        #: Hearing checks come on a channel of this connection's own, so
        #: no other process handles them (the server still signals every
        #: listening session), and they never reach decode().
        self.check_channel = check_channel(secrets.token_hex(8))
        self._expected: str | None = None
        self._arrived = False
        try:
            self.conn = psycopg2.connect(**kwargs, async_=True)
        except psycopg2.Error as exc:
            raise cannot_connect(where, exc) from exc
        try:
            try:
                self._wait("connecting")
            except psycopg2.Error as exc:
                raise cannot_connect(where, exc) from exc
            self.cur = self.conn.cursor()
            try:
                # One query, so one server session even through a pooler;
                # the result is the last statement's.
                # The snapshot is taken before LISTEN is in effect (at the
                # COMMIT), the bound after: kept in a setting of this session
                # across the COMMIT, as only the last result comes back.
                self._run(
                    f"LISTEN {ident(CHANNEL)}; LISTEN {ident(self.check_channel)}; "
                    "SELECT set_config('dbnotify.listen_snapshot', "
                    "pg_current_snapshot()::text, false); COMMIT; "
                    "SELECT current_setting('dbnotify.listen_snapshot'), "
                    f"pg_snapshot_xmin(pg_current_snapshot())::text, {IDENTITY}"
                )
                snapshot, bound, *identity = self.cur.fetchone()
                #: Every transaction older than this had ended by the time
                #: LISTEN was in effect; a younger one may notify us.
                self.listening_from = int(bound)
                #: What had committed when LISTEN took effect.
                self.snapshot: str = snapshot
                #: Which database of which server this session is in.
                self.identity: tuple[Any, ...] = tuple(identity)
            except psycopg2.Error as exc:
                raise DBNotifyError(f"cannot LISTEN at {where}: {reason(exc)}") from exc
        except BaseException:
            self.conn.close()
            raise

    def _wait(self, what: str) -> None:
        """Drive the connection until its current operation is done."""
        deadline = time.monotonic() + self.timeout
        while True:
            state = self.conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise psycopg2.OperationalError(
                    f"no answer from the server within {self.timeout:g}s while {what}"
                )
            if state == psycopg2.extensions.POLL_READ:
                select.select([self.conn], [], [], left)
            else:
                select.select([], [self.conn], [], left)

    def _run(self, statement: Any, params: Any = None) -> None:
        self.cur.execute(statement, params)
        self._wait("running a query")

    def wait(self, timeout: float, wake_fd: int) -> None:
        if self.conn.notifies:
            return
        select.select([self.conn, wake_fd], [], [], timeout)

    def read(self) -> list[Any]:
        self.conn.poll()
        notes = self.conn.notifies
        if not notes:
            return []
        self.conn.notifies = []
        raw = [(note.pid, note.payload) for note in notes if note.channel == CHANNEL]
        if len(raw) != len(notes):
            # Anyone may send to the check channel; only the token we wait
            # for counts, so a forger can at worst make a check pass.
            expected = self._expected
            for note in notes:
                if note.channel == self.check_channel and note.payload == expected:
                    self._arrived = True
        return raw

    def expect(self, token: str | None) -> None:
        self._expected, self._arrived = token, False

    def heard(self) -> bool:
        return self._arrived

    def probe(self) -> None:
        self._run("SELECT 1")
        self.cur.fetchall()

    def close(self) -> None:
        self.conn.close()

    def discard(self) -> None:
        discard(self.conn)
