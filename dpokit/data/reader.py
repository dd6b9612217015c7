"""Reading preference files record by record, each with the location errors should name.

JSONL (`.jsonl`, also gzipped `.jsonl.gz`): one JSON object per line, location "file:LINE".
JSON (`.json`): one array of objects, location "file:[INDEX]".
Parquet (`.parquet`, needs pyarrow, an optional dependency): location "file:row N".

A line that is not UTF-8 or not JSON is yielded as a `PreferenceDataError` (not raised) so the
caller decides whether to stop or to skip and count it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from dpokit.data.formats import PreferenceDataError

Located = tuple[str, Any]  # (where, decoded record or the PreferenceDataError for that location)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode_line(raw: bytes, where: str) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return PreferenceDataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})", "not UTF-8")
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return PreferenceDataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})", "invalid JSON")


def read_jsonl_records(path: Path) -> Iterator[Located]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            record = _decode_line(raw, where)
            if record is not None:  # blank lines are allowed
                yield where, record


def read_json_records(path: Path) -> Iterator[Located]:
    with _open_binary(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PreferenceDataError(f"{path}:{line}: not valid UTF-8 ({e.reason})", "not UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PreferenceDataError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})", "invalid JSON"
        ) from None
    if not isinstance(data, list):
        raise PreferenceDataError(
            f"{path}: expected a JSON array of records, got {type(data).__name__}", "mistyped field"
        )
    for index, record in enumerate(data):
        yield f"{path}:[{index}]", record


def read_parquet_records(path: Path) -> Iterator[Located]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PreferenceDataError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow)", "unsupported"
        ) from None
    table = pq.read_table(path)
    for row, record in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {row}", record


def read_records(path: str | Path) -> Iterator[Located]:
    """(where, record) for every record of a JSONL / JSON / Parquet file, chosen by extension."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: preference data file not found", "file not found")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".json":
        return read_json_records(path)
    if last == ".parquet":
        return read_parquet_records(path)
    return read_jsonl_records(path)
