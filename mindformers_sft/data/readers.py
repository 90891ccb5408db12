"""Streaming readers for raw SFT data: JSON (top-level array), JSON Lines, Parquet and CSV.

Input is one file, a glob, a directory (its data files, sorted, non-recursive) or a comma-separated list of
those. Every reader yields ``(Location, record_dict)`` for a good record and ``(Location, RecordError)`` for
a record that cannot be read (broken JSON, non-UTF-8 bytes, not an object), then goes on: nothing is lost
silently, and the location names the file, the 0-based record index and the (approximate, for JSON arrays
exact to the record's first line) 1-based line.

A JSON array file is parsed incrementally with ``json.JSONDecoder.raw_decode`` over a sliding text window,
so a file of a million records is never loaded whole. After a broken record the parser re-synchronises on
the next line that opens an object at the indentation of the previous records (or the next ``, {`` for
single-line files), rejecting the skipped text with its line. A ``.json`` file whose first character is
``{`` holds concatenated objects (JSON Lines or pretty-printed objects one after another).
"""
from __future__ import annotations

import codecs
import csv
import glob
import json
import os
import re
from typing import Iterator, List, Tuple, Union

from ..errors import DataError
from .formats import Location, RecordError

EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}

_SURROGATE = re.compile("[\udc80-\udcff]")
_WS = " \t\n\r"
CHUNK_CHARS = 1 << 20
MAX_RECORD_CHARS = 1 << 28

Item = Tuple[Location, Union[dict, RecordError]]


def resolve_files(spec) -> List[str]:
    """The data files named by `spec`: a path, a glob, a directory, or a comma-separated list / list of them."""
    if isinstance(spec, (list, tuple)):
        parts = [str(s) for s in spec]
    else:
        spec = str(spec or "").strip()
        if not spec:
            raise DataError("no input data given (an empty path)")
        parts = [spec] if os.path.exists(spec) else [p.strip() for p in spec.split(",") if p.strip()]
    files: List[str] = []
    for part in parts:
        if os.path.isdir(part):
            found = sorted(os.path.join(part, f) for f in os.listdir(part)
                           if os.path.splitext(f)[1].lower() in EXTENSIONS and os.path.isfile(os.path.join(part, f)))
            if not found:
                raise DataError(f"{part}: directory holds no data file ({', '.join(sorted(EXTENSIONS))})")
            files += found
        elif os.path.isfile(part):
            files.append(part)
        else:
            found = sorted(f for f in glob.glob(part, recursive=True) if os.path.isfile(f))
            if not found:
                raise DataError(f"{part}: no such file, directory or matching glob")
            files += found
    seen, out = set(), []
    for f in files:
        if f not in seen:
            seen.add(f)
            out.append(f)
    return out


def file_kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise DataError(f"{path}: unknown data file type {ext!r}; expected one of {', '.join(sorted(EXTENSIONS))}")
    return EXTENSIONS[ext]


def read_file(path: str) -> Iterator[Item]:
    """Records of one file, by its extension."""
    kind = file_kind(path)
    return {"json": read_json, "jsonl": read_jsonl, "parquet": read_parquet, "csv": read_csv}[kind](path)


def read_files(spec) -> Iterator[Item]:
    for path in resolve_files(spec):
        yield from read_file(path)


# -- JSON Lines -------------------------------------------------------------------------------------------------

def read_jsonl(path: str) -> Iterator[Item]:
    decode = json.JSONDecoder().decode
    index = 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            loc = Location(path, index, lineno)
            index += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield loc, RecordError(f"invalid UTF-8 byte 0x{raw[e.start]:02x} at column {e.start + 1}")
                continue
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            try:
                obj = decode(text)
            except json.JSONDecodeError as e:
                yield loc, RecordError(f"malformed JSON at column {e.colno}: {e.msg}")
                continue
            if not isinstance(obj, dict):
                yield loc, RecordError(f"a record must be a JSON object, found {type(obj).__name__}")
                continue
            yield loc, obj


# -- JSON (streamed array) --------------------------------------------------------------------------------------

class _Window:
    """A sliding window of decoded text over a file, with the line number of its start."""

    def __init__(self, path: str, chunk: int):
        self.path = path
        try:
            self.f = open(path, "rb")
        except OSError as e:
            raise DataError(f"{path}: cannot open ({e.strerror})") from None
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.chunk = chunk
        self.buf = ""
        self.eof = False
        self.base_line = 1       # line number of buf[0]
        self.counted = 0         # buf[:counted] newlines are included in `line_at_counted`
        self.line_at_counted = 1

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(self.chunk)
        if not data:
            self.eof = True
            self.buf += self.dec.decode(b"", final=True)
            self.f.close()
            return False
        self.buf += self.dec.decode(data)
        return True

    def line(self, pos: int) -> int:
        if pos >= self.counted:
            self.line_at_counted += self.buf.count("\n", self.counted, pos)
        else:
            self.line_at_counted -= self.buf.count("\n", pos, self.counted)
        self.counted = pos
        return self.line_at_counted

    def drop(self, pos: int):
        """Forget buf[:pos]."""
        if pos <= 0:
            return
        self.line(pos)
        self.buf = self.buf[pos:]
        self.counted = 0

    def compact(self, pos: int) -> int:
        """Forget consumed text once it is large; returns pos in the new buffer."""
        if pos > self.chunk and pos * 2 > len(self.buf):
            self.drop(pos)
            return 0
        return pos

    def skip_ws(self, pos: int) -> int:
        while True:
            n = len(self.buf)
            while pos < n and self.buf[pos] in _WS:
                pos += 1
            if pos < n or not self.more():
                return pos

    def close(self):
        if not self.f.closed:
            self.f.close()


def _record_indent(buf: str, pos: int):
    """Leading whitespace of the line holding buf[pos] when only whitespace precedes pos on that line."""
    start = buf.rfind("\n", 0, pos) + 1
    prefix = buf[start:pos]
    return prefix if prefix.strip(_WS) == "" else None


def read_json(path: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[Item]:
    """Records of a JSON file: a top-level array of objects, or objects one after another (JSON Lines)."""
    w = _Window(path, chunk_chars)
    decoder = json.JSONDecoder()
    try:
        w.more()
        if w.buf.startswith("\ufeff"):
            w.buf = w.buf[1:]
        pos = w.skip_ws(0)
        if pos >= len(w.buf):
            return                                              # empty file: no records
        head = w.buf[pos]
        if head not in "[{":
            raise DataError(f"{path}:{w.line(pos)}: expected a JSON array of records ('[') or JSON objects "
                            f"('{{'), found {head!r}")
        array = head == "["
        if array:
            pos += 1
        index, indent, need_sep, learned = 0, None, False, False
        while True:
            pos = w.skip_ws(pos)
            if pos >= len(w.buf):
                if array:
                    yield Location(path, index, w.line(pos)), RecordError(
                        "the JSON array is not closed (the file ends without ']'); the file may be truncated")
                return
            c = w.buf[pos]
            if array and c == "]":
                end = w.skip_ws(pos + 1)
                if end < len(w.buf):
                    yield Location(path, index, w.line(end)), RecordError(
                        "extra data after the closing ']' of the JSON array")
                return
            if need_sep:
                need_sep = False
                if array and c == ",":
                    pos += 1
                    continue
                if c == "{":                                 # a missing ',' only: keep the record
                    if array:
                        yield Location(path, index, w.line(pos)), RecordError(
                            "missing ',' before this record (the record itself is read)", warning=True)
                    continue
                yield Location(path, index, w.line(pos)), RecordError(
                    "expected " + ("',' or ']'" if array else "'{'") + f" after the previous record, found {c!r}")
                pos = _find_next_start(w, pos, indent, array)
                if pos is None:
                    return
                continue
            if not learned:
                indent, learned = _record_indent(w.buf, pos), True
            loc = Location(path, index, w.line(pos))
            index += 1
            obj, end, err = _decode_one(w, decoder, pos)
            if err is not None:
                yield loc, RecordError(err)
                pos = _find_next_start(w, pos + 1, indent, array)
                if pos is None:
                    return
                continue
            bad = _SURROGATE.search(w.buf, pos, end)
            if bad is not None:
                yield loc, RecordError(f"invalid UTF-8 bytes at line {w.line(bad.start())}")
            elif not isinstance(obj, dict):
                yield loc, RecordError(f"a record must be a JSON object, found {type(obj).__name__}")
            else:
                yield loc, obj
            pos, need_sep = w.compact(end), True
    finally:
        w.close()


def _decode_one(w: _Window, decoder, start: int):
    """Decode the JSON value at w.buf[start], reading more text while it may be incomplete.

    Returns (obj, end, None), or (None, None, reason) for malformed JSON."""
    while True:
        try:
            obj, end = decoder.raw_decode(w.buf, start)
        except json.JSONDecodeError as e:
            incomplete = e.msg.startswith("Unterminated string") or e.pos >= len(w.buf) - 64
            if incomplete and not w.eof and len(w.buf) - start < MAX_RECORD_CHARS:
                w.more()
                continue
            line = w.line(min(e.pos, len(w.buf)))
            col = e.pos - w.buf.rfind("\n", 0, e.pos)
            return None, None, f"malformed JSON at line {line} column {col}: {e.msg}"
        if end >= len(w.buf) and not w.eof and not isinstance(obj, (dict, list, str)):
            w.more()                                            # a number or literal may go on in the next chunk
            continue
        return obj, end, None


def _find_next_start(w: _Window, pos: int, indent, array: bool):
    """Position of the next record's '{' at or after pos (reading on as needed), or None at the end of the file.

    Records are recognised by the indentation the first record had (pretty-printed or one-per-line files);
    otherwise by a ',' (array) or a newline (concatenated objects) before the '{'."""
    if indent is not None:
        # any value at the records' indentation starts a record (a non-object one is then rejected, not skipped)
        pat, off = re.compile("\n" + re.escape(indent) + r"[-{\[\"0-9ntf]"), len(indent) + 1
    else:
        pat, off = re.compile(r",[ \t\r\n]*\{" if array else r"\n[ \t\r]*\{"), None
    while True:
        m = pat.search(w.buf, pos)
        if m is not None:
            return m.start() + off if off is not None else m.end() - 1
        keep = max(pos, len(w.buf) - 4096)
        w.drop(keep)
        pos = 0
        if not w.more():
            m = pat.search(w.buf, pos)
            return None if m is None else (m.start() + off if off is not None else m.end() - 1)


# -- Parquet / CSV ----------------------------------------------------------------------------------------------

def read_parquet(path: str, batch_size: int = 1024) -> Iterator[Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:                                    # pyarrow raises ArrowInvalid / OSError
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    index = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield Location(path, index, None), row
            index += 1


def read_csv(path: str) -> Iterator[Item]:
    try:
        f = open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        reader = csv.DictReader(f)
        index = 0
        try:
            if reader.fieldnames is None:                      # reads the header line
                return
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV header ({e})") from None
        line = reader.line_num + 1
        try:
            for row in reader:
                loc = Location(path, index, line)
                index += 1
                line = reader.line_num + 1
                if None in row:
                    yield loc, RecordError(f"more fields than the {len(reader.fieldnames)} header columns")
                    continue
                if any(_SURROGATE.search(v) for v in row.values() if isinstance(v, str)):
                    yield loc, RecordError("invalid UTF-8 bytes")
                    continue
                yield loc, {k: v for k, v in row.items() if v is not None}
        except csv.Error as e:
            yield Location(path, index, reader.line_num), RecordError(f"malformed CSV: {e}")
