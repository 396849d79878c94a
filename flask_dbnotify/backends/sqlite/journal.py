"""The journal as listeners and once receivers read it, on SQLite: rows
turned back into events by :class:`~..shaped.Rows`, with SQLite's clock."""

from __future__ import annotations

from ..._items import Item
from ..shaped import Rows
from .connection import Database
from .ddl import unix

#: What a journal row is read as, everywhere.
COLUMNS = "id, created_at, shape, body"


def rows_of(db: Database) -> Rows:
    """The decoder of ``db``'s journal rows."""

    def header(key: str) -> str | None:
        found = db.run("SELECT header FROM dbnotify_shapes WHERE key = ?", (key,))
        return str(found[0][0]) if found else None

    return Rows(header, unix)


def read(db: Database, rows: Rows, since: int, limit: int) -> tuple[list[Item], int | None]:
    """Up to ``limit`` journal rows from id ``since``, decoded, and the last id."""
    found = db.run(
        f"SELECT {COLUMNS} FROM dbnotify_journal WHERE id >= ? ORDER BY id LIMIT ?",
        (since, limit),
    )
    return rows.decode_many(found), (found[-1][0] if found else None)
