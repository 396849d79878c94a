"""Hearing checks: whether the listener's connection receives notifications.

A connection that answers queries may still receive none (a pooler in
transaction or statement mode between it and the server). So on
connecting, and then when idle, the reader has the dispatcher send a
notification from another session, and waits for it on its own stream.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from ._log import RateLimited
from ._queue import HearingCheck
from .backends import DEAF, Stream

# What the listener finds is logged on its logger.
log = logging.getLogger("flask_dbnotify.listener")

#: After the hearing check made on connecting, an idle listener checks again
#: at most this often (while deaf, every probe interval): each check is a
#: NOTIFY, which wakes every listening session of the database.
RECHECK_EVERY = 60.0


class Hearing:
    """What the reader knows of whether its connection hears notifications."""

    def __init__(self, where: str) -> None:
        #: The listener's database, for the log.
        self.where = where
        self._deaf_log = RateLimited(log, interval=300.0)
        self.reset()

    def reset(self) -> None:
        #: The last check did not arrive in time.
        self.deaf = False
        #: When a check last arrived.
        self.heard_at: datetime | None = None

    def ask(self, stream: Stream) -> HearingCheck | None:
        """A check for ``stream`` to wait for, if it takes checks: the
        caller has the dispatcher send it."""
        if stream.check_channel is None:
            return None
        check = HearingCheck(stream.check_channel)
        stream.expect(check.token)
        return check

    def recheck_after(self, idle_limit: float) -> float:
        """How long an idle reader waits between checks."""
        return idle_limit if self.deaf else RECHECK_EVERY

    def judge(self, check: HearingCheck, stream: Stream, now: float, answer_within: float) -> bool:
        """Settle ``check`` if it can be: whether it is done with."""
        if stream.heard():
            self.heard_at = datetime.now(UTC)
            if self.deaf:
                self.deaf = False
                log.warning(
                    "the listener's connection to %s receives notifications again", self.where
                )
            return True
        if check.failed:
            return True  # Not sent: no verdict; another check comes later.
        if check.sent_at is None or now - check.sent_at < answer_within:
            return False
        if not check.probed:
            # Not arrived in time. If the connection were dead, that would
            # be why: the probe raises then, and the listener reconnects.
            # What the probe brought in is read on the next round.
            stream.probe()
            check.probed = True
            return False
        # Said before it shows in listener_state(): whoever sees the state
        # finds the line in the log.
        self._deaf_log.warning("the listener's connection to %s %s", self.where, DEAF)
        self.deaf = True
        return True
