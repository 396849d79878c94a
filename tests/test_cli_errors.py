"""A mistake ends a ``flask dbnotify`` command with one line that says what
is wrong and what to do, and exit code 1; ``--traceback`` shows the rest.

Run as a user runs them: the real ``flask`` program, in a subprocess, on an
app configured by environment variables (tests/apps/configured_app.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy.engine import make_url

from flask_dbnotify import DBNotify

from ._helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")


def flask(*args: str, url: str | None, table: str = "orders") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CONFIGURED_TABLE": table}
    env.pop("CONFIGURED_URL", None)
    if url is not None:
        env["CONFIGURED_URL"] = url
    return subprocess.run(
        [FLASK, "--app", "tests.apps.configured_app", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The command's only line of output, an error; its text after ``Error: ``."""
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1, f"exit code {done.returncode}: {lines}"
    assert len(lines) == 1 and lines[0].startswith("Error: "), "\n".join(lines)
    return lines[0].removeprefix("Error: ")


def test_a_table_that_does_not_exist(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    message = one_line_error(flask("dbnotify", "install-triggers", url=f"sqlite:///{db}"))
    assert message.startswith(f"table 'orders' does not exist in {db}: "), message
    assert "create it first (run your migrations), or fix the name given to watch()" in message
    assert "install-triggers" not in message  # it cannot help


def test_the_same_on_postgresql(pg_url: str) -> None:
    message = one_line_error(flask("dbnotify", "install-triggers", url=pg_url, table="ordrs"))
    assert message.startswith("table 'ordrs' does not exist (looked in the search_path): ")
    assert "fix the name given to watch()" in message


def test_a_port_where_no_server_listens() -> None:
    port = free_port()
    url = f"postgresql://someone:secret@127.0.0.1:{port}/shop"
    for command in (["install-triggers"], ["status"], ["listen"], ["notify", "ch"]):
        message = one_line_error(flask("dbnotify", *command, url=url))
        assert (
            f"cannot connect to PostgreSQL at 127.0.0.1:{port} (database shop, user someone)"
            in (message)
        ), message
        assert "Connection refused; is the server running there?" in message, message
        assert "secret" not in message


def test_a_database_that_does_not_exist(pg_url: str) -> None:
    url = make_url(pg_url).set(database="no_such_db").render_as_string(hide_password=False)
    message = one_line_error(flask("dbnotify", "status", url=url))
    assert 'database "no_such_db" does not exist; create the database, or fix the' in message


def test_a_folder_that_does_not_exist() -> None:
    message = one_line_error(flask("dbnotify", "status", url="sqlite:////no/such/dir/x.db"))
    assert message == (
        "cannot open /no/such/dir/x.db: unable to open database file; check that its folder "
        "exists and is writable"
    )


def test_a_bad_message() -> None:
    """notify's own checks (here: the channel) are one line too."""
    message = one_line_error(flask("dbnotify", "notify", "", "{}", url="sqlite:////tmp/x.db"))
    assert message == "channel must be a non-empty string"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "someone:secret@127.0.0.1/shop",
            "cannot read database URL 'someone:***@127.0.0.1/shop': ",
        ),
        (
            "postgresql://someone:secret@127.0.0.1:port/shop",
            "cannot read database URL 'postgresql://someone:***@127.0.0.1:port/shop': ",
        ),
        (
            "mssql+pymssql://sa@127.0.0.1/shop",
            "unsupported database URL 'mssql+pymssql://sa@127.0.0.1/shop': Flask-DBNotify works "
            "with postgresql://, mysql+pymysql:// (MySQL, MariaDB) and sqlite:/// URLs",
        ),
        (None, "Flask-DBNotify needs a database: set DBNOTIFY_DATABASE_URI"),
    ],
    ids=["unreadable", "bad-port", "unsupported", "none"],
)
def test_an_app_configured_wrongly(url: str | None, expected: str) -> None:
    """Raised while the app is loaded, before any command of ours runs;
    never showing a password."""
    message = one_line_error(flask("dbnotify", "status", url=url))
    assert message.startswith(expected) and "secret" not in message, message


def test_in_code_it_stays_a_value_error() -> None:
    """An app built inside a click command of the user's own: the error is
    still the ValueError that the API documents."""
    caught: list[str] = []

    @click.command()
    def build() -> None:
        app = Flask(__name__)
        app.config["DBNOTIFY_DATABASE_URI"] = "mssql+pymssql://sa@127.0.0.1/shop"
        try:
            DBNotify(app)
        except ValueError as exc:
            caught.append(str(exc))

    result = CliRunner().invoke(build)
    assert result.exit_code == 0, result.output
    assert caught and caught[0].startswith("unsupported database URL"), caught


def test_traceback_on_request(tmp_path: Path) -> None:
    done = flask("dbnotify", "--traceback", "install-triggers", url=f"sqlite:///{tmp_path}/x.db")
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "flask_dbnotify.errors.WatchError: table 'orders' does not exist" in done.stderr
