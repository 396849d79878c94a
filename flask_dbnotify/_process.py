"""Which processes listen: the process model of what loads a Flask app
(``flask run`` and its reloader, other ``flask`` commands, gunicorn's
master and workers, uWSGI's master and workers, any other process), and
what every app's listener does at ``fork()`` and at exit.

The extension registers each app's state here with :func:`register`.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import weakref
from typing import TYPE_CHECKING, Any, Protocol

import click
from flask import Flask
from flask.cli import ScriptInfo
from werkzeug.serving import is_running_from_reloader

from .listener import stop_all

if TYPE_CHECKING:
    from .backends import Backend
    from .listener import Listener


class Member(Protocol):
    """What this module needs of an app's state."""

    app: Flask
    listener: Listener
    backend: Backend
    #: Whether the listener should run in this process (or in its forks).
    wanted: bool
    #: The process whose listener and connections these are.
    pid: int


_members: weakref.WeakSet[Member] = weakref.WeakSet()


def register(member: Member) -> None:
    """Include ``member`` in what happens at fork and at exit."""
    _members.add(member)


def autostart_decision() -> str:
    """``"now"``, ``"in-forks"`` (a server that loads the app before forking
    its workers: gunicorn's master with ``--preload``, uWSGI without
    ``lazy-apps``), or ``"never"``."""
    ctx = click.get_current_context(silent=True)
    # Only Flask's own CLI: another click program may well be a server.
    if ctx is not None and ctx.find_object(ScriptInfo) is not None:
        # Inside a CLI command: only `flask run` serves, and with the
        # reloader only its child process (the watcher just restarts it).
        if ctx.command.name != "run":
            return "never"
        reload = ctx.params.get("reload")
        if reload is None:
            from flask.helpers import get_debug_flag

            reload = get_debug_flag()
        return "now" if not reload or is_running_from_reloader() else "never"
    if _in_gunicorn_master() or in_uwsgi_master():
        return "in-forks"
    return "now"


def guard_app_run(state: Member) -> None:
    """``app.run()`` with the reloader turns this process into the watcher,
    which only restarts the serving child: stop listening there."""
    app = state.app
    original = app.run

    def run(
        host: str | None = None,
        port: int | None = None,
        debug: bool | None = None,
        load_dotenv: bool = True,
        **options: Any,
    ) -> None:
        use_reloader = options.get("use_reloader", app.debug if debug is None else debug)
        if use_reloader and not is_running_from_reloader():
            state.wanted = False
            state.listener.stop()
        original(host, port, debug, load_dotenv, **options)

    app.run = run  # type: ignore[method-assign]


def _in_gunicorn_master() -> bool:
    # With --preload the arbiter imports the app before forking workers.
    if "gunicorn.arbiter" not in sys.modules:
        return False
    frame = sys._getframe(1)
    seen_arbiter = False
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("gunicorn.workers"):
            return False
        seen_arbiter = seen_arbiter or module == "gunicorn.arbiter"
        frame = frame.f_back  # type: ignore[assignment]
    return seen_arbiter


def _gunicorn_fork(caller: Any) -> tuple[bool, Any]:
    """In a child just forked, ``caller`` the frame that called ``os.fork()``:
    whether gunicorn's arbiter forked it, and if for a worker, that worker
    (else ``None``). A fork in a worker's own code is not the arbiter's."""
    if "gunicorn.arbiter" not in sys.modules:
        return False, None
    # gevent's os.fork (an arbiter patched by the config file) calls the real one.
    while caller is not None and caller.f_globals.get("__name__", "").startswith("gevent."):
        caller = caller.f_back
    if caller is None or caller.f_globals.get("__name__") != "gunicorn.arbiter":
        return False, None
    return True, caller.f_locals.get("worker") if caller.f_code.co_name == "spawn_worker" else None


def _uwsgi() -> Any:
    """uWSGI's API module, which exists only inside uWSGI; else ``None``."""
    uwsgi = sys.modules.get("uwsgi")
    return uwsgi if callable(getattr(uwsgi, "worker_id", None)) else None


def in_uwsgi_master() -> bool:
    """In uWSGI before it forks the workers: it loads the app there unless
    ``lazy-apps`` is set (in the master, or without ``--master`` in the
    process that becomes the first worker)."""
    uwsgi = _uwsgi()
    if uwsgi is None:
        return False
    spooler = getattr(uwsgi, "i_am_the_spooler", None)
    return bool(uwsgi.worker_id() == 0 and uwsgi.mule_id() == 0 and not (spooler and spooler()))


def require_threads() -> None:
    uwsgi = _uwsgi()
    # uWSGI before 2.0.27 runs Python threads only with --enable-threads (or
    # --threads): else a worker holds the GIL while it waits for requests.
    if uwsgi is not None and not getattr(uwsgi, "has_threads", True):
        raise RuntimeError(
            "uWSGI runs without Python threads, so the listener thread would run "
            "only while a request does: add --enable-threads to uWSGI's options "
            "(enable-threads = true in its ini file), or set DBNOTIFY_AUTOSTART = False"
        )


_uwsgi_hooked = False


def hook_uwsgi_forks() -> None:
    """Start wanted listeners in each worker that uWSGI forks. uWSGI forks
    without Python's fork handlers (os.register_at_fork), but calls
    ``uwsgi.post_fork_hook`` in every worker, mule and spooler."""
    global _uwsgi_hooked
    uwsgi = _uwsgi()
    if uwsgi is None or _uwsgi_hooked:
        return
    _uwsgi_hooked = True
    before = {name: getattr(uwsgi, name, None) for name in ("post_fork_hook", "spooler")}
    try:
        # Its chain of hooks is how code shares post_fork_hook: importing it
        # later would replace a hook of ours. It refuses to load without
        # --master.
        decorators = importlib.import_module("uwsgidecorators")
    except Exception:  # noqa: BLE001 - not installed, or no master
        previous = before["post_fork_hook"]

        def hook() -> None:
            try:
                if previous is not None:
                    previous()
            finally:
                _after_uwsgi_fork()

        uwsgi.post_fork_hook = hook
        return
    # Importing it replaced both with its own: keep what was set before.
    if before["spooler"] is not None:
        uwsgi.spooler = before["spooler"]
    if before["post_fork_hook"] not in (None, uwsgi.post_fork_hook):
        decorators.postfork(before["post_fork_hook"])
    decorators.postfork(_after_uwsgi_fork)


def _after_uwsgi_fork() -> None:
    uwsgi = _uwsgi()
    # Mules and spoolers serve no requests. Without --master the first
    # worker is the process that loaded the app, not a fork: nothing to forget.
    if uwsgi is not None and uwsgi.worker_id() > 0:
        forget_parent()
        _start_wanted()


def forget_parent() -> None:
    """In a forked child, once per state: forget the parent's listener
    threads and connections (discarded, not closed: the parent still uses
    them). A listener that ran in the parent is wanted here too."""
    pid = os.getpid()
    for state in list(_members):
        if state.pid != pid:
            state.pid = pid
            state.wanted = state.wanted or state.listener.running
            _renew(state)


def _renew(state: Member) -> None:
    state.listener.after_fork()
    state.backend.after_fork()


def _start_wanted() -> None:
    for state in list(_members):
        if state.wanted:
            state.listener.start(timeout=0, raise_on_failure=False)


def _after_fork_in_child() -> None:
    forget_parent()
    if in_uwsgi_master():
        # uWSGI forking with --py-call-uwsgi-fork-hooks: its post-fork hook
        # starts listeners, in workers only.
        return
    try:
        caller = sys._getframe(1)
    except ValueError:  # forked by C code
        caller = None
    by_gunicorn, worker = _gunicorn_fork(caller)
    if worker is not None:
        _start_after_worker_init(worker)
    elif not by_gunicorn:  # not its dirty arbiter, nor a re-exec
        _start_wanted()


def _start_after_worker_init(worker: Any) -> None:
    """Start wanted listeners once the gunicorn worker has initialised. An
    async worker class (gevent) monkey-patches threading and select first:
    the listener's threads must be its green threads, and its locks theirs."""
    hook = worker.cfg.post_worker_init

    def post_worker_init(worker: Any) -> None:
        for state in list(_members):
            if not state.listener.running:
                _renew(state)
        hook(worker)
        _start_wanted()

    try:
        worker.cfg.set("post_worker_init", post_worker_init)
    except (AttributeError, TypeError):  # a gunicorn that differs: start now
        _start_wanted()


def _at_exit() -> None:
    # In a child that never forgot its parent (forked by C code without
    # Python's fork handlers): the parent's threads are not here to join.
    forget_parent()
    stop_all([state.listener for state in list(_members)])


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
