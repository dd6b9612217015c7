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
import zlib
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
        return _checked_text(json.loads(line), where)
    except PreferenceDataError as e:
        return e
    except json.JSONDecodeError as e:
        return PreferenceDataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})", "invalid JSON")
    except RecursionError:
        return PreferenceDataError(f"{where}: invalid JSON (nested too deeply)", "invalid JSON")
    except ValueError as e:  # an integer of more digits than Python converts
        return PreferenceDataError(f"{where}: invalid JSON ({str(e).split(';')[0]})", "invalid JSON")


def _checked_text(value: Any, where: str, depth: int = 0) -> Any:
    """`value` unchanged, or a `PreferenceDataError` for a string holding a lone surrogate
    ("\\ud800" in JSON: not a character; tokenizers would turn it into U+FFFD silently)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PreferenceDataError(
                f"{where}: invalid Unicode (a lone surrogate {value[e.start]!r} at character {e.start} of a string)",
                "invalid Unicode",
            ) from None
    elif isinstance(value, dict):
        for item in value.values():
            _checked_text(item, where)
    elif isinstance(value, list):
        for item in value:
            _checked_text(item, where)
    return value


_UNREADABLE = (EOFError, OSError, zlib.error)  # truncated or corrupt gzip, a failing disk


def read_jsonl_records(path: Path) -> Iterator[Located]:
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                record = _decode_line(raw, where)
                if record is not None:  # blank lines are allowed
                    yield where, record
    except _UNREADABLE as e:
        raise PreferenceDataError(
            f"{path}:{lineno + 1}: unreadable after line {lineno} ({_unreadable_reason(path, e)})", "unreadable file"
        ) from None


def _unreadable_reason(path: Path, error: BaseException) -> str:
    if isinstance(error, EOFError):
        return "the gzip stream ends early: a truncated file"
    if isinstance(error, (zlib.error, gzip.BadGzipFile)):
        return f"corrupt gzip data: {error}"
    return getattr(error, "strerror", None) or str(error)


def read_json_records(path: Path) -> Iterator[Located]:
    try:
        with _open_binary(path) as f:
            raw = f.read()
    except _UNREADABLE as e:
        raise PreferenceDataError(f"{path}: unreadable ({_unreadable_reason(path, e)})", "unreadable file") from None
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
    except RecursionError:
        raise PreferenceDataError(f"{path}: invalid JSON (nested too deeply)", "invalid JSON") from None
    except ValueError as e:
        raise PreferenceDataError(f"{path}: invalid JSON ({str(e).split(';')[0]})", "invalid JSON") from None
    if not isinstance(data, list):
        raise PreferenceDataError(
            f"{path}: expected a JSON array of records, got {type(data).__name__}", "mistyped field"
        )
    for index, record in enumerate(data):
        where = f"{path}:[{index}]"
        try:
            yield where, _checked_text(record, where)
        except PreferenceDataError as e:
            yield where, e


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
