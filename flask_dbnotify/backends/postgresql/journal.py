"""The journal as the listener reads it: notifications decoded (long
messages put together from pieces, journal references read), and the
catch-up that replays what no notification brought. Also the operator's
reading of the journal, and its pruning.

A :class:`PostgreSQLFeed` belongs to one listener: where its replay
stands (the cursor, ids delivered past it, what had committed before it
first listened) is its own, never the shared backend's.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ... import _payload
from ..._items import Item, Lost, Notification
from ..._log import RateLimited
from ...errors import DBNotifyError
from ...events import ChangeEvent
from ..base import Feed, Stream
from .common import CHANNEL, IDENTITY, MAX_MESSAGE_BYTES, identity_text
from .connection import Database, Reader
from .stream import PostgreSQLStream

if TYPE_CHECKING:
    from . import PostgreSQLBackend

log = logging.getLogger(__name__)
skipped = RateLimited(log)

_CATCH_UP_BATCH = 5000
_UNREADABLE = "cannot read the journal"


def decode_row(row_id: int, body: str) -> list[Item]:
    """A journal row's events (or message); a row we cannot read is logged
    and skipped."""
    try:
        return _payload.decode(body, row_id)
    except _payload.PayloadError as exc:
        log.warning("skipped journal row %s: %s", row_id, exc)
        return []


def journal_item(row_id: int, body: str | None) -> ChangeEvent | Notification | None:
    """The event or message of a journal row, if it holds one."""
    items = [] if body is None else decode_row(row_id, body)
    return items[0] if items and isinstance(items[0], (ChangeEvent, Notification)) else None


def read(db: Database, journal: str, since: int, limit: int) -> tuple[list[Item], int | None]:
    """Up to ``limit`` rows of ``journal`` (quoted) from id ``since``,
    decoded, and the last id read."""
    rows = db.run(
        f"SELECT id, body FROM {journal} WHERE id >= %(since)s ORDER BY id LIMIT %(n)s",
        {"since": since, "n": limit},
    )
    items = [item for row_id, body in rows for item in decode_row(row_id, body)]
    return items, (rows[-1][0] if rows else None)


def prune(db: Database, names: dict[str, str], retention: float) -> None:
    """Delete claims done and journal rows older than ``retention`` seconds
    that no once receiver still has to claim and no claim still needs
    (failed ones are kept for inspection). ``names``: our quoted tables."""
    age = {"age": retention}
    db.run(
        "DELETE FROM {claims} WHERE state = 'done' "
        "AND claimed_at < now() - make_interval(secs => %(age)s)".format(**names),
        age,
        rare=True,
    )
    db.run(
        "DELETE FROM {journal} AS j WHERE created_at < now() - make_interval(secs => %(age)s) "
        "AND NOT EXISTS (SELECT 1 FROM {receivers} AS r WHERE (j.xid, j.id) > (r.xid, r.id)) "
        "AND NOT EXISTS (SELECT 1 FROM {claims} AS c "
        "  WHERE c.event_id = j.id AND c.state <> 'done')".format(**names),
        age,
        rare=True,
    )


class PostgreSQLFeed(Feed):
    """One listener's view of the channel and the journal."""

    def __init__(self, backend: PostgreSQLBackend) -> None:
        self.backend = backend
        self.db = backend.db
        #: This listener's reads of the journal (the dispatcher's thread).
        self.reader = Reader(backend.db)
        self.journal = backend.tables["journal"]
        # Where replay resumes, and journal ids delivered past it (id ->
        # transaction id).
        self._cursor: tuple[int, int] | None = None
        self._seen: dict[int, int] = {}
        # (xmax, running xids) of the first snapshot: older transactions
        # not running then had committed before we listened.
        self._before: tuple[int, set[int]] | None = None
        # The first catch-up after a connect replays only transactions that
        # had ended when LISTEN took effect: younger ones notify us, and are
        # delivered in their turn among the queued notifications.
        self._bound: int | None = None
        self._pieces = _payload.Pieces(MAX_MESSAGE_BYTES)

    def open_stream(self, settings: Any) -> Stream:
        backend = self.backend
        stream = PostgreSQLStream(backend.listen_where, backend.connect_kwargs, settings)
        try:
            self._same_database(stream)
        except BaseException:
            stream.close()
            raise
        self._pieces = _payload.Pieces(MAX_MESSAGE_BYTES)
        if self._cursor is None:
            # What had committed once we listen is not ours to replay: the
            # listener's session says, in the query that ran LISTEN.
            self._start_from(stream.snapshot)
        self._bound = stream.listening_from
        return stream

    def _same_database(self, stream: PostgreSQLStream) -> None:
        """Refuse a listener URL that leads to another database than the
        app's (asked only where the URLs differ: no second connection)."""
        backend = self.backend
        if backend.listen_uri == backend.uri:
            return
        failed = f"cannot query {backend.where}"
        identity = tuple(self.db.run("SELECT " + IDENTITY, rare=True, failed=failed)[0])
        if identity != stream.identity:
            raise DBNotifyError(
                f"cannot listen at {backend.listen_where}: it leads to "
                f"{identity_text(stream.identity)}, but DBNOTIFY_DATABASE_URI "
                f"({backend.where}) to {identity_text(identity)}; point "
                "DBNOTIFY_LISTEN_URI at the same database as DBNOTIFY_DATABASE_URI"
            )

    def _start_from(self, snapshot: str) -> None:
        """Set the cursor from the listener's first snapshot, taken when
        LISTEN took effect: what had committed by then is not ours to replay."""
        xmin, xmax, xip = snapshot.split(":")
        self._cursor = (int(xmin), 0)
        self._before = (int(xmax), {int(x) for x in xip.split(",") if x})

    def decode(self, raw: Any) -> list[Item]:
        pid, text = raw
        if text[:1] == "~":
            whole, gone = self._pieces.add(pid, text)
        else:
            whole, gone = text, self._pieces.interrupt()
        lost: list[Item] = []
        if gone:
            skipped.warning(
                "skipped %d long message(s) on %r: a piece missing, or over the limit",
                gone,
                CHANNEL,
            )
            lost.append(Lost(gone))
        if whole is None:
            return lost
        try:
            return lost + _payload.decode(whole, read_journal=self._read_journal)
        except _payload.PayloadError as exc:
            skipped.warning("skipped a notification on %r: %s", CHANNEL, exc)
            return lost

    def count(self, raw: Any) -> int:
        return _payload.count(raw[1])

    def replaying(self) -> bool:
        # Journal ids delivered live are remembered until a catch-up passes
        # them; catching up is what bounds that memory.
        return bool(self._seen)

    def prune(self, retention: float) -> None:
        prune(self.db, self.backend.tables, retention)

    def release_idle(self, idle: float) -> None:
        self.reader.release_idle(idle)

    def discard(self) -> None:
        self.reader.discard()

    def _read_journal(self, lo: int, hi: int, xid: int, schema: Any) -> list[tuple[int, str]]:
        """Journal rows ``lo..hi`` of transaction ``xid`` not delivered yet.
        Anyone may send a notification, so one naming rows delivered
        before (a replay) or rows of another transaction reads nothing;
        one that names another schema's journal (``schema``, when known)
        is not ours to read."""
        if not (isinstance(lo, int) and isinstance(hi, int) and isinstance(xid, int)):
            raise _payload.PayloadError("a journal reference that is not numbers")
        if schema is not None and schema != self.backend.schema:
            return []
        cursor = self._cursor
        if cursor is not None and (xid, hi) <= cursor or self._committed_before(xid):
            return []  # Replayed already by catch_up(), or before our time.
        try:
            rows = self._fetch(lo, hi, xid)
        except DBNotifyError as exc:
            # Skipped like a notification we cannot read; the rows stay in
            # the journal for the next catch-up.
            raise _payload.PayloadError(str(exc)) from exc
        fresh = [
            (row_id, body)
            for row_id, body in rows
            if self._seen.get(row_id) != xid and (cursor is None or (xid, row_id) > cursor)
        ]
        for row_id, _ in fresh:
            self._seen[row_id] = xid
        return fresh

    def _fetch(self, lo: int, hi: int, xid: int) -> list[tuple[int, str]]:
        """The journal rows ``lo..hi`` of transaction ``xid``."""
        return self.reader.run(
            f"SELECT id, body FROM {self.journal} WHERE id BETWEEN %(lo)s AND %(hi)s "
            "AND xid = %(x)s::text::xid8 ORDER BY id",
            {"lo": lo, "hi": hi, "x": str(xid)},
            failed=_UNREADABLE,
        )

    def catch_up(self) -> list[Item]:
        """Replay journal rows past the cursor that no notification brought.

        Rows are read in (transaction id, id) order and only from
        transactions older than every one still running, so a transaction
        that commits later can never land behind the cursor; rows of
        transactions that had committed before the first LISTEN are skipped."""
        if self._cursor is None:
            return []
        items: list[Item] = []
        bound = self._bound
        while True:
            rows = self.reader.run(
                f"SELECT xid::text AS xid_text, id, body FROM {self.journal} "
                "WHERE (xid, id) > (%(x)s::xid8, %(id)s) "
                "AND xid < pg_snapshot_xmin(pg_current_snapshot()) "
                "AND (%(bound)s::xid8 IS NULL OR xid < %(bound)s::xid8) "
                "ORDER BY xid, id LIMIT %(n)s",
                {
                    "x": str(self._cursor[0]),
                    "id": self._cursor[1],
                    "bound": None if bound is None else str(bound),
                    "n": _CATCH_UP_BATCH,
                },
                failed=_UNREADABLE,
            )
            for xid_text, row_id, body in rows:
                xid = int(xid_text)
                # A row is known by its id and transaction: a journal made
                # anew (uninstall --everything, install) gives out ids again.
                if self._seen.get(row_id) == xid:
                    del self._seen[row_id]
                elif not self._committed_before(xid):
                    items += decode_row(row_id, body)
                self._cursor = (xid, row_id)
            if len(rows) < _CATCH_UP_BATCH:
                break
        # Anything seen below the cursor was journaled and is accounted for.
        floor = self._cursor[0]
        self._seen = {k: v for k, v in self._seen.items() if v >= floor}
        if self._before is not None and floor >= self._before[0]:
            self._before = None
        # Right after a connect, only what had ended when LISTEN took
        # effect; the rest comes as notifications (or at the next catch-up).
        self._bound = None
        return items

    def _committed_before(self, xid: int) -> bool:
        if self._before is None:
            return False
        xmax, running = self._before
        return xid < xmax and xid not in running
