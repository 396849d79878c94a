"""Signals sent by Flask-DBNotify.

Each signal is a :class:`blinker.NamedSignal` on a private namespace. Row
signals are sent with the watched table name (as given to
:meth:`~flask_dbnotify.DBNotify.watch`) as sender, so receivers can use
``connect_via("orders")``. Lifecycle signals are sent with the real Flask
application as sender, never the ``current_app`` proxy.

Receivers run in the listener thread with an application context pushed.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

row_inserted = _signals.signal("dbnotify.row-inserted")
"""A row was inserted. Sender: watched table name. Kwargs: ``event``."""

row_updated = _signals.signal("dbnotify.row-updated")
"""A row was updated. Sender: watched table name. Kwargs: ``event``."""

row_deleted = _signals.signal("dbnotify.row-deleted")
"""A row was deleted. Sender: watched table name. Kwargs: ``event``."""

row_changed = _signals.signal("dbnotify.row-changed")
"""Sent for every row change, after the operation's own signal.
Sender: watched table name. Kwargs: ``event``."""

table_truncated = _signals.signal("dbnotify.table-truncated")
"""A watched table (or one of its partitions) was truncated (PostgreSQL).
Sender: watched table name. Kwargs: ``event``, whose ``op`` is
``Operation.TRUNCATE`` and ``pk``, ``new`` and ``old`` are ``None``. Not
sent to ``row_changed``: no row is named."""

notification_received = _signals.signal("dbnotify.notification-received")
"""An application message sent by :meth:`~flask_dbnotify.DBNotify.notify`.
Sender: the channel name. Kwargs: ``payload`` (the decoded JSON value)."""

listener_connected = _signals.signal("dbnotify.listener-connected")
"""The listener is connected and listening. Sender: the app. Kwargs:
``reconnect`` (``False`` the first time after ``start()``) and ``gap``
(``True`` when events committed while it was away may have been missed).
In WAL capture it is also sent, with ``reconnect=True`` and ``gap=True``,
when a lost replication slot was replaced."""

listener_disconnected = _signals.signal("dbnotify.listener-disconnected")
"""The listener lost its connection. Sender: the app. Kwargs: ``error``."""

events_dropped = _signals.signal("dbnotify.events-dropped")
"""Events were dropped because receivers fell more than
``DBNOTIFY_QUEUE_SIZE`` notifications behind (PostgreSQL only: SQLite stops
reading instead, losing nothing), or because a long notification sent in
pieces could not be put together. Sender: the app. Kwargs: ``count``, the
number of events lost. Sent in order, between the events before and after
the loss."""

receiver_failed = _signals.signal("dbnotify.receiver-failed")
"""A receiver raised. Sender: the app. Kwargs: ``receiver``, ``event`` (the
:class:`~flask_dbnotify.ChangeEvent`, or the payload of a notification) and
``error``. Delivery to later receivers goes on."""
