"""Sphinx configuration for the Flask-DBNotify documentation."""

from __future__ import annotations

import importlib.metadata

import flask_dbnotify

project = "Flask-DBNotify"
copyright = "Flask-DBNotify contributors"
author = "Flask-DBNotify contributors"
release = importlib.metadata.version("Flask-DBNotify")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]

# The docs build offline: no inventories are fetched.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
# A reference to a name of ours that does not resolve (a renamed method, a
# member the API page lost) fails the build, which the tests run with -W.
# Other projects' names cannot resolve (no inventories are fetched), nor can
# type variables and records that are not API, seen in type hints.
nitpicky = True
_ours = "|".join(flask_dbnotify.__all__)
nitpick_ignore_regex = [
    ("py:.*", rf"(?!flask_dbnotify\.|(?:{_ours})\b).*"),
    ("py:class", r"flask_dbnotify\.(extension\.F|events\.T|_watch\.Watch)"),
]

exclude_patterns = ["_build"]

html_theme = "alabaster"
html_title = f"Flask-DBNotify {version}"
html_theme_options = {
    "description": "Committed database changes as Flask signals.",
    "fixed_sidebar": True,
}
