"""Sphinx configuration for the Flask-DBNotify documentation."""

from __future__ import annotations

import importlib.metadata

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
nitpicky = False

exclude_patterns = ["_build"]

html_theme = "alabaster"
html_title = f"Flask-DBNotify {version}"
html_theme_options = {
    "description": "Committed database changes as Flask signals.",
    "fixed_sidebar": True,
}
