"""Row images of the binary log turned into the JSON our triggers write
(see :func:`..ddl.value`), value by value: bytes in upper-case hex, BIT as
its number, DECIMAL with its digits, times as text, JSON columns embedded.

:func:`image` reads one row image and returns the JSON text of each
column's value (``None`` for a column absent from the image), and where
the next image begins.
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Callable
from json.encoder import encode_basestring

from . import events as ev
from .events import Column

#: A JSON string of a str, as json.dumps(ensure_ascii=False) writes it (in C).
_quote: Callable[[str], str] = encode_basestring

#: Character set names as the server calls them, Python's codec for each
#: where its name differs (MySQL's latin1 is Windows-1252).
_CODECS = {
    "utf8mb4": "utf-8",
    "utf8mb3": "utf-8",
    "utf8": "utf-8",
    "latin1": "cp1252",
    "ucs2": "utf-16-be",
    "utf16": "utf-16-be",
    "utf16le": "utf-16-le",
    "utf32": "utf-32-be",
    "ujis": "euc-jp",
    "sjis": "shift_jis",
    "euckr": "euc-kr",
    "koi8r": "koi8-r",
    "koi8u": "koi8-u",
    "greek": "iso8859-7",
    "hebrew": "iso8859-8",
    "latin2": "iso8859-2",
    "latin5": "iso8859-9",
    "latin7": "iso8859-13",
    "tis620": "tis-620",
    "gb2312": "gb2312",
    "swe7": "latin-1",
    "dec8": "latin-1",
    "hp8": "latin-1",
    "armscii8": "latin-1",
    "keybcs2": "latin-1",
    "geostd8": "latin-1",
}
BINARY = 63


def codec_for(charset: str) -> str:
    """Python's codec for a server character set (utf-8 for one we do not know)."""
    name = _CODECS.get(charset, charset)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "utf-8"


#: Reads one column's value at a position: its JSON text, and where the
#: next value begins.
Reader = Callable[[bytes, int], tuple[str, int]]


class Decoder:
    """Reads row images of tables, knowing each collation's character set
    (``charsets``: collation id -> codec) and which columns hold JSON
    (MariaDB logs those as text)."""

    def __init__(self, charsets: dict[int, str]) -> None:
        self.charsets = charsets

    def readers(self, columns: list[Column], json_columns: set[str]) -> list[Reader]:
        """A reader for each column: made once per table, used for every row."""
        return [self.reader(column, column.name in json_columns) for column in columns]

    @staticmethod
    def image(
        data: bytes, at: int, readers: list[Reader], present: list[int]
    ) -> tuple[list[str | None], int]:
        """One row image: the JSON text of each column's value (None for a
        column absent from it), and where the next image begins."""
        values: list[str | None] = [None] * len(readers)
        size = (len(present) + 7) // 8
        nulls = data[at : at + size]
        at += size
        for n, index in enumerate(present):
            if nulls[n >> 3] & (1 << (n & 7)):
                values[index] = "null"
            else:
                values[index], at = readers[index](data, at)
        return values, at

    def reader(self, column: Column, is_json: bool) -> Reader:  # noqa: C901 - one case a type
        kind = column.type
        fixed = _FIXED.get(kind)
        if fixed is not None:
            size, read = fixed
            return lambda data, at: (read(data[at : at + size], column), at + size)
        if kind in (ev.VARCHAR, ev.VAR_STRING, ev.STRING):
            width = 1 if column.meta < 256 else 2
            text = self.text(column, is_json)
            pad = column.meta if kind == ev.STRING and column.collation == BINARY else 0

            def string(data: bytes, at: int) -> tuple[str, int]:
                end = at + width + int.from_bytes(data[at : at + width], "little")
                raw = data[at + width : end]
                # BINARY(n) reads back padded.
                return text(raw.ljust(pad, b"\0") if pad else raw), end

            return string
        if kind in (ev.BLOB, ev.TINY_BLOB, ev.MEDIUM_BLOB, ev.LONG_BLOB, ev.GEOMETRY):
            width = column.meta
            text = _hex if kind == ev.GEOMETRY else self.text(column, is_json)

            def blob(data: bytes, at: int) -> tuple[str, int]:
                end = at + width + int.from_bytes(data[at : at + width], "little")
                return text(data[at + width : end]), end

            return blob
        if kind == ev.NEWDECIMAL:
            size = decimal_size(*column.meta)
            return lambda data, at: (decimal(data[at : at + size], *column.meta), at + size)
        if kind == ev.BIT:
            size = (column.meta + 7) // 8
            return lambda data, at: (str(int.from_bytes(data[at : at + size], "big")), at + size)
        if kind in (ev.ENUM, ev.SET):
            size = column.meta

            codec = self.charsets.get(column.collation or 0, "utf-8")
            names = [name.decode(codec, "replace") for name in column.values or []]

            def choice(data: bytes, at: int) -> tuple[str, int]:
                number = int.from_bytes(data[at : at + size], "little")
                return _quote(_choice(kind, number, names)), at + size

            return choice
        if kind in (ev.DATETIME2, ev.TIMESTAMP2, ev.TIME2):
            fsp = column.meta or 0
            return lambda data, at: _temporal(data, at, kind, fsp)
        raise ValueError(f"column {column.name!r}: binary log type {kind} is not supported")

    def text(self, column: Column, is_json: bool) -> Callable[[bytes], str]:
        """How a column's bytes become JSON: hex for binary ones, the text
        in its character set (embedded, for a JSON column)."""
        if column.collation == BINARY or column.collation is None and not is_json:
            return _hex
        codec = self.charsets.get(column.collation or 0, "utf-8")
        if codec == "cp1252":
            # MySQL's latin1 is Windows-1252 with its five undefined bytes
            # read as the code points of the same number.
            return lambda raw: _quote(raw.decode("latin-1").translate(_LATIN1))
        if is_json:
            return lambda raw: raw.decode(codec, "replace")  # checked valid by its constraint
        return lambda raw: _quote(raw.decode(codec, "replace"))


_LATIN1 = {
    byte: bytes([byte]).decode("cp1252")
    for byte in range(0x80, 0xA0)
    if byte not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)
}


def _hex(raw: bytes) -> str:
    return f'"{raw.hex().upper()}"'


def _choice(kind: int, number: int, names: list[str]) -> str:
    """An ENUM's value (by its number, from 1) or a SET's (a bit each)."""
    if kind == ev.ENUM:
        return names[number - 1] if 0 < number <= len(names) else ""
    return ",".join(name for i, name in enumerate(names) if number & (1 << i))


def _int(raw: bytes, column: Column) -> str:
    return str(int.from_bytes(raw, "little", signed=not column.unsigned))


def _float(raw: bytes, _: Column) -> str:
    (value,) = struct.unpack("<f", raw)
    # The shortest digits that read back as the same single-precision number.
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if struct.pack("<f", float(text)) == raw:
            return repr(float(text))
    return repr(value)


def _double(raw: bytes, _: Column) -> str:
    return repr(struct.unpack("<d", raw)[0])


def _year(raw: bytes, _: Column) -> str:
    return str(raw[0] + 1900 if raw[0] else 0)


def _date(raw: bytes, _: Column) -> str:
    value = int.from_bytes(raw, "little")
    return f'"{value >> 9:04d}-{value >> 5 & 15:02d}-{value & 31:02d}"'


def _datetime(raw: bytes, _: Column) -> str:
    # The old DATETIME: YYYYMMDDhhmmss as a number.
    d, t = divmod(int.from_bytes(raw, "little"), 1000000)
    day = f"{d // 10000:04d}-{d // 100 % 100:02d}-{d % 100:02d}"
    return f'"{day} {t // 10000:02d}:{t // 100 % 100:02d}:{t % 100:02d}"'


_FIXED: dict[int, tuple[int, Callable[[bytes, Column], str]]] = {
    ev.TINY: (1, _int),
    ev.SHORT: (2, _int),
    ev.INT24: (3, _int),
    ev.LONG: (4, _int),
    ev.LONGLONG: (8, _int),
    ev.FLOAT: (4, _float),
    ev.DOUBLE: (8, _double),
    ev.YEAR: (1, _year),
    ev.DATE: (3, _date),
    ev.NEWDATE: (3, _date),
    ev.DATETIME: (8, _datetime),
}

_DIGITS = [0, 1, 1, 2, 2, 3, 3, 4, 4, 4]


def decimal_size(precision: int, scale: int) -> int:
    whole = precision - scale
    return whole // 9 * 4 + _DIGITS[whole % 9] + scale // 9 * 4 + _DIGITS[scale % 9]


def decimal(raw: bytes, precision: int, scale: int) -> str:
    """A DECIMAL's digits from its binary form: groups of nine digits in
    four bytes, big-endian, the first bit the sign (set for positive);
    a negative number has every bit inverted."""
    data = bytearray(raw)
    negative = not data[0] & 0x80
    data[0] ^= 0x80
    if negative:
        data = bytearray(b ^ 0xFF for b in data)
    whole = precision - scale
    parts = []
    at = 0
    for count, size in ((whole % 9, _DIGITS[whole % 9]), *[(9, 4)] * (whole // 9)):
        if size:
            parts.append(str(int.from_bytes(data[at : at + size], "big")).zfill(count))
            at += size
    integer = "".join(parts).lstrip("0") or "0"
    fraction = []
    for count, size in (*[(9, 4)] * (scale // 9), (scale % 9, _DIGITS[scale % 9])):
        if size:
            fraction.append(str(int.from_bytes(data[at : at + size], "big")).zfill(count))
            at += size
    text = integer + ("." + "".join(fraction) if scale else "")
    return "-" + text if negative and text.strip("0.") else text


def _fraction(data: bytes, at: int, fsp: int) -> tuple[int, int]:
    """Microseconds, and where what follows begins."""
    size = (fsp + 1) // 2
    if not size:
        return 0, at
    value = int.from_bytes(data[at : at + size], "big")
    return value * 10 ** (6 - size * 2), at + size


def _temporal(data: bytes, at: int, kind: int, fsp: int) -> tuple[str, int]:
    if kind == ev.TIMESTAMP2:
        seconds = int.from_bytes(data[at : at + 4], "big")
        micros, end = _fraction(data, at + 4, fsp)
        if not seconds and not micros:
            return '"0000-00-00 00:00:00' + ("." + "0" * fsp if fsp else "") + '"', end
        import datetime as dt

        when = dt.datetime.fromtimestamp(seconds, dt.UTC).replace(tzinfo=None)
        return _stamp(when.strftime("%Y-%m-%d %H:%M:%S"), micros, fsp), end
    if kind == ev.DATETIME2:
        packed = int.from_bytes(data[at : at + 5], "big") - 0x8000000000
        micros, end = _fraction(data, at + 5, fsp)
        ymd, hms = packed >> 17, packed & 0x1FFFF
        year, month = divmod(ymd >> 5, 13)
        text = (
            f"{year:04d}-{month:02d}-{ymd & 31:02d} "
            f"{hms >> 12:02d}:{hms >> 6 & 63:02d}:{hms & 63:02d}"
        )
        return _stamp(text, micros, fsp), end
    return _time(data, at, fsp)


def _time(data: bytes, at: int, fsp: int) -> tuple[str, int]:
    """TIME2: three bytes of hours, minutes and seconds, then the fraction,
    as one signed number offset to be positive."""
    size = 3 + (fsp + 1) // 2
    packed = int.from_bytes(data[at : at + size], "big") - (0x800000 << (8 * (size - 3)))
    negative = packed < 0
    packed = abs(packed)
    frac_bits = 8 * (size - 3)
    hms, frac = packed >> frac_bits, packed & ((1 << frac_bits) - 1)
    micros = frac * 10 ** (6 - (size - 3) * 2) if frac_bits else 0
    text = f"{'-' if negative else ''}{hms >> 12 & 1023:02d}:{hms >> 6 & 63:02d}:{hms & 63:02d}"
    return _stamp(text, micros, fsp), at + size


def _stamp(text: str, micros: int, fsp: int) -> str:
    if fsp:
        text += "." + f"{micros:06d}"[:fsp]
    return f'"{text}"'
