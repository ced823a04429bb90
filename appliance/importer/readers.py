"""Reading records out of user files: JSON Lines, JSON arrays and CSV with named columns.

Streaming, so a 1 GB file costs the memory of its largest record, not its size.
Every record comes with where it was found (``file:line``), and every problem
with the file itself ends in one sentence naming the byte offset and line:
not UTF-8, UTF-16, binary, empty, cut off in the middle of a record (a
truncated export), nested too deeply. With ``salvage``, a file cut off in the
middle keeps the complete records before the cut, and the reader says how many.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import InvalidInput, NotFound

BLOCK = 1 << 20


@dataclass
class Raw:
    value: object
    where: str  # "file:line"


@dataclass
class Salvage:
    """Filled in when a cut-off file was salvaged."""

    cut_at_byte: int | None = None
    cut_at_line: int | None = None
    kept: int = 0


class BadRecord(Exception):
    """One record that cannot be parsed; the reader goes on with the next (JSON Lines only)."""

    def __init__(self, where: str, reason: str):
        super().__init__(reason)
        self.where, self.reason = where, reason


def kind_of(path: Path) -> str:
    """'jsonl', 'json' or 'csv', from the first bytes (and the extension for CSV)."""
    if not path.exists():
        raise NotFound(f"{path} does not exist; give the path of a JSONL, JSON or CSV file.")
    if path.is_dir():
        raise InvalidInput(f"{path} is a folder; give the path of a JSONL, JSON or CSV file.")
    with open(path, "rb") as f:
        head = f.read(65536)
    if not head:
        raise InvalidInput(f"{path} is empty; there is nothing to import.")
    if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        raise InvalidInput(f"{path} is UTF-16 text; convert it to UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`) and import again.")
    if b"\x00" in head:
        at = head.index(b"\x00")
        raise InvalidInput(f"{path} looks binary (a NUL byte at offset {at}); give a JSONL, JSON or CSV text file.")
    if path.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    text = head.lstrip(codecs.BOM_UTF8).lstrip()
    first = text[:1]
    # A .jsonl file whose first line is JSON but not an object (null, [], 7) holds a bad record there, rejected as
    # a record like any other; a .jsonl file holding a JSON array is still read as the array.
    record_line = path.suffix.lower() in (".jsonl", ".ndjson") and _whole_value(text.split(b"\n", 1)[0])
    if first == b"[" and not record_line:
        return "json"
    if first == b"{" or record_line:
        return "jsonl"
    raise InvalidInput(f"{path} is neither JSON Lines, a JSON array nor CSV (it starts with {first!r}); "
                       "give a .jsonl, .json or .csv file.")


def _whole_value(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def read(path: Path, salvage: bool = False, report: Salvage | None = None) -> Iterator[Raw | BadRecord]:
    """Yield Raw records (or BadRecord for a JSONL line that does not parse)."""
    kind = kind_of(path)
    report = report if report is not None else Salvage()
    if kind == "jsonl":
        yield from _jsonl(path, salvage, report)
    elif kind == "json":
        yield from _json_array(path, salvage, report)
    else:
        yield from _csv(path)


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line) over a file, a BOM stripped from the first line."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                offset += len(codecs.BOM_UTF8)
                line = line[len(codecs.BOM_UTF8):]
            yield lineno, offset, line
            offset += len(line)


def _decode(path: Path, lineno: int, offset: int, line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{path}:{lineno}: byte {offset + e.start} is not UTF-8; convert the file to UTF-8 "
                           "(e.g. `iconv -f latin1 -t UTF-8`) and import again.") from None


def _jsonl(path: Path, salvage: bool, report: Salvage) -> Iterator[Raw | BadRecord]:
    for lineno, offset, line in _lines(path):
        text = _decode(path, lineno, offset, line)
        if not text.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            value = json.loads(text)
        except RecursionError:
            yield BadRecord(where, "nested too deeply to be a record")
            continue
        except json.JSONDecodeError as e:
            if not text.endswith("\n"):  # the last line, without its newline: the file was cut off here
                if salvage:
                    report.cut_at_byte, report.cut_at_line = offset, lineno
                    return
                raise InvalidInput(f"{path}:{lineno}: the file is cut off in the middle of a record at byte "
                                   f"{offset + len(text[:e.pos].encode())}; import the complete records before it "
                                   "with --salvage, or copy the file again.") from None
            yield BadRecord(where, f"not valid JSON ({e.msg}, column {e.colno})")
            continue
        report.kept += 1
        yield Raw(value, where)


class _TextBuffer:
    """Decoded text of a file, read on demand, with the byte offset and line number of the read position."""

    _WS = re.compile(r"[ \t\r\n]*")

    def __init__(self, f, path: Path):
        self.f, self.path = f, path
        self.inc = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos = "", 0
        self.byte, self.line = 0, 1  # of self.pos
        self.raw_seen, self.eof, self.block = 0, False, BLOCK

    def read_more(self, grow: bool = False) -> bool:
        if self.eof:
            return False
        if grow:
            self.block = min(self.block * 2, 1 << 28)  # one big record: read more, growing geometrically
        data = self.f.read(self.block)
        if not data:
            self.eof = True
            self.text += self.inc.decode(b"", final=True)
            return False
        if self.raw_seen == 0 and data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8):]
            self.byte = len(codecs.BOM_UTF8)
        try:
            self.text += self.inc.decode(data)
        except UnicodeDecodeError as e:
            raise InvalidInput(f"{self.path}: byte {self.raw_seen + e.start} is not UTF-8; convert the file to "
                               "UTF-8 and import again.") from None
        self.raw_seen += len(data)
        return True

    def advance(self, n: int) -> None:
        segment = self.text[self.pos:self.pos + n]
        self.byte += len(segment.encode("utf-8"))
        self.line += segment.count("\n")
        self.pos += n
        if self.pos > BLOCK:  # drop what was read, rarely, so a buffer of many small records stays linear
            self.text, self.pos = self.text[self.pos:], 0

    def skip_ws(self) -> None:
        while True:
            self.advance(self._WS.match(self.text, self.pos).end() - self.pos)
            if self.pos < len(self.text) or not self.read_more():
                return

    def at_end(self) -> bool:
        return self.pos >= len(self.text) and not self.read_more()

    def peek(self) -> str:
        return self.text[self.pos]


def _json_array(path: Path, salvage: bool, report: Salvage) -> Iterator[Raw]:
    """Stream the elements of a top-level JSON array without loading the file."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        buf = _TextBuffer(f, path)

        def cut(message: str, byte: int, line: int) -> None:
            if salvage:
                report.cut_at_byte, report.cut_at_line = byte, line
                return
            raise InvalidInput(f"{path}:{line}: {message} at byte {byte}; import the complete records before it "
                               "with --salvage, or fix the file.")

        buf.skip_ws()
        if buf.at_end() or buf.peek() != "[":
            raise InvalidInput(f"{path} does not start with '['; a JSON file must hold an array of records.")
        buf.advance(1)
        first = True
        while True:
            buf.skip_ws()
            if buf.at_end():
                return cut("the array is cut off (no closing ']')", buf.byte, buf.line)
            if buf.peek() == "]":
                buf.advance(1)
                break
            if not first:
                if buf.peek() != ",":
                    return cut(f"expected ',' or ']' but found {buf.peek()!r}", buf.byte, buf.line)
                buf.advance(1)
                buf.skip_ws()
                if buf.at_end():
                    return cut("the array is cut off after a ','", buf.byte, buf.line)
            while True:
                try:
                    value, end = decoder.raw_decode(buf.text, buf.pos)
                    break
                except RecursionError:
                    return cut("a record is nested too deeply", buf.byte, buf.line)
                except json.JSONDecodeError as e:
                    truncated = e.msg.startswith("Unterminated string") or e.pos >= len(buf.text) - 1
                    if truncated and buf.read_more(grow=True):
                        continue
                    if truncated:
                        return cut("the file is cut off in the middle of a record", buf.byte, buf.line)
                    at = buf.byte + len(buf.text[buf.pos:e.pos].encode("utf-8"))
                    return cut(f"invalid JSON ({e.msg})", at, e.lineno + buf.line - buf.text.count("\n", 0, buf.pos) - 1)
            report.kept += 1
            yield Raw(value, f"{path}:{buf.line}")
            buf.advance(end - buf.pos)
            first = False
        buf.skip_ws()
        if not buf.at_end():
            raise InvalidInput(f"{path}:{buf.line}: unexpected data after the closing ']' at byte {buf.byte}.")


def _csv(path: Path) -> Iterator[Raw]:
    csv.field_size_limit(1 << 30)

    def text_lines() -> Iterator[str]:
        for lineno, offset, line in _lines(path):
            yield _decode(path, lineno, offset, line)

    reader = csv.DictReader(text_lines())
    if not reader.fieldnames:
        raise InvalidInput(f"{path} has no header row; a CSV file needs named columns (e.g. instruction,output).")
    try:
        for row in reader:
            if None in row:
                raise InvalidInput(f"{path}:{reader.line_num}: the row has more fields than the header names.")
            yield Raw({k: v for k, v in row.items() if k is not None}, f"{path}:{reader.line_num}")
    except csv.Error as e:
        raise InvalidInput(f"{path}:{reader.line_num}: not valid CSV ({e}).") from None
