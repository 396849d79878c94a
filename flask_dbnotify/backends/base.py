"""What every backend provides, in four narrow parts.

- :class:`Backend`: what the extension needs (``notify``, the journal for
  operators), and the parts below.
- :class:`Admin`: install, uninstall and status.
- :class:`Feed`: what one listener reads and how far it has read; made by
  :meth:`Backend.feed` for each listener, which owns it. A :class:`Stream`
  is the feed's connection.
- :class:`OnceStore`: the claims of exactly-once receivers.

A backend is a package of one module per concern (``ddl``, ``admin``,
``journal``, ``once``, ``stream``) over one connection helper; see the
Architecture page of the docs.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._items import Item, Notification
from .._watch import Watch
from ..errors import DBNotifyError
from ..events import ChangeEvent
from .common import where

WatchState = Literal["installed", "outdated", "missing", "error"]
#: What a once receiver claims: a journaled row event or message.
Claimable = ChangeEvent | Notification

#: What a listener whose connection hears nothing is told (after "the
#: listener's connection to WHERE").
DEAF = (
    "receives no notifications, so events and messages that are not journaled "
    "are lost: a transaction- or statement-pooling proxy (pgbouncer, RDS Proxy) "
    "between the listener and the server? Point DBNOTIFY_LISTEN_URI at the server "
    "directly or at a session-pooled address"
)


@dataclass
class Status:
    """What the database holds compared with the watches."""

    watches: dict[str, WatchState] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    orphaned: list[str] = field(default_factory=list)
    #: Health of the database side: queue usage, listener sessions, journal
    #: size; label to value, for people to read.
    health: dict[str, str] = field(default_factory=dict)
    #: What an operator should fix (a function others may run, objects of
    #: an earlier version), each with what to do.
    warnings: list[str] = field(default_factory=list)

    def compare(self, name: str, present: set[Any], wanted: set[Any]) -> None:
        """Record a watch's state from the triggers it has and needs (as
        names, or (table, name) pairs)."""
        if present == wanted:
            self.watches[name] = "installed"
        elif present:
            self.watches[name] = "outdated"
            self.details[name] = "the database's triggers differ from what watch() describes"
        else:
            self.watches[name] = "missing"

    def error(self, name: str, error: Exception) -> None:
        self.watches[name] = "error"
        self.details[name] = str(error)


@dataclass(frozen=True)
class Revision:
    """What a migration runs to make the database match the watches, and
    what puts back what the database held before (see
    :mod:`flask_dbnotify.migrations`)."""

    upgrade: list[str]
    downgrade: list[str]
    #: What differs, one line each, for people: ``watch 'orders' (missing)``.
    changes: list[str]


class Stream(abc.ABC):
    """A listening connection, owned by the listener thread."""

    #: Where this stream's hearing checks are sent (see
    #: :meth:`Backend.send_check`); ``None`` for a stream that cannot go
    #: deaf (a poll loop reads the data itself).
    check_channel: str | None = None

    def expect(self, token: str | None) -> None:  # noqa: B027 - optional hook
        """Watch for a hearing check carrying ``token`` (forget any earlier one)."""

    def heard(self) -> bool:
        """Whether the check named by the last :meth:`expect` has arrived."""
        return False

    @abc.abstractmethod
    def wait(self, timeout: float, wake_fd: int) -> None:
        """Block until items may be ready, ``wake_fd`` is readable, or
        ``timeout`` seconds have passed."""

    @abc.abstractmethod
    def read(self) -> list[Any]:
        """Return what arrived, in commit order, without blocking: raw
        messages for :meth:`Feed.decode`, so the reader stays cheap."""

    @abc.abstractmethod
    def probe(self) -> None:
        """Raise if the connection is dead."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Drop a connection inherited across ``fork()`` without touching
        the parent's session."""


class Feed(abc.ABC):
    """What one listener reads and how far it has read. The listener owns
    it (a forked child makes a new one); the backend it came from is shared."""

    @abc.abstractmethod
    def open_stream(self, settings: Any) -> Stream:
        """Connect, start listening, and return the stream."""

    @abc.abstractmethod
    def decode(self, raw: Any) -> list[Item]:
        """Turn one raw message from :meth:`Stream.read` into events or a
        message; malformed input is logged and skipped. Runs on the
        dispatcher thread."""

    def decode_many(self, raws: list[Any]) -> list[Item]:
        """:meth:`decode` of each of ``raws``, in order."""
        return [item for raw in raws for item in self.decode(raw)]

    def pieces(self, raws: list[Any]) -> Iterator[list[Item]]:
        """The items of ``raws``, in order, as the dispatcher delivers them:
        a piece at a time, a stop waiting for the piece being delivered.
        When the dispatcher stops between pieces it calls :meth:`rewind`
        with every raw message of ``raws``: a feed whose pieces are parts
        of a raw message keeps track of what was delivered."""
        yield self.decode_many(raws)

    def received(self, raws: list[Any]) -> int:
        """How many items ``raws`` count for in ``received`` and ``queued``
        (and against ``DBNOTIFY_QUEUE_SIZE``)."""
        return len(raws)

    def count(self, raw: Any) -> int:
        """How many events a raw message holds, without building them."""
        return 1

    def catch_up(self) -> list[Item]:
        """Journaled events this listener has not seen (after a reconnect or
        a drop). Runs on the dispatcher thread."""
        return []

    def replaying(self) -> bool:
        """Whether :meth:`catch_up` has work even without durable watches
        (journaled messages were delivered live)."""
        return False

    def rewind(self, raw: list[Any]) -> None:  # noqa: B027 - optional hook
        """Make these undelivered raw messages be read again after a restart
        (a journaled backend); others cannot and do nothing."""

    @abc.abstractmethod
    def prune(self, retention: float) -> None:
        """Housekeeping: delete journal rows and claims older than
        ``retention`` seconds that nobody needs any more."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """The listener stops: stop what the feed runs besides its stream."""

    def send_drain(self, token: str) -> bool:
        """The listener stops, and :meth:`close` has run: send a marker
        carrying ``token`` that the stream brings after everything the
        feed's side work wrote (WAL capture: the leader's relay), so that
        the listener delivers that first; whether one was sent. Feeds with
        nothing of their own to deliver send none."""
        return False

    def release_idle(self, idle: float) -> None:  # noqa: B027 - optional hook
        """Close the feed's own connections that nothing used for ``idle``
        seconds (0: every one not in use now). Called often by the
        listener's reader thread, and by the dispatcher as it ends: must be
        cheap."""

    def discard(self) -> None:  # noqa: B027 - optional hook
        """In a forked child: drop what the feed ran in the parent, untouched."""


class OnceStore(abc.ABC):
    """Claims of exactly-once receivers; all run on the dispatcher thread.

    A receiver's watermark says how far it has claimed: every journal row
    of its watches (or its channel's messages) up to there has a claim
    (receiver, event id), made by exactly one process. ``cursor`` values
    are opaque to callers."""

    @abc.abstractmethod
    def register(self, receivers: Sequence[str]) -> None:
        """Give receivers without a watermark one at "now"."""

    @abc.abstractmethod
    def scan(
        self, receiver: str, watches: Sequence[str], limit: int
    ) -> tuple[list[ChangeEvent], Any]:
        """Journaled events of ``watches`` past the receiver's watermark, in
        order, and the cursor to advance it to once they are claimed."""

    @abc.abstractmethod
    def scan_messages(
        self, receiver: str, channel: str, limit: int
    ) -> tuple[list[Notification], Any]:
        """As :meth:`scan`, for the journaled messages of ``channel``: rows
        no watch wrote whose body starts with
        :func:`~flask_dbnotify._payload.message_prefix`."""

    @abc.abstractmethod
    def claim(self, receiver: str, ids: Sequence[int], worker: str) -> set[int]:
        """Claim events; return the ids this call won."""

    @abc.abstractmethod
    def advance(self, receiver: str, cursor: Any) -> None:
        """Move the watermark forward to ``cursor`` (never back)."""

    @abc.abstractmethod
    def finish(
        self, receiver: str, event_id: int, error: str | None, retry_in: float | None
    ) -> None:
        """Record the outcome: done (no error), retry after ``retry_in``
        seconds, or failed for good (error and no retry)."""

    @abc.abstractmethod
    def release(self, receiver: str, ids: Sequence[int]) -> None:
        """Give back claims this process made but will not run (it is
        stopping): they are due again at once, for any process."""

    @abc.abstractmethod
    def reset(self, receiver: str, event_id: int, worker: str) -> None:
        """Claim an event for an operator's replay, whatever its claim said:
        running, first attempt."""

    @abc.abstractmethod
    def forget(self, receiver: str) -> None:
        """Drop a retired receiver's watermark and claims."""

    @abc.abstractmethod
    def due(
        self, receiver: str, worker: str, lease: float, limit: int
    ) -> list[tuple[int, int, Claimable | None]]:
        """Claim events (or messages) due for another attempt (retry time
        reached, or a claim older than ``lease`` whose process died):
        ``(id, attempt, event)``; the event is None if its journal row is
        gone."""


class Admin(abc.ABC):
    """Install, uninstall and status: what the CLI and the extension's
    admin methods need. Each runs on a connection of its own."""

    @abc.abstractmethod
    def install_sql(self, watches: Sequence[Watch]) -> list[str]:
        """The statements that make the database match ``watches``."""

    @abc.abstractmethod
    def install(self, watches: Sequence[Watch]) -> None:
        """Run :meth:`install_sql` in one transaction."""

    @abc.abstractmethod
    def uninstall_sql(self, watches: Sequence[Watch], everything: bool) -> list[str]:
        """The statements that remove what ``watches`` installed (or every
        object of ours, with ``everything``)."""

    def script(self, statements: Sequence[str]) -> str:
        """``statements`` as a script the database's own client runs as
        is (psql, the sqlite3 shell): each ends with a semicolon."""
        return "".join(f"{statement};\n" for statement in statements)

    @abc.abstractmethod
    def execute_all(self, statements: Sequence[str]) -> None:
        """Run ``statements`` (our DDL, no parameters) in one transaction."""

    @abc.abstractmethod
    def status(self, watches: Sequence[Watch], health: bool = True) -> Status:
        """Compare the database with ``watches``; with ``health``, also
        read the database side's health (queue, listeners, journal)."""

    def revision(self, watches: Sequence[Watch]) -> Revision | None:
        """For a migration: the statements that make the database match
        ``watches`` and those that undo them, read from the database as it
        is now; None when it matches already."""
        raise DBNotifyError(f"{type(self).__name__} cannot write migrations")

    def kept_tables(self) -> tuple[str | None, frozenset[str]]:
        """The schema (None: the database has one) and the names of the
        tables Flask-DBNotify keeps: a migration's autogenerate, which
        finds them in no model, leaves them alone."""
        return None, frozenset()

    def foreign(self, connection: Any) -> str | None:
        """Why the SQLAlchemy ``connection`` (a migration's) is not to this
        database, or None when it is."""
        return f"{type(self).__name__} cannot compare databases"


class Backend(abc.ABC):
    """One database engine's way of doing things."""

    #: Every change is journaled, so nothing is lost across reconnects.
    durable_by_nature = False
    #: Every message is journaled too (not only ``notify(..., durable=True)``).
    journals_messages = False
    #: Install, uninstall and status.
    admin: Admin
    #: The claims of once receivers.
    once: OnceStore

    def __init__(self, uri: str, listen_uri: str, schema: str) -> None:
        self.uri = uri
        self.listen_uri = listen_uri
        self.schema = schema
        #: Where the database is, for messages (no password).
        self.where = where(uri)
        #: Where the listener connects, for messages.
        self.listen_where = where(listen_uri)

    # -- messages and the journal --------------------------------------------

    @abc.abstractmethod
    def notify(self, connection: Any, channel: str, payload: str, durable: bool = False) -> None:
        """Send an encoded message through ``connection`` (a SQLAlchemy
        connection or session), or at once when it is ``None``; journal it
        when ``durable``."""

    @abc.abstractmethod
    def set_context(self, conn: Any, text: str) -> None:
        """Make ``text`` (JSON, or '' for none) the context of the changes
        ``conn`` (a SQLAlchemy Connection) makes from now on in its current
        transaction (begun by this if none is under way)."""

    @abc.abstractmethod
    def journal(self, since: int, limit: int) -> tuple[list[Item], int | None]:
        """Journaled events and messages of up to ``limit`` journal rows with
        ids from ``since``, in id order, and the last id read."""

    # -- the listener's side -------------------------------------------------

    @abc.abstractmethod
    def feed(self) -> Feed:
        """A new feed, for one listener, reading from now on."""

    def send_check(self, channel: str, token: str) -> None:
        """Send a hearing check, ``token``, to a stream's ``check_channel``
        from a session of our own pool: the way real events reach the
        listener, from another session."""
        raise NotImplementedError(f"{type(self).__name__} has no hearing checks")

    def release_idle(self, idle: float) -> None:  # noqa: B027 - optional hook
        """Close pooled connections that nothing used for ``idle`` seconds,
        so that an idle process holds only its listener's connection.
        Called often by the listener's reader thread: must be cheap."""

    # -- connections ---------------------------------------------------------

    def after_fork(self) -> None:  # noqa: B027 - optional hook
        """In a forked child: forget pooled connections without closing them."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Close the pooled connections (the listener's is closed by its stream)."""
