"""What the relay is handed, and how a run of row changes becomes journal
bodies: in Python (:func:`build`, with :mod:`.tojson`) or by an INSERT
that has the server build them (:func:`server_insert`). Pure: no I/O.

A body is what a durable trigger journals for one row: the batch head,
the commit time, and ``"r": [ROW]`` (see flask_dbnotify/_payload.py);
both ways write it byte for byte the same.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import pgoutput
from ..common import literal
from . import tojson


@dataclass(frozen=True)
class WatchDef:
    """What a watch captures, as ``install-triggers`` recorded it."""

    name: str
    head: dict[str, Any]
    ops: str
    columns: tuple[str, ...] | None
    when_changed: tuple[str, ...] | None


@dataclass
class Change:
    """One row change of a transaction."""

    relation: pgoutput.Relation
    op: str  # I, U or D
    new: pgoutput.Values | None
    old: pgoutput.Values | None
    #: Its transaction's commit time, in seconds since the epoch, as text.
    ts: str


@dataclass
class Sent:
    """A row of the messages table: what ``notify(connection=...)`` sent."""

    id: Any
    body: Any
    ts: str


@dataclass
class Truncated:
    """A TRUNCATE, its tables named (as the leader's relations know them)."""

    tables: list[tuple[str, str]]
    ts: str


@dataclass
class Rows:
    """The rows of a run that make events (an UPDATE that changed nothing,
    or none of ``when_changed``, makes none), row by row."""

    op: str
    stamps: list[str] = field(default_factory=list)
    new: list[pgoutput.Values] = field(default_factory=list)  # not for D
    old: list[pgoutput.Values] = field(default_factory=list)  # not for I
    #: UPDATE of a watch with ``columns``: the JSON array of changed names.
    changed: list[str] = field(default_factory=list)

    def sides(self) -> list[tuple[str, list[pgoutput.Values]]]:
        """``n`` (new) and ``o`` (old) rows, those the op has, in body order."""
        return [(s, v) for s, v in (("n", self.new), ("o", self.old)) if v]


def select(watch: WatchDef, names: list[str], op: str, run: list[Change]) -> Rows:
    """The rows of ``run`` (changes of one relation and op) that make events."""
    if op == "I":
        inserted = [(c.ts, c.new) for c in run if c.new is not None]
        return Rows(op, [ts for ts, _ in inserted], new=[v for _, v in inserted])
    if op == "D":
        deleted = [(c.ts, c.old) for c in run if c.old is not None]
        return Rows(op, [ts for ts, _ in deleted], old=[v for _, v in deleted])
    rows = Rows(op)
    for change in run:
        old = change.old
        assert change.new is not None and old is not None
        new = tuple(
            o if v is pgoutput.UNCHANGED else v for v, o in zip(change.new, old, strict=True)
        )
        differ = {names[i] for i, (a, b) in enumerate(zip(new, old, strict=True)) if a != b}
        if not differ:
            continue  # an UPDATE that changed nothing
        if watch.when_changed and not differ & set(watch.when_changed):
            continue
        if watch.columns is not None:
            # The listener works out `changed` itself when every column is carried.
            rows.changed.append(json.dumps(sorted(differ, key=names.index), ensure_ascii=False))
        rows.stamps.append(change.ts)
        rows.new.append(new)
        rows.old.append(old)
    return rows


def build(
    head: str,
    keys: list[str],
    converters: list[tojson.Convert | None],
    carried: list[int],
    rows: Rows,
) -> list[str] | None:
    """The journal bodies of ``rows``, built here, as the server path would
    build them; None if a column has no converter or a value is not text."""
    if None in converters:
        return None
    objects, columns = [], []
    for _, values in rows.sides():
        by_column = list(zip(*values, strict=True))
        for i, convert in zip(carried, converters, strict=True):
            assert convert is not None
            column = _json_column(convert, by_column[i])
            if column is None:
                return None
            columns.append(column)
        objects.append("{" + ",".join(k.replace("%", "%%") + "%s" for k in keys) + "}")
    row = ",".join(objects)
    if rows.op == "U":
        if rows.changed:
            columns.append(rows.changed)
            row += ",%s"
        row = f"[{row}]"
    template = head.replace("%", "%%") + '%s, "r": [' + row + "]}"
    return [template % values for values in zip(rows.stamps, *columns, strict=True)]


def _json_column(
    convert: tojson.Convert, values: Sequence[str | bytes | None | pgoutput.Unchanged]
) -> list[str] | None:
    """One column's values as JSON text ('null' for NULL); None if one is
    neither text nor NULL (binary, or a TOASTed value not sent)."""
    if convert is tojson.same:
        out = [v if v is not None else "null" for v in values if v is None or type(v) is str]
    else:
        out = [
            convert(v) if v is not None else "null" for v in values if v is None or type(v) is str
        ]
    return out if len(out) == len(values) else None


def server_insert(
    journal: str,
    watch: str,
    head: str,
    keys: list[str],
    rows: Rows,
    carried: list[int],
    types: list[str],
) -> tuple[str, dict[str, Any]]:
    """The INSERT into ``journal`` that builds the bodies of ``rows`` on
    the server: each value cast from its text to its column's type
    (``types``, of every column) and written by to_json()."""
    params: dict[str, Any] = {"w": watch, "head": head, "ts": rows.stamps}
    arrays, aliases = ["%(ts)s::text[]"], ["ts"]
    objects = []
    for side, values in rows.sides():
        columns = list(zip(*values, strict=True))
        parts = []
        for slot, i in enumerate(carried):
            alias = f"{side}{slot}"
            params[alias] = list(columns[i])
            arrays.append(f"%({alias})s::text[]")
            aliases.append(alias)
            key = literal(keys[slot]).replace("%", "%%")
            cast = types[i].replace("%", "%%")
            value = f"coalesce(to_json(u.{alias}::{cast})::text, 'null')"
            sep = "'{'" if slot == 0 else "','"
            parts.append(f"{sep} || {key} || {value}")
        objects.append("(" + " || ".join(parts) + " || '}')")
    row = " || ',' || ".join(objects)
    if rows.op == "U":
        if rows.changed:
            params["ch"] = rows.changed
            arrays.append("%(ch)s::text[]")
            aliases.append("ch")
            row += " || ',' || u.ch"
        row = f"'[' || {row} || ']'"
    query = (
        f"INSERT INTO {journal} (watch, body) "
        f"SELECT %(w)s, %(head)s || u.ts || ', \"r\": [' || {row} || ']}}' "
        f"FROM unnest({', '.join(arrays)}) WITH ORDINALITY AS u({', '.join(aliases)}, ord) "
        "ORDER BY u.ord"
    )
    return query, params
