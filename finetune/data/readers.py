"""Reading rows from local files (with file:line locations) or the hub. Unparseable rows become RowErrors."""

from __future__ import annotations

import codecs
import csv
import io
import json
import lzma
import zlib
from pathlib import Path
from typing import Any, Iterator

from finetune.errors import UserError
from finetune.recipe import DataSource, looks_local


class DataError(UserError):
    """One bad row or file: the message starts with `file:line` and names the field."""


class RowError(DataError):
    """A single row is bad; with data.on_bad_row: skip it is counted and skipped instead of fatal."""

    def __init__(self, loc: str, problem: str):
        self.loc, self.problem = loc, problem
        super().__init__(f"{loc}: {problem}")


ROW_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
"""File types we read rows from; json/jsonl/csv may also be compressed (data.jsonl.gz, .bz2, .xz)."""


def compression(path: Path) -> str | None:
    """The compression of `data.jsonl.gz` & co. by suffix, as fsspec names it (None: not compressed).

    fsspec is the layer `datasets` itself opens compressed data files through; reading the rows ourselves
    (rather than `load_dataset("json", ...)`) keeps file:line in every error and per-row on_bad_row: skip,
    which an Arrow table built from the whole file cannot give. A .zip is an archive of files, not rows."""
    from fsspec.utils import compressions

    proto = compressions.get(path.suffix.lower().lstrip("."))
    return None if proto == "zip" else proto


def row_suffix(path: Path) -> str:
    """.jsonl for both data.jsonl and data.jsonl.gz."""
    return Path(path.stem).suffix.lower() if compression(path) else path.suffix.lower()


def source_files(src: DataSource) -> list[Path]:
    p = Path(src.path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if row_suffix(f) in ROW_SUFFIXES
                       and not (compression(f) and row_suffix(f) == ".parquet"))
        if not files:
            raise DataError(f"{p}: directory has no .json/.jsonl/.csv/.parquet files (json/jsonl/csv may be .gz)")
        return files
    return [p]


def read_records(src: DataSource) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) for every row of a source. Unparseable rows raise DataError."""
    if not looks_local(src.path):
        yield from _read_hub(src)
        return
    for path in source_files(src):
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty (add rows, or remove it from data.train)")
        suffix, comp = row_suffix(path), compression(path)
        if suffix == ".jsonl":
            yield from _read_jsonl(path, comp)
        elif suffix == ".json":
            yield from _read_json(path, comp)
        elif suffix == ".csv":
            yield from _read_csv(path, comp)
        elif suffix == ".parquet" and not comp:
            yield from _read_parquet(path)
        elif suffix == ".parquet":
            raise DataError(f"{path}: a compressed parquet file; parquet compresses inside the file, "
                            f"so decompress it and use the .parquet")
        else:
            kind = Path(path.stem).suffix + path.suffix if comp else path.suffix
            raise DataError(f"{path}: unsupported file type {kind or path.name!r} "
                            "(use .jsonl, .json, .csv or .parquet; the first three may be compressed, e.g. .jsonl.gz)")


# What a corrupt or truncated .gz/.bz2/.xz raises while it is read (gzip: BadGzipFile is an OSError, a cut-off
# stream EOFError, damaged data zlib.error; bz2: OSError; xz: LZMAError).
_UNREADABLE = (OSError, EOFError, zlib.error, lzma.LZMAError)


def _unreadable(path: Path, comp: str | None, e: Exception) -> DataError:
    what = f"a readable {comp} file" if comp else "readable"
    why = (str(e).splitlines() or [""])[0]
    return DataError(f"{path}: not {what} ({e.__class__.__name__}: {why}); re-create the file, "
                     "or decompress it and point data.train at the result")


def _lines(path: Path, comp: str | None):
    """The file's raw lines (b"...\\n"), decompressed when the suffix says so."""
    try:
        if comp is None:
            with open(path, "rb") as f:
                yield from f
        else:
            import fsspec

            with fsspec.open(str(path), "rb", compression=comp) as f:
                yield from f
    except _UNREADABLE as e:
        raise _unreadable(path, comp, e) from None


def _read_bytes(path: Path, comp: str | None) -> bytes:
    return path.read_bytes() if comp is None else b"".join(_lines(path, comp))


def _decode(path: Path, raw: bytes, lineno: int | None = None) -> str:
    """UTF-8, with the byte-order mark that Windows editors and Excel write at the start dropped."""
    if lineno in (None, 1) and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if lineno is None:
            lineno = raw[: e.start].count(b"\n") + 1
        utf16 = " (it looks like UTF-16)" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else ""
        raise DataError(f"{path}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x}){utf16}; "
                        "re-save the file as UTF-8") from None


def _read_jsonl(path: Path, comp: str | None = None):
    # Binary lines end at b"\n" only, so a CRLF file keeps its line numbers (strip() drops the "\r").
    for lineno, raw in enumerate(_lines(path, comp), 1):
        line = _decode(path, raw, lineno).strip()
        if not line:
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            # Yielded, not raised: a generator that raises is finished, and on_bad_row: skip must go on.
            yield f"{path}:{lineno}", RowError(f"{path}:{lineno}", f"invalid JSON: {e.msg} at column {e.colno}")


def _read_json(path: Path, comp: str | None = None):
    text = _decode(path, _read_bytes(path, comp))
    dec = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text):
        raise DataError(f"{path}: file is empty")
    if text[i] != "[":
        # A single object, or JSON Lines saved with a .json suffix.
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
        if _skip_ws(text, end) < len(text):
            yield from _read_jsonl(path, comp)
            return
        rows = obj.get("data") if isinstance(obj, dict) and isinstance(obj.get("data"), list) else None
        if rows is None:
            raise DataError(f"{path}:1: expected a JSON array of rows (or JSON Lines)")
        for k, r in enumerate(rows):
            yield f"{path}:row {k}", r
        return
    i = _skip_ws(text, i + 1)
    while i < len(text) and text[i] != "]":
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            # Inside one JSON array there is no way to resynchronise, so this is fatal even with skip.
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
        yield f"{path}:{line}", obj
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif i < len(text) and text[i] != "]":
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: invalid JSON: expected ',' or ']'")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_csv(path: Path, comp: str | None = None):
    text = _decode(path, _read_bytes(path, comp))
    # newline="" as the csv module asks: \r\n, \r and \n end a record, and line breaks inside quoted
    # fields stay as they are (str.splitlines would also split on \u2028, \x0c and friends).
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for rec in reader:
        yield f"{path}:{reader.line_num}", {k: v for k, v in rec.items() if k is not None}


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: file has no rows")
    for k, rec in enumerate(table.to_pylist()):
        yield f"{path}:row {k}", rec


def _read_hub(src: DataSource):
    import datasets

    try:
        ds = datasets.load_dataset(src.path, split=src.split)
    except Exception as e:  # network errors, missing datasets and bad splits all surface differently
        raise DataError(f"data.train: cannot load hub dataset {src.path!r} split {src.split!r}: "
                        f"{str(e).splitlines()[0]} (offline? use a local file)") from None
    for k, rec in enumerate(ds):
        yield f"{src.path}[{src.split}]#{k}", rec
