"""``flask dbnotify ...`` commands."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from ._stream import event_data
from .errors import DBNotifyError
from .events import ChangeEvent
from .signals import notification_received, row_changed, table_truncated


class _Commands(AppGroup):
    """The ``flask dbnotify`` group: a database error ends a command with
    one line saying what is wrong and what to do (exit code 1); the
    traceback only with ``--traceback`` or debug logging."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DBNotifyError as exc:
            if ctx.params.get("traceback") or logging.getLogger(__package__).isEnabledFor(
                logging.DEBUG
            ):
                raise
            raise click.ClickException(str(exc)) from exc


@click.group("dbnotify", cls=_Commands)
@click.option("--traceback", is_flag=True, help="Show the full traceback of an error.")
def dbnotify_cli(traceback: bool) -> None:
    """Manage Flask-DBNotify triggers and listen to events."""


def _ext() -> Any:
    """The app's :class:`~flask_dbnotify.DBNotify`: commands go through its methods."""
    return current_app.extensions["dbnotify"].ext


@dbnotify_cli.command("install-triggers")
@click.option("--sql", "print_sql", is_flag=True, help="Print the DDL; change nothing.")
def install_triggers(print_sql: bool) -> None:
    """Create or update the triggers of every watch."""
    ext = _ext()
    if print_sql:
        click.echo(ext.sql_script(ext.install_sql()), nl=False)
        return
    ext.install_triggers()
    click.echo(f"installed triggers for {len(ext.watches)} watch(es)")


@dbnotify_cli.command("uninstall-triggers")
@click.option("--sql", "print_sql", is_flag=True, help="Print the DDL; change nothing.")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Also drop objects no watch owns, and the tables Flask-DBNotify keeps.",
)
def uninstall_triggers(print_sql: bool, everything: bool) -> None:
    """Drop the triggers of every watch."""
    ext = _ext()
    if print_sql:
        click.echo(ext.sql_script(ext.uninstall_sql(everything=everything)), nl=False)
        return
    ext.uninstall_triggers(everything=everything)
    click.echo("uninstalled triggers")


@dbnotify_cli.command("status")
def status() -> None:
    """Show each watch as installed, outdated, missing or error, and
    objects in the database that no watch owns. Exits 1 unless every watch
    is installed."""
    result = _ext().status()
    for name, value in result.watches.items():
        detail = result.details.get(name)
        click.echo(f"{value:<10} {name}" + (f"  ({detail})" if detail else ""))
    for obj in result.orphaned:
        click.echo(f"{'orphaned':<10} {obj}")
    if not result.watches:
        click.echo("no watches")
    for label, value in result.health.items():
        click.echo(f"{label}: {value}")
    for warning in result.warnings:
        click.echo(f"warning: {warning}")
    if any(value != "installed" for value in result.watches.values()):
        sys.exit(1)


def _event_json(event: ChangeEvent) -> dict[str, Any]:
    return {**event_data(event), "cut": event.cut}


@dbnotify_cli.command("listen")
@click.option("--count", type=int, default=None, help="Exit after this many events.")
def listen(count: int | None) -> None:
    """Listen in the foreground; print one JSON object per event."""
    state = current_app.extensions["dbnotify"]
    ext, app = state.ext, state.app
    done = threading.Event()
    seen = 0
    lock = threading.Lock()

    def emit(obj: dict[str, Any]) -> None:
        nonlocal seen
        with lock:
            click.echo(json.dumps(obj, ensure_ascii=False, default=str))
            sys.stdout.flush()
            seen += 1
            if count is not None and seen >= count:
                done.set()

    def on_row(sender: str, event: ChangeEvent, **extra: Any) -> None:
        if sender in ext.watches:
            emit(_event_json(event))

    def on_message(sender: str, payload: Any, **extra: Any) -> None:
        emit({"channel": sender, "payload": payload, "context": extra.get("context")})

    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with (
        row_changed.connected_to(on_row),
        table_truncated.connected_to(on_row),
        notification_received.connected_to(on_message),
    ):
        ext.start(app=app)
        click.echo("listening; press Ctrl+C to stop", err=True)
        try:
            while not done.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            ext.stop(app=app)


@dbnotify_cli.command("replay")
@click.option("--since", type=int, required=True, help="First journal id to replay.")
@click.option("--until", type=int, default=None, help="Last journal id to replay.")
@click.option("--receiver", default=None, help="Only this receiver (qualified name).")
def replay(since: int, until: int | None, receiver: str | None) -> None:
    """Dispatch journaled events and messages again, in this process."""
    try:
        count = _ext().replay(since, until, receiver)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--receiver") from None
    click.echo(f"replayed {count} event(s)")


@dbnotify_cli.command("forget-receiver")
@click.argument("name")
def forget_receiver(name: str) -> None:
    """Drop a retired once receiver's watermark and claims (NAME is its
    qualified name, as status shows it)."""
    _ext().forget_receiver(name)
    click.echo(f"forgot {name}")


@dbnotify_cli.command("notify")
@click.argument("channel")
@click.argument("payload", required=False)
def notify(channel: str, payload: str | None) -> None:
    """Send one message on CHANNEL; PAYLOAD is JSON (default: null)."""
    try:
        value = json.loads(payload) if payload is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="PAYLOAD") from None
    try:
        _ext().notify(channel, value)
    except (ValueError, TypeError) as exc:  # a bad channel name, too long a message
        raise click.ClickException(str(exc)) from exc
