"""Writing files so that a full disk, a read-only folder or a kill leaves either the old state or
the new one, never half of it: everything is written under a temporary name beside its target and
renamed into place when complete. A failed write removes its temporary files and raises one
`DpokitError` naming what was being written and where ("disk full" included)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from dpokit.errors import DpokitError

TMP_PREFIX = ".tmp-"


class WriteError(DpokitError):
    """Writing `what` to a path failed (no space, no permission, read-only, not a folder)."""


def io_reason(error: BaseException | None) -> str | None:
    """The operating system's reason ("No space left on device") when `error` is a failed read or
    write, however the library that failed wrapped it (safetensors, torch.save, DCP); else None."""
    if error is None:
        return None
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)
    match = re.search(r"I/O error: (.+?) \(os error \d+\)", text)  # safetensors
    if match:
        return match.group(1)
    if "PytorchStreamWriter failed writing file" in text or "unexpected pos" in text:  # torch.save
        return "the write failed (no space left, or a file size limit)"
    failures = getattr(error, "failures", None)  # DCP's CheckpointException: rank -> (exception, traceback)
    if isinstance(failures, dict):
        for failure in failures.values():
            reason = io_reason(failure[0] if isinstance(failure, tuple) else failure)
            if reason:
                return reason
    cause = error.__cause__ or error.__context__
    return io_reason(cause) if cause is not error else None


@contextlib.contextmanager
def writing(what: str, path: str | Path) -> Iterator[None]:
    """Turn a failed write in the block into a `WriteError` naming `what` and `path`."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        reason = io_reason(e)
        if reason is None:
            raise
        where = getattr(e, "filename", None) or path
        raise WriteError(f"cannot write {what} to {where}: {reason}") from None


def staging_path(target: str | Path) -> Path:
    """Where `target` is written before it is renamed into place (same folder, same filesystem)."""
    target = Path(target)
    return target.with_name(f"{TMP_PREFIX}{target.name}")


@contextlib.contextmanager
def atomic_dir(target: str | Path, what: str, *, write: bool = True) -> Iterator[Path]:
    """Yields a staging folder for `target`; when the block ends normally the staging folder
    replaces `target` (an older `target` is removed only then). On an error the staging folder is
    removed and an OSError becomes a `WriteError`. `write=False` (ranks that do not write):
    yields the same staging path and does nothing else."""
    target = Path(target)
    staging = staging_path(target)
    if not write:
        yield staging
        return
    try:
        with writing(what, staging):
            if staging.exists():
                shutil.rmtree(staging)  # left by a killed earlier write
            staging.mkdir(parents=True)
        with writing(what, staging):
            yield staging
        with writing(what, target):
            replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(source: Path, target: Path) -> None:
    """Rename `source` to `target`, replacing a `target` folder that exists."""
    if target.exists():
        old = target.with_name(f"{TMP_PREFIX}old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        source.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        source.rename(target)


@contextlib.contextmanager
def atomic_file(path: str | Path, what: str, *, mode: str = "w") -> Iterator:
    """An open file whose contents appear at `path` only once the block ends normally."""
    path = Path(path)
    staging = staging_path(path)
    try:
        with writing(what, path):  # outermost: closing a file whose buffer cannot be written fails too
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(staging, mode, encoding=None if "b" in mode else "utf-8") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
