"""The Flask extension: :class:`DBNotify`."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from flask import Flask, Response, current_app, has_app_context, has_request_context, request

from . import _appstate, _channels, _context, _delivery, _once, _payload, _process, _stream
from ._appstate import AppState
from ._registry import Registry, check_where_columns
from ._watch import Subscription, Target, Watch, resolve_target
from .backends import Status
from .events import ChangeEvent, Operation
from .listener import ListenerState

F = TypeVar("F", bound=Callable[..., Any])


class DBNotify:
    """Deliver committed row changes and application messages as signals.

    :param app: the application to register on; or call :meth:`init_app`.

    Watches and ``on()`` receivers belong to this object and apply to every
    app it is registered on; each app gets its own listener.
    """

    def __init__(self, app: Flask | None = None) -> None:
        #: The watches and ``on()`` receivers, shared by every app.
        self._registry = Registry()
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    @property
    def watches(self) -> dict[str, Watch]:
        """Watched names and their watches (the registry's own dict)."""
        return self._registry.watches

    @property
    def subscriptions(self) -> dict[str, tuple[Subscription, ...]]:
        """Watched names and their ``on()`` receivers (the registry's own dict)."""
        return self._registry.subscriptions

    def init_app(self, app: Flask) -> None:
        """Register on ``app``: read its ``DBNOTIFY_*`` config, add the
        ``flask dbnotify`` commands, and start the listener unless
        ``DBNOTIFY_AUTOSTART`` is false or this process does not serve."""
        if "dbnotify" in app.extensions:
            raise RuntimeError(
                "Flask-DBNotify is already registered on this app: use "
                "app.extensions['dbnotify'].ext, or create the app anew"
            )
        state = _appstate.create(self, app, self._registry)
        decision = _process.autostart_decision() if state.settings.autostart else "never"
        if decision != "never":
            _process.require_threads()
        app.extensions["dbnotify"] = state
        self._apps.add(app)
        _process.register(state)
        from .cli import dbnotify_cli

        app.cli.add_command(dbnotify_cli)
        if sys.modules.get("alembic") is not None:  # migrations may run: see migrations.py
            from . import migrations  # noqa: F401 - registers op.dbnotify_sql, autogenerate
        if decision == "now":
            _process.guard_app_run(state)
            state.wanted = True
            state.listener.start(timeout=state.settings.connect_timeout + 1, raise_on_failure=False)
        elif decision == "in-forks":
            state.wanted = True
        if _process.in_uwsgi_master():
            # Even without autostart: each worker discards the pool it inherits.
            _process.hook_uwsgi_forks()

    # -- app lookup ---------------------------------------------------------

    def _state(self, app: Flask | None = None) -> AppState:
        if app is None:
            if has_app_context():
                app = current_app._get_current_object()  # type: ignore[attr-defined]
            else:
                apps = list(self._apps)
                if len(apps) != 1:
                    raise RuntimeError("no app to use: pass app=..., or work inside an app context")
                app = apps[0]
        state = app.extensions.get("dbnotify")
        if state is None or state.ext is not self:
            raise RuntimeError(
                "this DBNotify is not registered on the app: call init_app(app) first"
            )
        return state  # type: ignore[no-any-return]

    # -- listener -----------------------------------------------------------

    def start(self, app: Flask | None = None, timeout: float | None = None) -> None:
        """Start the app's listener; return once it is listening, so no
        event committed afterwards can be missed. Raises
        :class:`~flask_dbnotify.errors.ListenerError` if it cannot connect.
        Does nothing if it is running."""
        state = self._state(app)
        _process.require_threads()
        _process.forget_parent()
        if _process.in_uwsgi_master():
            raise RuntimeError(
                "uWSGI has not forked its workers yet: a listener started here would "
                "hang them. Let DBNOTIFY_AUTOSTART start one in each worker, or run "
                "uWSGI with --lazy-apps"
            )
        state.wanted = True
        if timeout is None:
            timeout = state.settings.connect_timeout + 1
        state.listener.start(timeout=timeout, raise_on_failure=True)

    def stop(self, app: Flask | None = None, timeout: float | None = 10.0) -> None:
        """Stop the app's listener and close its connection. Idempotent.

        Waits up to ``timeout`` seconds for a receiver that is running to
        return; past that its thread is left to finish on its own. In WAL
        capture, what this process's leader relayed is delivered first,
        within the same ``timeout``."""
        state = self._state(app)
        state.wanted = False
        state.listener.stop(timeout)

    def close(self, app: Flask | None = None, timeout: float | None = 10.0) -> None:
        """Stop the app's listener, as :meth:`stop` does, and close every
        database connection Flask-DBNotify keeps for the app: for the end
        of a test or a script. The app stays usable: :meth:`start`,
        :meth:`notify` and the rest connect again when called."""
        state = self._state(app)
        state.wanted = False
        state.listener.close(timeout)
        state.backend.close()

    def is_running(self, app: Flask | None = None) -> bool:
        """Whether the app's listener thread is alive."""
        return self._state(app).listener.running

    def listener_state(self, app: Flask | None = None) -> ListenerState:
        """A snapshot of the app's listener: connection, counters, last error."""
        return self._state(app).listener.snapshot()

    # -- what to watch ------------------------------------------------------

    def watch(
        self,
        target: Target,
        operations: str | Operation | Iterable[str | Operation] | None = None,
        *,
        columns: Iterable[str] | None = None,
        when_changed: Iterable[str] | None = None,
        durable: bool = False,
    ) -> Watch:
        """Deliver row changes of ``target``.

        :param target: a table name, ``"schema.table"``, a
            ``sqlalchemy.Table`` or a declarative model class. The name as
            given (or the table's ``fullname``) is the sender of row signals.
        :param operations: any of ``"insert"``, ``"update"``, ``"delete"``;
            all three by default. On PostgreSQL a ``TRUNCATE`` of a watched
            table is always delivered (:data:`~flask_dbnotify.table_truncated`);
            SQLite has none, and MySQL's fires no trigger.
        :param columns: the columns ``new`` and ``old`` carry (the primary
            key is always carried); every column by default.
        :param when_changed: UPDATEs are delivered only if one of these
            columns changed. UPDATEs that change nothing are never delivered.
        :param durable: journal each change in the writer's transaction, so
            a listener that reconnects replays what it missed (``event.id``
            is the journal id). SQLite journals every watch anyway.

        The triggers are created by ``flask dbnotify install-triggers``.
        """
        watch = Watch.create(target, operations, columns, when_changed, durable)
        self._registry.add_watch(watch)
        self._watches_changed()
        return watch

    def on(
        self,
        target: Target,
        operations: str | Operation | Iterable[str | Operation] | None = None,
        *,
        where: Mapping[str, Any] | None = None,
        once: bool = False,
    ) -> Callable[[F], F]:
        """Decorate a function ``f(event)`` to run for row changes of ``target``.

        Unlike ``signal.connect``, the function is held by a strong reference.
        ``where`` maps column names to values the row must have (``new``, or
        ``old`` for DELETE). If ``target`` is not watched yet, it is watched
        with the defaults.

        With ``once=True`` (the watch must be durable), exactly one process
        of all that run the app handles each event, even events committed
        while no process ran; a receiver that raises is retried with
        backoff, then reported with ``receiver_failed`` and kept failed.
        Processes recognise the receiver by its qualified name.
        """
        name, _, _, table = resolve_target(target)
        registry = self._registry

        def decorator(func: F) -> F:
            sub = Subscription.create(func, operations, where, once)
            if once:
                registry.check_once_name(sub)
            if table is not None:
                check_where_columns(name, table, sub)
            watch, changed = registry.watch_for(target, name, once)
            if changed:
                self._watches_changed()
            registry.subscribe(watch, sub)
            return func

        return decorator

    def _watches_changed(self) -> None:
        for app in list(self._apps):
            state = app.extensions.get("dbnotify")
            if state is not None:
                state.listener.recheck_triggers()

    # -- messages -----------------------------------------------------------

    def notify(
        self,
        channel: Any,
        payload: Any = None,
        *,
        connection: Any = None,
        durable: bool = False,
        app: Flask | None = None,
        **fields: Any,
    ) -> None:
        """Send an application message to every listener: untyped,
        ``notify("cache", {"key": "menu"})``, or typed (:doc:`channels`):
        ``notify(PostReads(model_id=1))``, ``notify(PostReads, model_id=1)``
        or ``notify("myapp.channels.PostReads", model_id=1)``.

        :param channel: the sender of ``notification_received``; or a typed
            channel (a dataclass instance, a dataclass, or its dotted path),
            whose dotted path is then the channel name.
        :param payload: any JSON-serialisable value (untyped messages only).
        :param connection: a SQLAlchemy ``Connection`` or ``Session`` (or a
            DB-API connection): the message is sent when its transaction
            commits, and not at all if it rolls back. Without it the message
            is sent at once.
        :param durable: journal the message like a durable row change, so
            listeners of apps with durable watches replay it after a
            reconnect, and once receivers get it. (SQLite journals every
            message.)
        :param fields: a typed channel's fields, with its class or path.

        Nothing is sent when a typed message does not fit its class
        (``TypeError``), nor when a value cannot be encoded (``TypeError``
        or ``ValueError``). On PostgreSQL a message is at most 16 MiB as
        JSON (``ValueError`` beyond); a durable one, any size the journal
        holds.
        """
        name, value = _channels.outgoing(channel, payload, fields)
        context = None if connection is None else _context.current(connection)
        text = _payload.encode_message(name, value, context)
        self._state(app).backend.notify(connection, name, text, durable)

    def set_context(self, connection: Any, /, **values: Any) -> None:
        """Say who or what is making the changes of ``connection``'s
        current transaction (a SQLAlchemy ``Connection`` or ``Session``):
        every row change it makes from now on, and every message it sends
        with ``notify(connection=...)``, carries ``values`` as
        ``event.context`` (messages: the ``context`` argument). No
        ``values`` clears it. At most 1 KiB of JSON (``ValueError``
        beyond; ``TypeError`` for what is not JSON). See :doc:`context`."""
        conn = _context.require_connection(connection)
        text = _context.encode(values)
        self._state().backend.set_context(conn, text)
        _context.remember(conn, values)

    def on_message(self, channel: Any, *, once: bool = False) -> Callable[[F], F]:
        """Decorate a function ``f(message)`` to run for each message of a
        typed channel (a dataclass, or its dotted path), as :meth:`on` does
        for rows: ``message`` is an instance of the class, its fields typed
        as annotated (see :doc:`channels`). A payload that does not fit the
        class is logged and reported with ``receiver_failed``.

        With ``once=True``, exactly one process of all that run the app
        handles each journaled message (``notify(..., durable=True)`` on
        PostgreSQL; every message on SQLite), even messages sent while no
        process ran, with the retries of ``on(..., once=True)``.
        """
        return _channels.subscriber(self._registry, channel, once)

    def deliver(self, *events: ChangeEvent | object, app: Flask | None = None) -> None:
        """Deliver ``events`` now, in this thread, as the listener would:
        to the row signals and the matching ``on()`` receivers, inside a
        new application context, each receiver's failure logged and sent
        as ``receiver_failed``; then to this process's open streams
        (:meth:`stream`). A typed message (a dataclass instance) goes, as
        sent on the wire, to ``notification_received`` and its channel's
        ``on_message()`` receivers. For tests (see :doc:`testing`): it
        needs neither the listener nor the database.
        Once receivers are called directly, each time: there is no journal
        row to claim."""
        state = self._state(app)
        items = [_channels.as_notification(e) if _channels.is_message(e) else e for e in events]
        _delivery.deliver_now(state.app, self._registry, items)
        state.served.hub.publish(items)

    def replay(
        self,
        since: int,
        until: int | None = None,
        receiver: str | None = None,
        app: Flask | None = None,
    ) -> int:
        """Dispatch journaled events and messages again, in this thread,
        for operators: ids from ``since`` (to ``until``). Signals and every
        ``on()`` and ``on_message()`` receiver get them, or only the
        receiver whose qualified name is ``receiver``; a once receiver that
        succeeds has its claim marked done. Returns how many were replayed."""
        state = self._state(app)
        names = self._registry.receiver_names()
        if receiver is not None and receiver not in names:
            known = f"known are {', '.join(names)}" if names else "the app has no receivers"
            raise ValueError(f"no receiver is named {receiver!r}: {known}")
        return state.listener.replay(since, until, receiver)

    def stream(
        self,
        targets: Target | Iterable[Target] | None = None,
        operations: str | Operation | Iterable[str | Operation] | None = None,
        *,
        where: Mapping[str, Any] | None = None,
        messages: Iterable[str] = (),
        serializer: Callable[[dict[str, Any]], str] | None = None,
        app: Flask | None = None,
    ) -> Response:
        """A ``text/event-stream`` response that sends the row changes of
        ``targets`` (a watched target, or several in a list), with
        ``operations`` and ``where`` as for :meth:`on`, and the messages of
        the channels in ``messages``, as they are delivered in this process.

        Each event has ``event:`` (the operation in lower case, or
        ``message``), ``data:`` one JSON object, and ``id:`` when it is
        journaled. A browser that reconnects sends the last id it got
        (``Last-Event-ID``): if every target is journaled (durable watches;
        every watch on SQLite and with WAL capture), what it missed comes
        from the journal first, then live events, without repeats;
        otherwise it gets ``event: gap`` first. ``serializer`` turns each
        event's data (a dict) into its ``data:`` text; the default is JSON
        (see :doc:`live`). Return it from a view.
        """
        state = self._state(app)
        last = request.headers.get("Last-Event-ID") if has_request_context() else None
        return _stream.response(
            state.served, targets, operations, where, messages, serializer, last
        )

    def forget_receiver(self, name: str, app: Flask | None = None) -> None:
        """Drop a retired once receiver's watermark and claims, so the
        journal can be pruned past it."""
        self._state(app).backend.once.forget(name)

    # -- triggers -----------------------------------------------------------

    def install_sql(self, app: Flask | None = None) -> list[str]:
        """The DDL that ``install_triggers()`` would run."""
        return self._state(app).backend.admin.install_sql(list(self.watches.values()))

    def sql_script(self, statements: list[str], app: Flask | None = None) -> str:
        """``statements`` as a script the database's own client runs as is
        (psql, sqlite3, mysql: ``DELIMITER`` around compound triggers)."""
        return self._state(app).backend.admin.script(statements)

    def install_triggers(self, app: Flask | None = None) -> None:
        """Create or update the triggers for every watch, in one
        transaction; superseded ones are dropped."""
        state = self._state(app)
        state.backend.admin.install(list(self.watches.values()))
        # From now on, events for once receivers wait for them in the journal.
        _once.register(state.backend.once, self._registry.once_names())
        state.listener.recheck_triggers()

    def uninstall_sql(self, app: Flask | None = None, everything: bool = False) -> list[str]:
        """The DDL that ``uninstall_triggers()`` would run."""
        return self._state(app).backend.admin.uninstall_sql(list(self.watches.values()), everything)

    def uninstall_triggers(self, app: Flask | None = None, everything: bool = False) -> None:
        """Drop the triggers of every watch (with ``everything``, every
        object Flask-DBNotify created in the database)."""
        admin = self._state(app).backend.admin
        admin.execute_all(admin.uninstall_sql(list(self.watches.values()), everything))

    def status(self, app: Flask | None = None) -> Status:
        """Compare the database with the watches."""
        return self._state(app).backend.admin.status(list(self.watches.values()))


__all__ = ["DBNotify"]
