"""The house rules hold: ruff's lint and format, and mypy --strict on the
package (pyproject.toml configures all three)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_code_passes(command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports when it runs, at any
    depth of its code (imports under ``if TYPE_CHECKING:`` are for the type
    checker only and not counted)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom) and (node.level or node.module):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = str(node.module)
            # `from pkg import mod` depends on the module; else on what holds the names.
            found.update(
                f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                for alias in node.names
            )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("flask_dbnotify"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_no_import_cycles() -> None:
    """No module of the package imports, directly or not, one that imports
    it back (a package imports its own submodules, which is no cycle)."""
    modules: dict[str, Path] = {}
    for path in (ROOT / "flask_dbnotify").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {
        # A module's own packages are imported before it anyway: no edge.
        name: {
            m
            for m in _imports(path, name, modules)
            if m in modules and m != name and not name.startswith(m + ".")
        }
        for name, path in modules.items()
    }
    cycles = set()

    def walk(name: str, path: list[str]) -> None:
        for dep in graph[name]:
            if dep in path:
                cycles.add(" -> ".join([*path[path.index(dep) :], dep]))
            else:
                walk(dep, [*path, dep])

    for name in graph:
        walk(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))
