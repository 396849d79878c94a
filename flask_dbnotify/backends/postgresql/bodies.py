"""The trigger functions' bodies: fast (NOTIFY the rows), durable (stash
the rows as the writer, then journal them with the owner's rights), and
TRUNCATE. See the package's docstring for who runs what."""

from __future__ import annotations

from ..._context import MAX_BYTES as CONTEXT_BYTES
from ..._context import SETTING as CONTEXT_SETTING
from ...errors import WatchError
from ...events import Operation
from .catalog import Resolved
from .common import CHANNEL, MAX_ROW_BYTES, NOTIFY_LIMIT, ident, literal
from .rows import (
    TOO_LARGE,
    batch_head,
    changed_table,
    cut,
    cut_rows,
    each_row,
    groups,
    one_row,
    rows_query,
    send_batch,
)

#: Durable triggers hand rows over in settings of at most this many bytes.
SLOT_BYTES = 64 * 1024 * 1024
#: What a fast notification holds besides the head and the rows: the
#: timestamp, the batch number and the brackets around the rows.
ENVELOPE_BYTES = 120
#: A watch whose names leave less room than this for rows is refused.
MIN_BATCH_BYTES = 500
#: The time of a change, as a JSON number (seconds since the epoch).
STAMP = "extract(epoch FROM clock_timestamp())::text"
#: The writer's context (set_context()).
CX = f"current_setting({literal(CONTEXT_SETTING)}, true)"
#: Reads the writer's context once per statement.
DECLARE_CONTEXT = f"cx text := {CX};"


def context(cx: str = "cx") -> str:
    """``,"cx": "<the context's JSON, as a JSON string>"`` after a body's
    head, or nothing: no context, or one over CONTEXT_BYTES (which only a
    writer that sets the setting itself can make), which is left out
    rather than let grow every notification. to_json() quotes whatever the
    text holds. ``cx``: an expression of the context's text."""
    return (
        f"CASE WHEN octet_length({cx}) BETWEEN 1 AND {CONTEXT_BYTES} "
        f"""THEN ',"cx": ' || to_json({cx})::text ELSE '' END"""
    )


def head_with_context(prefix: str, cx: str = "cx") -> str:
    """SQL text: a body's head (``prefix``), the context, and ``,"ts": ``."""
    return f"""{literal(prefix)} || {context(cx)} || ',"ts": '"""


def fast_body(r: Resolved, op: Operation) -> str:
    """Invoker rights: the rows become JSON as the writer, and go out by
    NOTIFY. Most writes change one row; that path is one query (which
    converts the row and tells whether it is the only one) and plain
    expressions: every query and statement of PL/pgSQL costs a writer."""
    prefix = batch_head(r, op)
    # Rows are grouped so that a group's JSON, escaped once more inside the
    # message, fits in one notification after the head and the envelope
    # (and the half left over takes a context; a batch with a context too
    # long for it goes in pieces).
    budget = (NOTIFY_LIMIT - len(prefix.encode()) - ENVELOPE_BYTES) // 2
    if budget < MIN_BATCH_BYTES:
        raise WatchError(f"names of {r.watch.name!r} are too long for a notification")
    head = f"""{head_with_context(prefix, CX)} || {STAMP} || ',"s": '"""
    send = send_batch(literal(CHANNEL))
    slow = each_row(r, op, "batch", send)
    return f"""
DECLARE
  head text;
  many boolean;
  failed boolean;
  rows_in bigint;
  batch text;
  seq text;
  msg text;
  bytes bytea;
  total int;
  pos int;
  len int;
  k int;
  pair record;
BEGIN
  BEGIN
    -- One row's JSON, or NULL (no row, or an UPDATE that changed nothing).
    SELECT r.j INTO STRICT batch FROM ({one_row(r, op)}) AS r;
  EXCEPTION WHEN too_many_rows THEN
    many := true;
  WHEN {TOO_LARGE} THEN
    failed := true;
  END;
  IF batch IS NOT NULL THEN
    IF octet_length(batch) > {MAX_ROW_BYTES} THEN
      batch := {cut(r, op, "batch")};
    END IF;
    {send_batch(literal(CHANNEL), head)}
  ELSIF many OR failed THEN
    head := {head};
    SELECT count(*) INTO rows_in FROM {changed_table(op)};
    IF rows_in = 1 THEN
      -- The only row cannot become JSON.
      {slow}
    ELSE
      BEGIN
        FOR batch IN {groups(r, op, budget)} LOOP
          {send}
        END LOOP;
      EXCEPTION WHEN {TOO_LARGE} THEN
        -- Nothing was sent (the block's notifications are rolled back).
        {slow}
      END;
    END IF;
  END IF;
  RETURN NULL;
END
"""


def stash_body(r: Resolved, op: Operation) -> str:
    """Durable, first half (invoker rights, pinned search_path): the rows
    become JSON as the writer and are left, separated by chr(30) (which
    JSON text never holds), in the transaction-local setting
    ``dbnotify.s<depth>_1``. It always sets it, to nothing when there are no
    rows, so what the second half reads was written here, for this
    statement. Over 1 GB of rows (the slow path) go in ``_2``, ``_3``...
    and ``_1`` holds ``#`` and their number."""
    # In the slow path a value's own code (a cast, as the writer) runs
    # after earlier slots are set, and could change them: their digests
    # are checked before the hand-over. (Otherwise every row is converted
    # before the only slot is set.)
    flush = (
        "k := k + 1; part := array_to_string(parts, chr(30)); sums := sums || md5(part); "
        "PERFORM set_config('dbnotify.s' || d || '_' || (k + 1), part, true); "
        "parts := '{}'; size := 0;"
    )
    emit = f"""
      IF one IS NOT NULL THEN
        IF size > 0 AND size + octet_length(one) > {SLOT_BYTES} THEN {flush} END IF;
        parts := parts || one;
        size := size + octet_length(one) + 1;
      END IF;"""
    # INSERT and DELETE rows are aggregated in the order of the transition
    # table (the order row_number() OVER () numbers them in); UPDATE pairs
    # come out of a join, so they are put back in order.
    one_table = op is not Operation.UPDATE
    rows = rows_query(r, op, one=True) if one_table else rows_query(r, op)
    order = "" if one_table else " ORDER BY r.i"
    return f"""
DECLARE
  d text := pg_trigger_depth()::text;
  failed boolean := false;
  rows_in bigint;
  biggest int;
  part text;
  one text;
  parts text[] := '{{}}';
  sums text[] := '{{}}';
  size bigint := 0;
  k int := 0;
  pair record;
BEGIN
  BEGIN
    -- One query, one text for the whole statement (a writer's statement
    -- mostly touches one row, and two queries cost more than one). Only a
    -- statement with a row over MAX_ROW_BYTES runs the query that cuts.
    SELECT string_agg(r.j, chr(30){order}), max(octet_length(r.j))
      INTO part, biggest FROM ({rows}) AS r;
    IF biggest > {MAX_ROW_BYTES} THEN
      SELECT string_agg(r.j, chr(30) ORDER BY r.i) INTO part FROM ({cut_rows(r, op)}) AS r;
    END IF;
  EXCEPTION WHEN {TOO_LARGE} THEN
    -- Over 1 GB in all, or a row that cannot become JSON.
    failed := true;
  END;
  IF failed THEN
    SELECT count(*) INTO rows_in FROM {changed_table(op)};
    {each_row(r, op, "one", emit)}
    IF size > 0 THEN {flush} END IF;
    FOR n IN 1..k LOOP
      IF md5(current_setting('dbnotify.s' || d || '_' || (n + 1))) <> sums[n] THEN
        RAISE EXCEPTION 'Flask-DBNotify: rows changed while being journaled';
      END IF;
    END LOOP;
    part := '#' || k;
  END IF;
  PERFORM set_config('dbnotify.s' || d || '_1', coalesce(part, ''), true);
  RETURN NULL;
END
"""


def notify_journal(lo: str, hi: str) -> str:
    """NOTIFY the journal ids ``lo``..``hi`` of transaction ``x`` (variables)."""
    # An expression, not PERFORM (a query): pg_notify()'s void, cast, is kept in ``sent``.
    return (
        f"""sent := pg_notify({literal(CHANNEL)}, '{{"v": 1, "J": [' || {lo} || ', ' """
        f"""|| {hi} || '], "x": ' || x || '}}')::text;"""
    )


def journal_body(r: Resolved, op: Operation, schema: str) -> str:
    """Durable, second half (owner's rights): move what the first half left
    into the journal, one row per event, and NOTIFY only the range of ids
    and the transaction id. It reads text and writes our table; no value
    of the user's, and so no function of the user's, is involved."""
    journal, watch = ident(schema, "dbnotify_journal"), literal(r.watch.name)
    head = head_with_context(batch_head(r, op))
    return f"""
DECLARE
  {DECLARE_CONTEXT}
  d text := pg_trigger_depth()::text;
  one text := current_setting('dbnotify.s' || d || '_1', true);
  x xid8;
  lo bigint;
  hi bigint;
  head text;
  sent text;
BEGIN
  IF one IS NULL OR one = '' OR one = '#0' THEN
    RETURN NULL;
  END IF;
  x := pg_current_xact_id();
  head := {head} || {STAMP} || ',"r": [';
  IF left(one, 1) <> '#' THEN
    IF strpos(one, chr(30)) = 0 THEN
      -- Most writes touch one row.
      INSERT INTO {journal} (xid, watch, body)
      VALUES (x, {watch}, head || one || ']}}') RETURNING id INTO lo;
      hi := lo;
    ELSE
      WITH ins AS (
        INSERT INTO {journal} (xid, watch, body)
        SELECT x, {watch}, head || e.j || ']}}' FROM string_to_table(one, chr(30)) AS e(j)
        RETURNING id)
      SELECT min(id), max(id) INTO lo, hi FROM ins;
      IF octet_length(one) > 1048576 THEN
        -- Free a large text now rather than at commit.
        PERFORM set_config('dbnotify.s' || d || '_1', '', true);
      END IF;
    END IF;
  ELSE
    -- Over 1 GB of rows, in slots 2 and up.
    WITH ins AS (
      INSERT INTO {journal} (xid, watch, body)
      SELECT x, {watch}, head || e.j || ']}}'
      FROM generate_series(2, substr(one, 2)::int + 1) AS s(k)
      CROSS JOIN LATERAL string_to_table(
        current_setting('dbnotify.s' || d || '_' || s.k), chr(30)) WITH ORDINALITY AS e(j, o)
      ORDER BY s.k, e.o
      RETURNING id)
    SELECT min(id), max(id) INTO lo, hi FROM ins;
    PERFORM set_config('dbnotify.s' || d || '_' || s.k, '', true)
      FROM generate_series(2, substr(one, 2)::int + 1) AS s(k);
  END IF;
  IF lo IS NOT NULL THEN
    {notify_journal("lo", "hi")}
  END IF;
  RETURN NULL;
END
"""


def truncate_body(r: Resolved, schema: str) -> str:
    """TRUNCATE carries no row. One TRUNCATE of a partitioned table fires
    the trigger of every table it empties; those calls must make one
    event, but two TRUNCATEs with a change of the table between them must
    make two. So a TRUNCATE is dropped only when nothing of this watch
    happened since the last one in the transaction (which changes nothing):
    fast, the notification carries the transaction's counter of row
    notifications, unchanged if none was sent, and PostgreSQL folds equal
    notifications; durable, it is not journaled when the transaction's
    latest journal row is already a TRUNCATE of this watch."""
    prefix = batch_head(r, Operation.TRUNCATE)
    head = head_with_context(prefix)
    ts = "extract(epoch FROM statement_timestamp())::text"
    if not r.watch.durable:
        return f"""
DECLARE
  {DECLARE_CONTEXT}
  seq text := coalesce(current_setting('dbnotify.batch', true), '');
BEGIN
  PERFORM pg_notify({literal(CHANNEL)}, {head} || {ts} || ',"s": '
    || CASE WHEN seq ~ '^[0-9]{{1,15}}$' THEN seq ELSE '0' END || '}}');
  RETURN NULL;
END
"""
    journal = ident(schema, "dbnotify_journal")
    return f"""
DECLARE
  {DECLARE_CONTEXT}
  x xid8 := pg_current_xact_id();
  jid bigint;
  sent text;
BEGIN
  INSERT INTO {journal} (xid, watch, body)
  SELECT x, {literal(r.watch.name)}, {head} || {ts} || '}}'
  WHERE NOT EXISTS (
    SELECT FROM (SELECT j.watch, j.body FROM {journal} AS j
                 WHERE j.xid = x ORDER BY j.id DESC LIMIT 1) AS latest
    WHERE latest.watch = {literal(r.watch.name)}
      AND left(latest.body, {len(prefix) + 1}) = {literal(prefix + ",")})
  RETURNING id INTO jid;
  IF jid IS NOT NULL THEN
    {notify_journal("jid", "jid")}
  END IF;
  RETURN NULL;
END
"""
