"""The user's data files read as UTF-8: JSONL lines, CSV/TSV rows and plain text, each with its ``file:line``.

A byte-order mark (Excel writes one before every "CSV UTF-8" file) is ignored. A row holding bytes that are not
UTF-8 becomes a :class:`BadRow` (``file:line: reason``), which the data modules skip and report; the other rows
are kept. A file that is not UTF-8 as a whole (UTF-16, or Latin-1 in most rows) stops with a
:class:`NotUtf8Error` that names it and says how to convert it, instead of one report per row.

Files are opened with ``errors="surrogateescape"``: an undecodable byte ``0xNN`` becomes the lone surrogate
``U+DCNN``, which valid UTF-8 never decodes to (and which cannot be encoded back). So rows stream in one pass,
as before, and a row is checked on its own text only: an O(1) test for an ASCII row, a re-encode otherwise.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lightning.pytorch.utilities import rank_zero_warn

#: Most bad rows a warning or error lists one by one (it always gives the count).
SHOWN_BAD_ROWS = 10

_HEAD_BYTES = 4096  # looked at for a UTF-16 byte-order mark or NUL bytes before streaming


class NotUtf8Error(ValueError):
    """A file that is not UTF-8 text as a whole (UTF-16, Latin-1, Windows-1252, ...)."""


@dataclass(frozen=True)
class BadRow:
    """A row that is not a usable example: ``location`` is ``file:line`` (or ``dataset/split row i``).

    Example:
        >>> str(BadRow("train.csv:3", "'response' is empty"))
        "train.csv:3: 'response' is empty"
    """

    location: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


def utf8_hint(path: str | Path) -> str:
    """How to make ``path`` UTF-8: the end of every error and warning about its encoding.

    Example:
        >>> print(utf8_hint("data/train.csv"))
        HINT: save it as UTF-8 (Excel: Save As > 'CSV UTF-8'; an editor: encoding UTF-8), or convert it:
        `iconv -f WINDOWS-1252 -t UTF-8 train.csv > utf8-train.csv`
    """
    name = Path(path).name
    return (f"HINT: save it as UTF-8 (Excel: Save As > 'CSV UTF-8'; an editor: encoding UTF-8), or convert it: "
            f"`iconv -f WINDOWS-1252 -t UTF-8 {name} > utf8-{name}`")


def open_utf8(path: str | Path, newline: str | None = None, errors: str = "surrogateescape") -> IO[str]:
    """``path`` opened as UTF-8 text: a byte-order mark is skipped and an undecodable byte read as a lone
    surrogate (see :func:`not_utf8`); a UTF-16 file, or one with NUL bytes, raises :class:`NotUtf8Error` at once.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "excel.csv")
        >>> _ = open(path, "w", encoding="utf-8-sig").write("prompt,response\\n")
        >>> with open_utf8(path) as handle:
        ...     handle.read()
        'prompt,response\\n'
    """
    raw = open(path, "rb")
    head = raw.read(_HEAD_BYTES)
    # Mostly ASCII UTF-16 decodes as "valid" UTF-8 with a NUL after every letter: caught here, not row by row.
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        problem = "it is UTF-16 (it starts with a UTF-16 byte-order mark)"
    elif b"\0" in head:
        problem = "it holds NUL bytes (UTF-16 without a byte-order mark, or not a text file)"
    else:
        raw.seek(0)
        return io.TextIOWrapper(raw, encoding="utf-8-sig", errors=errors, newline=newline)
    raw.close()
    raise NotUtf8Error(f"{path} is not UTF-8 text: {problem}. {utf8_hint(path)}")


def _escaped(text: str) -> tuple[int, int] | None:
    """(byte, character index) of the first undecodable byte in ``text``, or None."""
    if text.isascii():  # O(1)
        return None
    try:
        text.encode("utf-8")  # fails exactly at a lone surrogate; 5x faster than a regex search
    except UnicodeEncodeError as error:
        return ord(text[error.start]) - 0xDC00, error.start
    return None


def not_utf8(text: str) -> str | None:
    """Why a line read by :func:`open_utf8` is not UTF-8 (its first bad byte and column), or None when it is.

    Example:
        >>> not_utf8("caf\\xe9"), not_utf8(b"caf\\xe9".decode("utf-8", "surrogateescape"))
        (None, 'not UTF-8: byte 0xE9 at column 4')
    """
    found = _escaped(text)
    return None if found is None else f"not UTF-8: byte 0x{found[0]:02X} at column {found[1] + 1}"


def not_utf8_cells(cells: Sequence[str], header: Sequence[str]) -> str | None:
    """Why a CSV row read by :func:`open_utf8` is not UTF-8 (its first bad field), or None when it is.

    Example:
        >>> not_utf8_cells(["ok", b"caf\\xe9".decode("utf-8", "surrogateescape")], ["prompt", "response"])
        "not UTF-8: byte 0xE9 at character 4 of 'response'"
    """
    if _escaped("".join(cells)) is None:  # one test per row, not one per cell
        return None
    for index, cell in enumerate(cells):
        found = _escaped(cell)
        if found is not None:
            name = repr(header[index]) if index < len(header) else f"cell {index + 1}"
            return f"not UTF-8: byte 0x{found[0]:02X} at character {found[1] + 1} of {name}"
    return None


class Utf8Tally:
    """The rows of one file and those that are not UTF-8: :meth:`check` raises when most are not (the file is in
    another encoding), :meth:`warn_skipped` lists the few that are skipped.

    Example:
        >>> tally = Utf8Tally("a.csv")
        >>> tally.rows = 2  # a good row and a bad one
        >>> tally.add("a.csv:3", "not UTF-8: byte 0xE9 at column 4")
        BadRow(location='a.csv:3', reason='not UTF-8: byte 0xE9 at column 4')
        >>> tally.check()  # 1 of 2: skipped, not an error
        >>> tally.rows += 1; _ = tally.add("a.csv:4", "not UTF-8: byte 0xFC at column 1"); tally.check()
        Traceback (most recent call last):
        lit_lowrank.data.user_files.NotUtf8Error: a.csv is not UTF-8 text: 2 of 3 rows hold bytes ...
    """

    def __init__(self, path: str | Path, unit: str = "rows") -> None:
        self.path, self.unit, self.rows = path, unit, 0
        self.bad: list[BadRow] = []

    def add(self, location: str, reason: str) -> BadRow:
        """The :class:`BadRow` of a row that is not UTF-8 (counted in ``rows`` by the caller, like every row)."""
        self.bad.append(BadRow(location, reason))
        return self.bad[-1]

    def check(self) -> None:
        """Raise :class:`NotUtf8Error` when more than half of the rows are not UTF-8 (all of them, for one row)."""
        if len(self.bad) * 2 > self.rows:
            raise NotUtf8Error(f"{self.path} is not UTF-8 text: {len(self.bad)} of {self.rows} {self.unit} hold "
                               f"bytes that are not UTF-8 (first: {self.bad[0]}), so it was saved in another "
                               f"encoding, probably Windows-1252/Latin-1. {utf8_hint(self.path)}")

    def warn_skipped(self) -> None:
        """Warn once, listing the rows that are not UTF-8 as ``file:line: reason`` (nothing when there are none)."""
        if self.bad:
            rank_zero_warn(f"{len(self.bad)} of {self.rows} {self.unit} of {self.path} are skipped:{listing(self.bad)}"
                           f"\n{utf8_hint(self.path)}")


def listing(bad: Sequence[BadRow]) -> str:
    """The first :data:`SHOWN_BAD_ROWS` as ``file:line: reason`` lines, then how many more."""
    shown = "".join(f"\n  {b}" for b in bad[:SHOWN_BAD_ROWS])
    return shown + (f"\n  ... and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else "")


def jsonl_lines(path: str | Path, tally: Utf8Tally) -> Iterator[tuple[int, str | BadRow]]:
    """``(line number, text)`` of every non-blank line; a line that is not UTF-8 comes as a :class:`BadRow`."""
    with open_utf8(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            tally.rows += 1
            reason = not_utf8(line)
            yield number, tally.add(f"{path}:{number}", reason) if reason else line
    tally.check()


def csv_rows(path: str | Path, tally: Utf8Tally) -> Iterator[tuple[int, list[str] | BadRow]]:
    """``(line number, cells)`` of the header, then of every non-blank row (its first line: a quoted cell may span
    several); a row that is not UTF-8 comes as a :class:`BadRow`. ``.tsv`` files are tab-separated."""
    with open_utf8(path, newline="") as handle:
        reader = csv.reader(handle, delimiter="\t" if Path(path).suffix.lower() == ".tsv" else ",")
        header = next(reader, [])
        reason = not_utf8_cells(header, [])
        if reason:
            raise NotUtf8Error(f"{path}:1: the header row is {reason}. {utf8_hint(path)}")
        yield 1, header
        start = reader.line_num + 1
        for cells in reader:
            number, start = start, reader.line_num + 1
            if not cells:
                continue
            tally.rows += 1
            reason = not_utf8_cells(cells, header)
            yield number, tally.add(f"{path}:{number}", reason) if reason else cells
    tally.check()


def read_utf8_text(path: str | Path) -> tuple[str, list[BadRow]]:
    """The text of a file, without the lines that are not UTF-8, and those lines as :class:`BadRow`.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> _ = open(path, "wb").write(b"\\xef\\xbb\\xbfone\\ntw\\xf6\\nthree\\n")
        >>> text, bad = read_utf8_text(path)
        >>> text, [b.reason for b in bad]
        ('one\\nthree\\n', ['not UTF-8: byte 0xF6 at column 3'])
    """
    with open_utf8(path, errors="strict") as handle:
        try:
            return handle.read(), []
        except UnicodeDecodeError:
            pass  # searching a whole corpus for escaped bytes costs more than reading the rare damaged file twice
    with open_utf8(path) as handle:
        text = handle.read()
    tally, kept = Utf8Tally(path, "lines"), []
    for number, line in enumerate(text.split("\n"), 1):
        tally.rows += bool(line.strip())
        reason = not_utf8(line)
        if reason:
            tally.add(f"{path}:{number}", reason)
        else:
            kept.append(line)
    tally.check()
    return "\n".join(kept), tally.bad
