"""The documentation builds without a warning, and its API reference keeps
in step with the code: every public name and member is documented, and
nothing documented is gone.

What the docs document is read from the inventory Sphinx writes
(``objects.inv``), so autodoc's ``:members:`` lists and hand-written
``.. attribute::`` entries count alike. Broken cross-references to our own
names are build warnings (``nitpicky`` in docs/conf.py)."""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import re
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import flask_dbnotify

from ._helpers import poll_until

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: Public by name but not for applications, so not documented; each with
#: why. Nothing else may be left out, and every name here must exist.
NOT_API: dict[str, dict[str, str]] = {
    "DBNotify": {"subscriptions": "the on() receivers by watch name, read by the listener"},
    "Status": {
        "compare": "the backends build the report with it",
        "error": "the backends build the report with it",
    },
}

#: Where each kind of public name is documented.
SIGNALS_PAGE = "signals.html"
API_PAGE = "api.html"


@dataclass
class Build:
    returncode: int
    output: str
    #: Name (``flask_dbnotify.DBNotify.start``) to (role, page) of every
    #: object documented under its own name.
    objects: dict[str, tuple[str, str]]


def read_inventory(path: Path) -> dict[str, tuple[str, str]]:
    """Sphinx's objects.inv (version 2): four header lines, then zlib'd
    lines of ``name domain:role priority uri display-name``."""
    with path.open("rb") as stream:
        header = [stream.readline() for _ in range(4)]
        assert header[0].startswith(b"# Sphinx inventory version 2"), header[0]
        body = zlib.decompress(stream.read()).decode()
    objects = {}
    for line in body.splitlines():
        match = re.fullmatch(r"(.+?)\s+(\S+)\s+(-?\d+)\s+?(\S*)\s+(.*)", line)
        assert match, f"cannot read inventory line {line!r}"
        name, role, _, uri, _ = match.groups()
        if uri.endswith("$"):
            uri = uri[:-1] + name
        page, _, anchor = uri.partition("#")
        # Canonical aliases (flask_dbnotify.events.ChangeEvent) point at
        # the entry of the public name; keep only the public names.
        if role.startswith("py:") and role != "py:module" and anchor == name:
            objects[name] = (role, page)
    return objects


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    out = tmp_path_factory.mktemp("html")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html"]
    result = subprocess.run(
        [*command, str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    inventory = out / "objects.inv"
    objects = read_inventory(inventory) if inventory.exists() else {}
    return Build(result.returncode, result.stdout + result.stderr, objects)


def documented(build: Build) -> dict[str, tuple[str, str]]:
    if not build.objects:
        pytest.fail(f"the docs build wrote no objects.inv:\n{build.output}")
    return {
        name.removeprefix("flask_dbnotify."): place
        for name, place in build.objects.items()
        if name.startswith("flask_dbnotify.")
    }


def public_classes() -> Iterator[tuple[str, type]]:
    for name in flask_dbnotify.__all__:
        value = getattr(flask_dbnotify, name)
        if inspect.isclass(value):
            yield name, value


def instance_attributes(init: object) -> set[str]:
    """Names assigned as ``self.NAME`` in an ``__init__``'s source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(init)))  # type: ignore[arg-type]
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }


def public_members(cls: type) -> set[str]:
    """The public methods, properties and attributes of a class of ours,
    its fields and instance attributes included, not those it inherits
    from Python (``str``, ``float``, ``Exception``, ``Enum``)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.partition(".")[0] != "flask_dbnotify":
            continue
        names.update(vars(klass))
        names.update(inspect.get_annotations(klass))
        if dataclasses.is_dataclass(klass):
            names.update(field.name for field in dataclasses.fields(klass))
        elif "__init__" in vars(klass):
            names.update(instance_attributes(vars(klass)["__init__"]))
    if issubclass(cls, enum.Enum):
        names.update(cls.__members__)
    return {name for name in names if not name.startswith("_")}


def test_docs_build_without_warnings(build: Build) -> None:
    assert build.returncode == 0, f"sphinx-build exited with {build.returncode}:\n{build.output}"


def test_every_public_name_is_documented_and_nothing_else(build: Build) -> None:
    """Every name in flask_dbnotify.__all__ is documented: the signals on
    the signals page, the rest on the API page; and every name documented
    as flask_dbnotify.NAME is exported by flask_dbnotify."""
    docs = documented(build)
    top = {name: place for name, place in docs.items() if "." not in name}
    exported = set(flask_dbnotify.__all__)
    problems = [
        f"{name}: exported but not documented: add it to docs/api.rst"
        for name in sorted(exported - set(top))
    ]
    for name, (role, page) in sorted(top.items()):
        if name not in exported or not hasattr(flask_dbnotify, name):
            problems.append(
                f"{name}: documented ({role} on {page}) as importable from "
                "flask_dbnotify, but flask_dbnotify does not export it"
            )
            continue
        want = SIGNALS_PAGE if role == "py:data" else API_PAGE
        if page != want:
            problems.append(f"{name}: documented on {page}, belongs on {want}")
    assert not problems, "the API docs and flask_dbnotify.__all__ differ:\n" + "\n".join(problems)


def test_documented_members_are_the_real_ones(build: Build) -> None:
    """For every public class, the members the docs list are exactly its
    public members (autodoc :members: lists and hand-written attributes
    alike), apart from the few in NOT_API."""
    docs = documented(build)
    problems = []
    for name, cls in public_classes():
        real = public_members(cls)
        listed = {member.partition(".")[2] for member in docs if member.startswith(name + ".")}
        skipped = NOT_API.get(name, {})
        problems += [
            f"{name}.{member}: public but not documented in docs/api.rst"
            for member in sorted(real - listed - set(skipped))
        ]
        problems += [
            f"{name}.{member}: documented, but {name} has no such member"
            for member in sorted(listed - real)
        ]
        problems += [
            f"{name}.{member}: in NOT_API, but {name} has no such member any more"
            for member in sorted(set(skipped) - real)
        ]
        problems += [
            f"{name}.{member}: in NOT_API, yet documented"
            for member in sorted(set(skipped) & listed)
        ]
    assert not problems, "documented members differ from the code:\n" + "\n".join(problems)


IMPORT = re.compile(r"from (flask_dbnotify[\w.]*) import (\([^)]*\)|[^\n]*)")


def test_what_the_docs_import_exists() -> None:
    """Every ``from flask_dbnotify... import NAME`` in the docs works, and
    what they import from flask_dbnotify itself is in its __all__."""
    problems = []
    for page in sorted(DOCS.glob("*.rst")):
        for match in IMPORT.finditer(page.read_text()):
            module_name, imports = match.groups()
            names = [n.split(" as ")[0].strip() for n in imports.strip("()").split(",")]
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                problems.append(f"{page.name}: from {module_name} import ...: {exc}")
                continue
            for name in filter(None, names):
                if not hasattr(module, name):
                    problems.append(f"{page.name}: {module_name} has no {name}")
                elif module is flask_dbnotify and name not in flask_dbnotify.__all__:
                    problems.append(f"{page.name}: {name} is not in flask_dbnotify.__all__")
    assert not problems, "imports in the docs that fail:\n" + "\n".join(problems)


def test_the_health_endpoint_of_the_deployment_page_works(make_app: Any) -> None:
    """The deployment page's health endpoint, run as printed: 503 until the
    listener is connected and hears, 200 after."""
    page = (DOCS / "deployment.rst").read_text()
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", page)
    (code,) = [textwrap.dedent(b) for b in blocks if "/health/dbnotify" in b]
    app, dbnotify = make_app()
    exec(code, {"app": app, "dbnotify": dbnotify})
    client = app.test_client()
    assert client.get("/health/dbnotify").status_code == 503
    dbnotify.start(app)
    response = poll_until(
        lambda: (r := client.get("/health/dbnotify")).status_code == 200 and r,
        "the health endpoint to say ready",
    )
    assert response.json["connected"] is True and response.json["deaf"] is False
