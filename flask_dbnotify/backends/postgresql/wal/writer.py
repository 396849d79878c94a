"""How a relay's journal rows travel to the server.

A relay is one round trip when it can be: its statements go in one query
string, which the server runs as one transaction (its commit, and its
flush to disk, the only wait). Bodies built in Python travel as one text
parameter cut on the server, for :data:`SMALL` rows at most; more go in
by ``COPY``, which costs less per row but two round trips more, in a
transaction of their own.
"""

from __future__ import annotations

import io
from typing import Any

#: Characters handed to COPY at a time.
_COPY_CHUNK = 1 << 20
#: Bodies built here, and characters of them, up to which a relay inserts
#: them in its one query; past either, COPY, which streams them in chunks
#: (one query holds them all at once, and the server takes at most 1 GB).
SMALL = 1000
SMALL_CHARS = 4 << 20
#: What separates bodies in that query's parameter: no JSON text holds
#: this control character unescaped (a body that did would go by COPY).
_SEPARATOR = "\x1e"
_INSERT_SMALL = (
    "INSERT INTO {} (watch, body) SELECT %s, b "
    "FROM unnest(string_to_array(%s, E'\\x1e')) WITH ORDINALITY AS t(b, n) ORDER BY n"
)
#: What COPY's text format escapes (the backslash first).
_COPY_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))


class JournalWriter:
    """The journal rows of one relay transaction, in order, and then the
    relay's end (see the module's docs for how they travel)."""

    def __init__(self, cur: Any, table: str) -> None:
        self.cur = cur
        self.table = table
        #: Bodies built here, by watch, and statements, in order.
        self.steps: list[tuple[str | None, list[str]] | str] = []
        self.built = self.chars = 0

    def add(self, watch: str | None, bodies: list[str]) -> None:
        if bodies:
            self.steps.append((watch, bodies))
            self.built += len(bodies)
            self.chars += sum(map(len, bodies))

    def insert(self, query: str, params: dict[str, Any]) -> None:
        """An INSERT that builds its rows on the server."""
        self.steps.append(self.cur.mogrify(query, params).decode())

    def bodies(self) -> list[str] | None:
        """Every row's body in order, if all were built here."""
        if any(isinstance(step, str) for step in self.steps):
            return None
        return [body for step in self.steps for body in step[1]]

    def run(self, end: str) -> tuple[int, int, int] | None:
        """Write everything, then ``end``, in one transaction; return the
        first and last journal ids and the transaction id, if ``end``
        notified them."""
        statements = []
        copy = self.built > SMALL or self.chars > SMALL_CHARS
        for step in self.steps:
            if isinstance(step, str):
                statements.append(step)
                continue
            if copy:
                break
            watch, bodies = step
            joined = _SEPARATOR.join(bodies)
            if joined.count(_SEPARATOR) != len(bodies) - 1:
                copy = True
                break
            insert = _INSERT_SMALL.format(self.table.replace("%", "%%"))
            statements.append(self.cur.mogrify(insert, (watch, joined)).decode())
        if not copy:
            # One query: the server runs it as one transaction.
            self.cur.execute("; ".join([*statements, end]))
            return self._notified()
        try:
            self.cur.execute("BEGIN")
            for step in self.steps:
                if isinstance(step, str):
                    self.cur.execute(step)
                else:
                    self.cur.copy_expert(
                        f"COPY {self.table} (watch, body) FROM STDIN",
                        io.StringIO(_copy_text(*step)),
                        size=_COPY_CHUNK,
                    )
            self.cur.execute(end)
            ids = self._notified()
            self.cur.execute("COMMIT")
        except BaseException:
            if not self.cur.connection.closed:
                self.cur.execute("ROLLBACK")
            raise
        return ids

    def _notified(self) -> tuple[int, int, int] | None:
        row = self.cur.fetchone() if self.cur.description else None
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))


def _copy_escape(text: str) -> str:
    """Text as a field of COPY's text format (a scan for each special
    character costs less than a replace that finds none)."""
    for char, escaped in _COPY_ESCAPES:
        if char in text:
            text = text.replace(char, escaped)
    return text


def _copy_text(watch: str | None, bodies: list[str]) -> str:
    """Rows ``watch<TAB>body`` of COPY's text format, one per body. Bodies
    are escaped joined by NUL, which no PostgreSQL text holds."""
    first = "\\N" if watch is None else _copy_escape(watch)
    joined = _copy_escape("\0".join(bodies))
    return first + "\t" + joined.replace("\0", "\n" + first + "\t") + "\n"
