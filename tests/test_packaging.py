"""The sdist carries everything needed to run the tests and build the docs;
the wheel carries only the package. Both are built offline, with the
installed setuptools called as a PEP 517 backend (``python -m build`` would
download setuptools into an isolated environment)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "flask_dbnotify"

# What the sdist ships besides the package: these trees whole and these files.
TREES = ["tests", "docs", "example_app", "benchmarks", ".ci"]
FILES = ["README.md", "CHANGES.rst", "LICENSE", "MANIFEST.in", "setup.cfg", "pyproject.toml"]

# Generated files planted in the build copy; no distribution may carry them.
JUNK = [
    "tests/__pycache__/conftest.cpython-311.pyc",
    f"{PACKAGE}/__pycache__/__init__.cpython-311.pyc",
    "docs/_build/html/index.html",
    "example_app/instance/example.db",
    "tests/scratch.db-wal",
]

# The backend leaves its own setup() arguments in sys.argv, so the output
# folder is written into the script rather than read from sys.argv.
BUILD = """
import setuptools.build_meta as backend

backend.build_sdist({out!r})
backend.build_wheel({out!r})
"""


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path

    def sdist_names(self) -> set[str]:
        """Files in the sdist, relative to its top folder."""
        with tarfile.open(self.sdist) as tar:
            return {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}

    def wheel_names(self) -> set[str]:
        with zipfile.ZipFile(self.wheel) as whl:
            return {name for name in whl.namelist() if not name.endswith("/")}


def is_generated(relative: str) -> bool:
    """What MANIFEST.in leaves out: bytecode, databases, built docs and the
    example's instance folder."""
    return (
        "__pycache__" in relative.split("/")
        or relative.endswith((".pyc", ".pyo", ".pyd", ".db", ".db-wal", ".db-shm"))
        or relative.startswith(("docs/_build/", "example_app/instance/"))
    )


def source_files(*tops: str) -> set[str]:
    """Files of the source tree under ``tops``, as the sdist should name them."""
    found: set[str] = set()
    for top in tops:
        for path in (ROOT / top).rglob("*"):
            relative = path.relative_to(ROOT).as_posix()
            if path.is_file() and not is_generated(relative):
                found.add(relative)
    return found


def package_files() -> set[str]:
    return {
        name
        for name in source_files(PACKAGE)
        if name.endswith(".py") or name == f"{PACKAGE}/py.typed"
    }


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    # Build from a copy: setuptools writes build/ and *.egg-info next to
    # setup.cfg, and the copy is where the junk is planted.
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    for top in [PACKAGE, *TREES]:
        if (ROOT / top).is_dir():
            shutil.copytree(ROOT / top, source / top, symlinks=True)
    for name in FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    for junk in JUNK:
        (source / junk).parent.mkdir(parents=True, exist_ok=True)
        (source / junk).write_bytes(b"generated")

    out = base / "dist"
    done = subprocess.run(
        [sys.executable, "-c", BUILD.format(out=str(out))],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (
        "building the sdist and wheel with the installed setuptools failed "
        "(pip install -e '.[test]' installs a recent enough one):\n"
        + done.stdout[-3000:]
        + done.stderr[-3000:]
    )
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dists(sdist=sdist, wheel=wheel)


def metadata(dists: Dists, which: str) -> Message:
    if which == "sdist":
        with tarfile.open(dists.sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            member = tar.extractfile(f"{top}/PKG-INFO")
            assert member is not None
            text = member.read().decode()
    else:
        with zipfile.ZipFile(dists.wheel) as whl:
            (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
            text = whl.read(name).decode()
    return HeaderParser().parsestr(text)


def shipped_source() -> set[str]:
    """Everything the sdist must carry from the source tree."""
    return source_files(*TREES) | package_files() | set(FILES)


def listing(names: set[str]) -> str:
    return "\n".join(f"  {name}" for name in sorted(names))


def test_sdist_ships_the_tests_docs_and_example(dists: Dists) -> None:
    missing = shipped_source() - dists.sdist_names()
    assert not missing, f"the sdist lacks (see MANIFEST.in):\n{listing(missing)}"


def test_sdist_leaves_out_generated_files(dists: Dists) -> None:
    # Written by setuptools itself.
    made = {"PKG-INFO"} | {n for n in dists.sdist_names() if ".egg-info/" in n}
    extra = dists.sdist_names() - shipped_source() - made
    assert not extra, (
        f"the sdist carries files that are not source (see MANIFEST.in):\n{listing(extra)}"
    )


def test_wheel_holds_only_the_package_and_its_license(dists: Dists) -> None:
    names = dists.wheel_names()
    (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    shipped = {n for n in names if n.startswith(f"{PACKAGE}/")}
    outside = names - shipped - {n for n in names if n.startswith(f"{info}/")}

    problems: list[str] = []
    if missing := package_files() - shipped:
        problems.append(f"missing from the package:\n{listing(missing)}")
    if extra := shipped - package_files():
        problems.append(f"not source of the package:\n{listing(extra)}")
    if outside:
        problems.append(f"outside the package and {info}:\n{listing(outside)}")
    # Setuptools puts it in .dist-info/licenses/ since metadata 2.4, at the
    # top of .dist-info before.
    licenses = {n for n in names if n.startswith(f"{info}/") and n.endswith("/LICENSE")}
    if not licenses:
        problems.append(f"no LICENSE in {info}")
    assert not problems, "the wheel is wrong:\n" + "\n".join(problems)

    with zipfile.ZipFile(dists.wheel) as whl:
        assert whl.read(licenses.pop()) == (ROOT / "LICENSE").read_bytes()


@pytest.mark.parametrize("which", ["sdist", "wheel"])
def test_metadata_describes_the_project(dists: Dists, which: str) -> None:
    meta = metadata(dists, which)
    classifiers = set(meta.get_all("Classifier", []))
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL", []))
    wanted = {
        "Environment :: Web Environment",
        "Framework :: Flask",
        "Intended Audience :: Developers",
        "Operating System :: POSIX",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: Database",
        "Typing :: Typed",
    }

    problems: list[str] = []
    if meta["Requires-Python"] != ">=3.11":
        problems.append(f"Requires-Python is {meta['Requires-Python']!r}, not '>=3.11'")
    if missing := wanted - classifiers:
        problems.append(f"classifiers missing:\n{listing(missing)}")
    if not any(c.startswith("Development Status :: ") for c in classifiers):
        problems.append("no Development Status classifier")
    if (meta["License-Expression"] or meta["License"]) != "BSD-3-Clause":
        problems.append("the license is not declared as BSD-3-Clause")
    if "LICENSE" not in meta.get_all("License-File", []):
        problems.append("no License-File: LICENSE")
    for label in ["Documentation", "Changes", "Source", "Issue Tracker"]:
        if not urls.get(label, "").startswith("https://"):
            problems.append(f"no https Project-URL for {label!r}")
    assert not problems, f"the {which} metadata is wrong:\n" + "\n".join(problems)


def test_unpacked_sdist_collects_its_tests_and_holds_the_docs(dists: Dists, tmp_path: Path) -> None:
    with tarfile.open(dists.sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (unpacked,) = tmp_path.iterdir()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=unpacked,
        capture_output=True,
        text=True,
        timeout=120,
    )
    collected = {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}
    modules = {f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")}

    problems: list[str] = []
    if not (unpacked / "docs" / "conf.py").is_file():
        problems.append("docs/conf.py is missing, so the docs cannot be built")
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-5000:]
        problems.append(f"pytest --collect-only exited with {done.returncode}:\n{output}")
    elif uncollected := modules - collected:
        problems.append(f"test modules that collected nothing:\n{listing(uncollected)}")
    assert not problems, "from the unpacked sdist:\n" + "\n".join(problems)
