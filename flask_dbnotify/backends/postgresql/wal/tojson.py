"""PostgreSQL's ``to_json()`` in Python, for the built-in types whose text
turns into the same JSON exactly.

The relay receives each value as the text its type's output function
wrote in the WAL sender's session. For the types below, that text alone
says what ``to_json(value::type)`` gives in the relay's own session
(json.c, ``datum_to_json``), byte for byte; for any other type the relay
asks the server. Checked against the server by tests/test_wal_relay.py.

- ``int2``, ``int4``, ``int8``, ``json``, ``jsonb``: the text itself (the
  server appends a JSON value's output unescaped).
- ``float4``, ``float8``, ``numeric``: the text if it is a JSON number,
  else a JSON string (``NaN``, ``Infinity``, ``-Infinity``), as
  ``IsValidJsonNumber()`` decides. Casting the text back and writing it
  again gives the same text in a session with the same
  ``extra_float_digits`` (the relay sets the WAL sender's to its own).
- ``bool``: ``t``/``f`` become ``true``/``false``.
- ``text``, ``varchar``, ``bpchar`` (padded, as its output is), ``name``,
  ``uuid`` and ``oid`` (a string, not a number: oid is not among the
  numeric types of ``json_categorize_type``): a JSON string escaped as
  ``escape_json()`` does, which is what ``json.dumps(ensure_ascii=False)``
  does for every code point.
- ``date``, ``timestamp``: when the WAL sender writes ``DateStyle`` ISO,
  whose dates are XSD's and whose timestamps differ only by the space
  before the time (``T`` in XSD).
- ``timestamptz``: as ``timestamp``, the offset written with its minutes,
  when besides the WAL sender's ``TimeZone`` is the relay session's (the
  offset is the zone's at that instant, in either session).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from json.encoder import encode_basestring

#: A value's output text to its JSON text.
Convert = Callable[[str], str]

#: Built-in type oids (fixed in pg_type.dat).
INT2, INT4, INT8, OID = 21, 23, 20, 26
FLOAT4, FLOAT8, NUMERIC = 700, 701, 1700
BOOL, TEXT, VARCHAR, BPCHAR, NAME, UUID = 16, 25, 1043, 1042, 19, 2950
JSON, JSONB = 114, 3802
DATE, TIMESTAMP, TIMESTAMPTZ = 1082, 1114, 1184

#: json_lex_number's grammar, as IsValidJsonNumber() applies it.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_BOOLEANS = {"t": "true", "f": "false"}

#: A JSON string of the text, escaped as escape_json() does.
string: Convert = encode_basestring


def same(text: str) -> str:
    """The text is its JSON (the relay skips the call)."""
    return text


def number(text: str) -> str:
    return text if _NUMBER.fullmatch(text) else string(text)


def boolean(text: str) -> str:
    return _BOOLEANS[text]


def timestamp(text: str) -> str:
    # ISO "2024-01-02 03:04:05.5[ BC]"; 'infinity' has no space.
    return string(text.replace(" ", "T", 1))


def timestamptz(text: str) -> str:
    # ISO "2024-01-02 03:04:05.5+05[:30[:15]][ BC]"; XSD always has the minutes.
    if text[-3] in "+-":
        # The usual case, a whole hour's offset: nothing in it to escape.
        return '"' + text.replace(" ", "T", 1) + ':00"'
    day, space, rest = text.partition(" ")
    if not space:
        return string(text)  # infinity, -infinity
    era = ""
    if rest.endswith(" BC"):
        rest, era = rest[:-3], " BC"
    if rest[-3] in "+-":
        rest += ":00"
    return string(f"{day}T{rest}{era}")


_ALWAYS: dict[int, Convert] = {
    INT2: same,
    INT4: same,
    INT8: same,
    JSON: same,
    JSONB: same,
    FLOAT4: number,
    FLOAT8: number,
    NUMERIC: number,
    BOOL: boolean,
    TEXT: string,
    VARCHAR: string,
    BPCHAR: string,
    NAME: string,
    UUID: string,
    OID: string,
}


def converters(stream: Mapping[str, str | None], relay_time_zone: str | None) -> dict[int, Convert]:
    """Type oid -> converter, for values written by a WAL sender whose
    session reported ``stream`` (``DateStyle``, ``TimeZone``), turned into
    JSON as a session in ``relay_time_zone`` would."""
    found = dict(_ALWAYS)
    if (stream.get("DateStyle") or "").startswith("ISO"):
        found[DATE] = string
        found[TIMESTAMP] = timestamp
        zone = stream.get("TimeZone")
        if zone is not None and zone == relay_time_zone:
            found[TIMESTAMPTZ] = timestamptz
    return found
