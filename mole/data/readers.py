"""Readers for every supported ``data.source``: each yields raw records tagged with where they came from.

A record is ``(origin, mapping)`` where origin is ``"file:line"`` (or ``"file[row i]"`` for formats without
lines) so that a bad row can always be reported with its file and line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Record = tuple[str, dict[str, Any]]
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """Input data is unusable; the message names the file, line, field or value."""


def read_text_utf8(path: Path) -> str:
    """Decode a file as strict UTF-8 (a leading byte-order mark dropped), naming the offset and line of a bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {exc.start} (line {line}): "
            f"byte 0x{raw[exc.start]:02x}; re-encode the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> Iterator[Record]:
    text = read_text_utf8(path)
    # Lines end at "\n" only: str.splitlines() also splits at U+2028, U+2029, U+0085 and other characters that a
    # JSON string may hold raw (json.dumps(ensure_ascii=False) writes them so), which would cut a row in two.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON at column {exc.colno}: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        yield f"{path}:{lineno}", obj


def _read_json(path: Path) -> Iterator[Record]:
    try:
        obj = json.loads(read_text_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON at column {exc.colno}: {exc.msg}") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of objects or an object holding exactly one array")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(obj).__name__}")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{path}[item {i}]: expected a JSON object, got {type(item).__name__}")
        yield f"{path}[item {i}]", item


def _read_csv(path: Path) -> Iterator[Record]:
    # A missing cell reads as None (a missing value, reported by cleaning), never as an empty string.
    reader = csv.DictReader(io.StringIO(read_text_utf8(path), newline=""), restval=None)
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more cells than the header's {len(reader.fieldnames)}")
            yield f"{path}:{reader.line_num}", dict(row)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as parquet: {exc}") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}[row {i}]", row


def _read_txt_dir(root: Path) -> Iterator[Record]:
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"{root}: directory holds no .txt files")
    for path in files:
        row: dict[str, Any] = {"text": read_text_utf8(path)}
        if path.parent != root:  # sub-directories name the domain: root/<domain>/doc.txt
            row["domain"] = path.parent.relative_to(root).parts[0]
        yield f"{path}", row


def _read_hf(name: str, split: str) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (offline, missing split, bad builder)
        raise DataError(
            f"data.source {name!r}: not a local file or directory, and loading it as a Hugging Face dataset "
            f"(split {split!r}) failed: {type(exc).__name__}: {exc}"
        ) from None
    for i, row in enumerate(ds):
        yield f"{name}[{split} row {i}]", dict(row)


def looks_like_path(source: str) -> bool:
    """Whether a source string is meant as a local path rather than a Hub dataset id."""
    return source.startswith((".", "/", "~")) or source.endswith(FILE_SUFFIXES + (".txt",))


def read_source(source: str, *, hf_split: str = "train") -> Iterator[Record]:
    """Yield raw records from a file, a directory of .txt files or a Hugging Face dataset id.

    Raises:
        DataError: a missing path, an unsupported suffix, or bad content (with file and line).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _read_txt_dir(path)
        return
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(readers)}")
        logger.info("reading %s", path)
        yield from reader(path)
        return
    if looks_like_path(source):
        raise DataError(f"data source {source!r}: no such file or directory")
    logger.info("loading Hugging Face dataset %s (split %s)", source, hf_split)
    yield from _read_hf(source, hf_split)
