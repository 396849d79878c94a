"""Which journal ids a reader has seen (:class:`Seen`).

InnoDB gives out AUTO_INCREMENT ids when rows are inserted, not when
their transactions commit: a transaction that began first may commit
last, and one rolled back leaves its ids unused. So a reader cannot read
"past the last id" alone: an id it skipped may still come. It keeps the
ids below its top that it has not seen as holes, looks for them again at
every read, and delivers what fills them when it comes (in commit order,
after what committed before). A hole nobody fills for
:data:`HOLE_TIMEOUT` seconds was a rollback (or a transaction still
open after that long, whose changes are then not delivered live; see the
MySQL page of the docs).
"""

from __future__ import annotations

import bisect
import logging

log = logging.getLogger(__name__)

#: How long an id given out is waited for.
HOLE_TIMEOUT = 300.0
#: Holes looked for at a read: the newest half of them (an open
#: transaction's, which fill within milliseconds), and the rest in turns
#: over the older ones, so that many rollbacks hold no hole back for long.
LOOK_FOR = 200
#: Holes kept at most: beyond, the oldest are given up.
MAX_HOLES = 10000


class Seen:
    """Ids seen up to ``top``; the ids not seen below it are holes:
    ``[lo, hi, since]`` ranges sorted by ``lo``, ``since`` when first
    missed (monotonic seconds)."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.holes: list[list[float]] = []
        #: Where the next turn over the older holes begins.
        self._turn = 0

    @property
    def floor(self) -> int:
        """Every id up to here is seen or given up: where a restart may
        begin reading again."""
        return int(self.holes[0][0]) - 1 if self.holes else self.top

    def where(self) -> tuple[str, list[int]]:
        """The condition (``id`` placeholders) that finds rows past the
        top and in the holes looked for."""
        clause = ["id > %s"]
        params = [self.top]
        for lo, hi, _ in self._looked_for():
            clause.append("id BETWEEN %s AND %s")
            params += [int(lo), int(hi)]
        return " OR ".join(clause), params

    def _looked_for(self) -> list[list[float]]:
        holes = self.holes
        if len(holes) <= LOOK_FOR:
            return holes
        newest = LOOK_FOR // 2
        older = holes[:-newest]
        start = self._turn % len(older)
        self._turn = start + (LOOK_FOR - newest)
        turn = (older[start:] + older[:start])[: LOOK_FOR - newest]
        return turn + holes[-newest:]

    def saw(self, ids: list[int], now: float) -> None:
        """Record ``ids`` (ascending), read now."""
        top = self.top
        for found in ids:
            if found > top:
                if found > top + 1:
                    self.holes.append([top + 1, found - 1, now])
                top = found
            else:
                self._fill(found)
        self.top = top
        if len(self.holes) > MAX_HOLES:
            given_up = sorted(self.holes, key=lambda hole: hole[2])[: len(self.holes) - MAX_HOLES]
            log.warning(
                "gave up waiting for %d ranges of journal ids (more than %d open)",
                len(given_up),
                MAX_HOLES,
            )
            for hole in given_up:
                self.holes.remove(hole)

    def _fill(self, found: int) -> None:
        at = bisect.bisect_right(self.holes, [found, float("inf")]) - 1
        if at < 0:
            return
        lo, hi, since = self.holes[at]
        if not lo <= found <= hi:
            return
        if lo == hi:
            del self.holes[at]
        elif found == lo:
            self.holes[at][0] = found + 1
        elif found == hi:
            self.holes[at][1] = found - 1
        else:
            self.holes[at][1] = found - 1
            self.holes.insert(at + 1, [found + 1, hi, since])

    def expire(self, now: float, timeout: float = HOLE_TIMEOUT) -> None:
        """Give up the holes missed for ``timeout`` seconds."""
        if self.holes and min(hole[2] for hole in self.holes) <= now - timeout:
            self.holes = [hole for hole in self.holes if hole[2] > now - timeout]

    def again(self, ids: list[int], now: float) -> None:
        """Make ``ids`` (seen, but not delivered) holes again: read again."""
        for found in sorted(set(ids)):
            if found > self.top:
                continue
            at = bisect.bisect_right(self.holes, [found, float("inf")])
            self.holes.insert(at, [found, found, now])
