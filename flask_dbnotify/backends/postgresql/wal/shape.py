"""What the relay is handed, and how a run of row changes becomes journal
bodies: in Python (:func:`build`, with :mod:`.tojson`) or by an INSERT
that has the server build them (:func:`server_insert`). Pure: no I/O.

A body is what a durable trigger journals for one row: the batch head,
the commit time, and ``"r": [ROW]`` (see flask_dbnotify/_payload.py);
both ways write it byte for byte the same. A ROW over
:data:`MAX_ROW_BYTES` is cut, as triggers cut it: ``["cut", KEY]``
(UPDATE: ``["cut", NEW_KEY, OLD_KEY]``), KEY the primary key columns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...._context import MAX_BYTES as CONTEXT_BYTES
from .. import pgoutput
from ..common import MAX_ROW_BYTES, literal
from . import tojson


@dataclass(frozen=True)
class WatchDef:
    """What a watch captures, as ``install-triggers`` recorded it."""

    name: str
    head: dict[str, Any]
    ops: str
    columns: tuple[str, ...] | None
    when_changed: tuple[str, ...] | None


def context_text(content: bytes) -> str:
    """What a context message (``set_context()``) adds after the commit
    time in the bodies of its transaction's later changes: ``, "cx": ``
    and its JSON as a JSON string; nothing to clear it, or for a message
    that is not UTF-8 or over the size triggers take."""
    if not content or len(content) > CONTEXT_BYTES:
        return ""
    try:
        return ', "cx": ' + json.dumps(content.decode(), ensure_ascii=False)
    except UnicodeDecodeError:
        return ""


@dataclass
class Change:
    """One row change of a transaction."""

    relation: pgoutput.Relation
    op: str  # I, U or D
    new: pgoutput.Values | None
    old: pgoutput.Values | None
    #: Its transaction's commit time, in seconds since the epoch, as text,
    #: and its context (see :func:`context_text`): what follows ``"ts": ``.
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


@dataclass(frozen=True)
class Layout:
    """Where a run's values go in its bodies."""

    #: The body up to the commit time: the watch's head, the op, ``"ts": ``.
    head: str
    #: Indexes of the columns carried, and each one's ``"name": ``.
    carried: list[int]
    keys: list[str]
    #: Places in ``carried`` of the primary key columns.
    pk: list[int]

    @classmethod
    def of(cls, watch: WatchDef, names: list[str], op: str) -> Layout:
        pk = watch.head["k"]
        carried = [
            i
            for i, name in enumerate(names)
            if watch.columns is None or name in watch.columns or name in pk
        ]
        return cls(
            json.dumps({**watch.head, "o": op}, ensure_ascii=False)[:-1] + ', "ts": ',
            carried,
            [json.dumps(names[i], ensure_ascii=False) + ": " for i in carried],
            [slot for slot, i in enumerate(carried) if names[i] in pk],
        )


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


def build(shape: Layout, converters: list[tojson.Convert | None], rows: Rows) -> list[str] | None:
    """The journal bodies of ``rows``, built here, as the server path would
    build them; None if a column has no converter or a value is not text."""
    if None in converters:
        return None
    head, keys = shape.head, shape.keys
    objects, columns = [], []
    for _, values in rows.sides():
        by_column = list(zip(*values, strict=True))
        for i, convert in zip(shape.carried, converters, strict=True):
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
    bodies = [template % values for values in zip(rows.stamps, *columns, strict=True)]
    _cut_over(bodies, shape, rows, columns)
    return bodies


def _cut_over(bodies: list[str], shape: Layout, rows: Rows, columns: list[list[str]]) -> None:
    """Cut the bodies whose ROW is over MAX_ROW_BYTES in UTF-8 (a body of
    few characters cannot be: one takes at most 4 bytes)."""
    fixed = len(shape.head.encode()) + len(', "r": [') + len("]}")
    width, sides = len(shape.carried), len(rows.sides())
    for n, body in enumerate(bodies):
        if len(body) * 4 <= MAX_ROW_BYTES:
            continue
        if len(body.encode()) - fixed - len(rows.stamps[n]) <= MAX_ROW_BYTES:
            continue
        keys = [
            "{" + ",".join(shape.keys[s] + columns[side * width + s][n] for s in shape.pk) + "}"
            for side in range(sides)
        ]
        bodies[n] = shape.head + rows.stamps[n] + ', "r": [["cut",' + ",".join(keys) + "]]}"


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
    journal: str, watch: str, shape: Layout, rows: Rows, types: list[str]
) -> tuple[str, dict[str, Any]]:
    """The INSERT into ``journal`` that builds the bodies of ``rows`` on
    the server: each value cast from its text to its column's type
    (``types``, of every column) and written by to_json(). A row whose
    values' text alone is over MAX_ROW_BYTES is cut without being built
    (its JSON could be past what the server can build); one whose JSON
    turns out over it is cut once built."""
    params: dict[str, Any] = {"w": watch, "head": shape.head, "ts": rows.stamps}
    doomed = _too_long(shape, rows)
    params["cut"] = doomed
    arrays, aliases = ["%(ts)s::text[]", "%(cut)s::bool[]"], ["ts", "cut"]
    objects, keys = [], []
    for side, values in rows.sides():
        columns = [list(c) for c in zip(*values, strict=True)]
        parts, key = [], []
        for slot, i in enumerate(shape.carried):
            alias = f"{side}{slot}"
            if slot not in shape.pk:
                columns[i] = [None if d else v for v, d in zip(columns[i], doomed, strict=True)]
            params[alias] = columns[i]
            arrays.append(f"%({alias})s::text[]")
            aliases.append(alias)
            name = literal(shape.keys[slot]).replace("%", "%%")
            cast = types[i].replace("%", "%%")
            part = f"{name} || coalesce(to_json(r.{alias}::{cast})::text, 'null')"
            parts.append(part)
            if slot in shape.pk:
                key.append(part)
        objects.append("'{' || " + " || ',' || ".join(parts) + " || '}'")
        keys.append("'{' || " + " || ',' || ".join(key) + " || '}'")
    row = " || ',' || ".join(objects)
    if rows.op == "U":
        if rows.changed:
            params["ch"] = rows.changed
            arrays.append("%(ch)s::text[]")
            aliases.append("ch")
            row += " || ',' || r.ch"
        row = f"'[' || {row} || ']'"
    cut = """'["cut",' || """ + " || ',' || ".join(keys) + " || ']'"
    query = (
        f"INSERT INTO {journal} (watch, body) "
        f"SELECT %(w)s, %(head)s || b.ts || ', \"r\": [' || CASE WHEN b.cut "
        f"OR octet_length(b.j) > {MAX_ROW_BYTES} THEN b.k ELSE b.j END || ']}}' "
        f"FROM (SELECT r.ord, r.ts, r.cut, CASE WHEN r.cut THEN '' ELSE {row} END AS j, "
        f"{cut} AS k FROM unnest({', '.join(arrays)}) "
        f"WITH ORDINALITY AS r({', '.join(aliases)}, ord) OFFSET 0) AS b "
        "ORDER BY b.ord"
    )
    return query, params


def _too_long(shape: Layout, rows: Rows) -> list[bool]:
    """Whether each row's carried values take over MAX_ROW_BYTES as text
    (their JSON is at least as long)."""
    sizes = [0] * len(rows.stamps)
    for _, values in rows.sides():
        for n, row in enumerate(values):
            for i in shape.carried:
                value = row[i]
                if isinstance(value, str):
                    sizes[n] += len(value)
    return [size > MAX_ROW_BYTES for size in sizes]
