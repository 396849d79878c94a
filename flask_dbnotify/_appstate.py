"""What :class:`~flask_dbnotify.DBNotify` keeps for each app it is
registered on, in ``app.extensions["dbnotify"]``, and how it is made."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from ._registry import Registry, Served
from ._settings import Settings
from ._stream import Hub
from .backends import Backend, backend_for
from .listener import Listener

if TYPE_CHECKING:
    from flask import Flask


class _CliValueError(click.ClickException, ValueError):
    """A ValueError that click shows as one line."""


class _CliRuntimeError(click.ClickException, RuntimeError):
    """A RuntimeError that click shows as one line."""


class AppState:
    """Per-app state, kept in ``app.extensions["dbnotify"]``; ``ext`` is
    the extension it belongs to."""

    def __init__(self, ext: Any, app: Flask, settings: Settings, registry: Registry) -> None:
        self.ext = ext
        self.app = app
        self.settings = settings
        self.backend: Backend = backend_for(settings, app.instance_path)
        self.served = Served(app, settings, self.backend, registry, Hub(settings.stream_buffer))
        self.listener = Listener(self.served)
        # True when the listener should run in this process (or in its forks).
        self.wanted = False
        # The process whose listener and connections these are.
        self.pid = os.getpid()


def create(ext: Any, app: Flask, registry: Registry) -> AppState:
    """The state of ``app``, its config read; a config error raised while
    the ``flask`` command loads the app is one line, not a traceback."""
    try:
        return AppState(ext, app, Settings.from_app(app), registry)
    except (ValueError, RuntimeError) as exc:
        if click.get_current_context(silent=True) is None:
            raise
        # Loaded by the `flask` command: one line that says what to
        # set, not a traceback through the app's factory. Still a
        # ValueError or RuntimeError to code that catches those.
        kind = _CliValueError if isinstance(exc, ValueError) else _CliRuntimeError
        raise kind(str(exc)) from exc
