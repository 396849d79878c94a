"""The parts of a trigger function's SQL: a statement's rows as JSON
(limited to the carried columns, cut when too large, UPDATEs paired and
filtered), batching, and sending in pieces."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ... import _payload
from ...events import Operation
from .catalog import Resolved
from .common import MAX_ROW_BYTES, NOTIFY_LIMIT, PIECE_BYTES, ident, literal, text_array

#: The transaction's counter of row notifications (see send_batch()).
BATCH = "current_setting('dbnotify.batch', true)"
#: Errors that mean "this row is too large to turn into JSON".
TOO_LARGE = "program_limit_exceeded OR out_of_memory"


def row_json(r: Resolved, ref: str) -> str:
    """JSON text of the row ``ref`` (a composite value), limited to the
    carried columns. Columns are picked by name at run time, so dropping or
    renaming one never makes a write fail."""
    if r.watch.columns is None:
        return f"row_to_json({ref})::text"
    carried = [c for c in r.columns if c in r.watch.columns or c in r.pk]
    return pick(f"row_to_json({ref})", carried)


def pick(json_expr: str, names: Sequence[str]) -> str:
    """JSON text of the object ``json_expr`` with only the keys ``names``."""
    return (
        f"(SELECT json_object_agg(e.key, e.value) FROM json_each({json_expr}) AS e "
        f"WHERE e.key = ANY({text_array(names)}))::text"
    )


def changed_json(new: str, old: str) -> str:
    """``|| ',' || [names of the columns whose JSON differs]``."""
    return (
        "|| ',' || (SELECT coalesce(json_agg(a.key), '[]') "
        f"FROM json_each(row_to_json({new})) AS a JOIN json_each(row_to_json({old})) AS b "
        "USING (key) WHERE a.value::text IS DISTINCT FROM b.value::text)::text "
    )


def when_changed(r: Resolved, new: str, old: str) -> str:
    cols = text_array(list(r.watch.when_changed or ()))
    return (
        f"EXISTS (SELECT FROM unnest({cols}) AS w(k) "
        f"WHERE to_jsonb({new}) -> w.k IS DISTINCT FROM to_jsonb({old}) -> w.k)"
    )


def rows_query(r: Resolved, op: Operation, one: bool = False) -> str:
    """A query yielding ``(i, j)``: row order and the row's JSON. With
    ``one``, only ``j``, in the transition table's order; for an UPDATE
    that pairs rows only when the statement changed one row."""
    # The whole-row alias must not be the name of one of the columns.
    alias = "dbnotify_row"
    while alias in r.columns:
        alias += "_"
    row = ident(alias)
    number = "" if one else "row_number() OVER () AS i, "
    if op is not Operation.UPDATE:
        table = "dbnotify_new" if op is Operation.INSERT else "dbnotify_old"
        return f"SELECT {number}{row_json(r, row)} AS j FROM {table} AS {row}"
    # Transition tables hold old and new rows in the same order, so pair
    # them by position; joining on the key would lose rows whose key
    # changed. `*<>` compares binary images: it needs no `=` operator for
    # any column type, and filters UPDATEs that change nothing.
    condition = "nn.r *<> oo.r"
    if r.watch.when_changed:
        condition += " AND " + when_changed(r, "nn.r", "oo.r")
    # With every column carried, the listener works out `changed` from new
    # and old; otherwise the trigger must.
    changed = changed_json("nn.r", "oo.r") if r.watch.columns is not None else ""
    j = f"'[' || {row_json(r, 'nn.r')} || ',' || {row_json(r, 'oo.r')} {changed}|| ']' AS j"
    if one:
        return (
            f"SELECT {j} FROM (SELECT {row} AS r FROM dbnotify_new AS {row}) AS nn, "
            f"(SELECT {row} AS r FROM dbnotify_old AS {row}) AS oo WHERE {condition}"
        )
    return (
        f"SELECT nn.i, {j} "
        f"FROM (SELECT row_number() OVER () AS i, {row} AS r FROM dbnotify_new AS {row}) AS nn "
        f"JOIN (SELECT row_number() OVER () AS i, {row} AS r FROM dbnotify_old AS {row}) AS oo "
        f"USING (i) WHERE {condition}"
    )


def key_of(r: Resolved, json_expr: str) -> str:
    """The primary key columns of a row's JSON, as a JSON object."""
    return f"coalesce({pick(json_expr, r.pk)}, '{{}}')"


def cut(r: Resolved, op: Operation, j: str) -> str:
    """The cut form of the row JSON ``j``: ``["cut", key]`` (UPDATE:
    ``["cut", new key, old key]``)."""
    if op is Operation.UPDATE:
        keys = f"{key_of(r, f'({j})::json -> 0')} || ',' || {key_of(r, f'({j})::json -> 1')}"
    else:
        keys = key_of(r, f"({j})::json")
    return f"""'["cut",' || {keys} || ']'"""


def cut_rows(r: Resolved, op: Operation) -> str:
    """``(i, j)`` with rows over MAX_ROW_BYTES in their cut form. OFFSET 0
    keeps the planner from inlining the JSON, which would build it twice."""
    return (
        f"SELECT i, CASE WHEN octet_length(j) > {MAX_ROW_BYTES} THEN {cut(r, op, 'j')} "
        f"ELSE j END AS j FROM ({rows_query(r, op)} OFFSET 0) AS r"
    )


def one_row(r: Resolved, op: Operation) -> str:
    """A query that yields exactly one row, ``j``, when the statement
    changed at most one row: that row's JSON (NULL when there is none, or
    when an UPDATE changed nothing or none of ``when_changed``), and more
    than one row otherwise (every pair of new and old rows of an UPDATE),
    so that ``SELECT ... INTO STRICT`` tells a single-row statement from
    others in the query that converts the row: no ``count(*)`` first."""
    alias = "dbnotify_row"
    while alias in r.columns:
        alias += "_"
    row = ident(alias)
    if op is not Operation.UPDATE:
        return (
            f"SELECT {row_json(r, row)} AS j FROM (SELECT) AS dbnotify_none "
            f"LEFT JOIN {changed_table(op)} AS {row} ON true"
        )
    # The condition is in the select list, not in WHERE: an UPDATE of two
    # rows makes four pairs whatever they hold.
    condition = "nn.r *<> oo.r"
    if r.watch.when_changed:
        condition += " AND " + when_changed(r, "nn.r", "oo.r")
    changed = changed_json("nn.r", "oo.r") if r.watch.columns is not None else ""
    j = f"'[' || {row_json(r, 'nn.r')} || ',' || {row_json(r, 'oo.r')} {changed}|| ']'"
    return (
        f"SELECT CASE WHEN {condition} THEN {j} END AS j FROM (SELECT) AS dbnotify_none "
        f"LEFT JOIN ((SELECT {row} AS r FROM dbnotify_new AS {row}) AS nn "
        f"CROSS JOIN (SELECT {row} AS r FROM dbnotify_old AS {row}) AS oo) ON true"
    )


def groups(r: Resolved, op: Operation, size: int) -> str:
    """The rows' JSON joined by ',' into groups of about ``size`` bytes."""
    return (
        f"SELECT string_agg(j, ',' ORDER BY i) FROM ("
        f"SELECT i, j, sum(octet_length(j) + 1) OVER (ORDER BY i ROWS UNBOUNDED PRECEDING) "
        f"/ {size} AS b FROM ({cut_rows(r, op)}) AS r) AS r GROUP BY b ORDER BY b"
    )


def each_row(r: Resolved, op: Operation, target: str, emit: str) -> str:
    """The slow path, after a statement's rows could not all be turned into
    JSON: one row at a time, a row that still fails delivered cut (a
    single-row statement's row is known to fail). Runs ``emit`` with the
    row's JSON in ``target``. Should even that fail (a key column renamed
    since install), every row goes out cut with an empty key."""

    def key(alias: str) -> str:
        pairs = ", ".join(f"{literal(k)}, {alias}.{ident(k)}" for k in r.pk)
        return f"json_build_object({pairs})::text"

    new, old = "pair.n", "pair.o"
    if op is Operation.INSERT:
        query = f"SELECT r AS n, {key('r')} AS nk FROM dbnotify_new AS r"
        cut_keys, empty = "pair.nk", "{}"
    elif op is Operation.DELETE:
        query = f"SELECT r AS o, {key('r')} AS ok FROM dbnotify_old AS r"
        cut_keys, empty = "pair.ok", "{}"
    else:
        query = (
            "SELECT nn.r AS n, oo.r AS o, nn.k AS nk, oo.k AS ok "
            f"FROM (SELECT row_number() OVER () AS i, r, {key('r')} AS k "
            "FROM dbnotify_new AS r) AS nn "
            f"JOIN (SELECT row_number() OVER () AS i, r, {key('r')} AS k "
            "FROM dbnotify_old AS r) AS oo "
            "USING (i) WHERE nn.r *<> oo.r"
        )
        cut_keys, empty = "pair.nk || ',' || pair.ok", "{},{}"
    if op is Operation.UPDATE:
        changed = changed_json(new, old) if r.watch.columns is not None else ""
        json_of = f"'[' || {row_json(r, new)} || ',' || {row_json(r, old)} {changed}|| ']'"
        skip = (
            f"IF NOT {when_changed(r, new, old)} THEN CONTINUE; END IF;"
            if r.watch.when_changed
            else ""
        )
    else:
        json_of, skip = row_json(r, new if op is Operation.INSERT else old), ""
    return f"""
    BEGIN
      FOR pair IN {query} LOOP
        BEGIN
          IF rows_in = 1 THEN
            RAISE SQLSTATE '54000';
          END IF;
          {skip}
          {target} := {json_of};
          IF octet_length({target}) > {MAX_ROW_BYTES} THEN
            {target} := {cut(r, op, target)};
          END IF;
        EXCEPTION WHEN {TOO_LARGE} THEN
          {target} := '["cut",' || {cut_keys} || ']';
        END;
        {emit}
      END LOOP;
    EXCEPTION WHEN OTHERS THEN
      FOR pair IN SELECT FROM generate_series(1, rows_in) LOOP
        {target} := '["cut",{empty}]';
        {emit}
      END LOOP;
    END;"""


def send_batch(channel: str, head: str = "head") -> str:
    """Notify ``head || seq || ',"r": [' || batch || ']}'`` (``head`` an
    SQL expression), in pieces when it does not fit in one notification.
    A piece is ``~SEQ K BYTES LAST``, a newline, then the next stretch of
    the message's UTF-8 bytes, cut at a character boundary."""
    # Each statement of PL/pgSQL costs; an expression without a query is
    # the cheapest (so pg_notify()'s void is cast and kept, not PERFORMed).
    return f"""
      seq := set_config('dbnotify.batch', (CASE WHEN {BATCH} ~ '^[0-9]{{1,15}}$'
        THEN {BATCH}::bigint ELSE 0 END + 1)::text, true);
      msg := {head} || seq || ',"r": [' || batch || ']}}';
      IF octet_length(msg) < {NOTIFY_LIMIT} THEN
        msg := pg_notify({channel}, msg)::text;
      ELSE
        bytes := convert_to(msg, 'UTF8');
        total := octet_length(bytes);
        pos := 0;
        k := 0;
        WHILE pos < total LOOP
          len := least({PIECE_BYTES}, total - pos);
          WHILE pos + len < total AND get_byte(bytes, pos + len) & 192 = 128 LOOP
            len := len - 1;
          END LOOP;
          k := k + 1;
          PERFORM pg_notify({channel}, '~' || seq || ' ' || k || ' ' || total || ' '
            || (pos + len = total)::int || chr(10)
            || convert_from(substring(bytes FROM pos + 1 FOR len), 'UTF8'));
          pos := pos + len;
        END LOOP;
      END IF;"""


def batch_head(r: Resolved, op: Operation) -> str:
    # ": " rather than ":" keeps the DDL free of ":name" sequences, which
    # sqlalchemy.text() (Alembic's op.execute) would take for parameters.
    return json.dumps(
        {"v": _payload.VERSION, "t": r.watch.name, "o": op.value[0], "k": list(r.pk)},
        ensure_ascii=False,
        separators=(",", ": "),
    )[:-1]


def changed_table(op: Operation) -> str:
    return "dbnotify_old" if op is Operation.DELETE else "dbnotify_new"
