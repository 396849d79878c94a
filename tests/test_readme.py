"""The README works as written: its quick start prints the event it
promises, and .ci/run runs exactly its test command."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from ._helpers import Lines, free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command() -> None:
    test_command = blocks("sh")[1].strip()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    """In a fresh shell (nothing activated), twice over."""
    db = str(tmp_path / "shop.db")
    (tmp_path / "quickstart.py").write_text(blocks("python")[0].replace("/tmp/shop.db", db))
    quick_start = README[README.index("## Quick start") :]
    setup, insert = (
        b.replace("/tmp/shop.db", db) for b in re.findall(r"```sh\n(.*?)```", quick_start, re.S)[:2]
    )

    def command(line: str) -> list[str]:
        words = shlex.split(line)
        # The venv's programs by path: a fresh shell has no venv active.
        assert words[0].startswith(".venv/bin/"), f"not the venv's program: {line}"
        return [str(BIN / words[0].removeprefix(".venv/bin/")), *words[1:]]

    create, install, run = setup.strip().splitlines()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VIRTUAL_ENV", None)
    for line in (create, install, create, install):
        done = subprocess.run(
            command(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"{line}\n{done.stderr}"
    server = subprocess.Popen(
        [*command(run), "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        Lines(server.stderr, "server stderr").wait_for("Running on")
        done = subprocess.run(
            command(insert.strip()), cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        Lines(server.stdout, "server stdout").wait_for("new order 1 paid")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
        assert server.stdout is not None and server.stderr is not None
        server.stdout.close()
        server.stderr.close()
