"""Intermediate checkpoints of distributed runs (exact resume) and the final HF-format save.

An intermediate checkpoint `<root>/step_00000040/` holds
- the sharded model and optimizer state, written by every rank with torch.distributed.checkpoint
  (DCP; it reshards on load, so the model/optimizer part loads on any number of ranks),
- `rank<r>.pt` per rank: step, LR scheduler, data position and this rank's RNG states,
- `.complete`, written last.

Atomicity: everything is written into `<root>/.tmp-step_00000040/`, `.complete` is added, and only
then is the folder renamed to its final name (a rename is atomic). A save killed midway leaves a
`.tmp-*` folder, which `latest_checkpoint` never returns and the next save deletes. Only the
newest `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dpokit.distributed.fsdp import reshard
from dpokit.distributed.group import barrier, broadcast_object, get_rank, get_world_size, raise_together
from dpokit.errors import DpokitError
from dpokit.fileio import WriteError, io_reason
from dpokit.models.hf_checkpoint import write_hf_config, write_hf_weights
from dpokit.models.hf_config import family_for_model, read_hf_config

COMPLETE = ".complete"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def checkpoint_score(path: Path) -> dict | None:
    """The validation score a checkpoint was saved with ({"metric", "value", "validated_at"}), or None."""
    try:
        return json.loads((path / COMPLETE).read_text()).get("score")
    except (OSError, ValueError, AttributeError):
        return None


def best_checkpoints(root: str | Path, keep_top_k: int, *, metric: str, higher_is_better: bool) -> list[Path]:
    """The `keep_top_k` complete checkpoints with the best `metric` score, best first (ties: the earlier)."""
    scored = []
    for step, path in checkpoint_dirs(root):
        score = checkpoint_score(path)
        if score and score.get("metric") == metric and isinstance(score.get("value"), (int, float)):
            value = score["value"]
            if value == value:  # a NaN score is never the best
                scored.append((-value if higher_is_better else value, step, path))
    return [path for *_, path in sorted(scored)[:keep_top_k]]


def stale_checkpoints(
    root: str | Path, keep_last: int, *, keep_top_k: int = 0, metric: str | None = None, higher_is_better: bool = True
) -> list[Path]:
    """The complete checkpoints under `root` that are neither among the newest `keep_last` (0 keeps
    all) nor among the `keep_top_k` best by `metric`, oldest first."""
    dirs = checkpoint_dirs(root)
    if keep_last <= 0:
        return []
    keep = {path for _, path in dirs[-keep_last:]}
    if keep_top_k and metric:
        keep.update(best_checkpoints(root, keep_top_k, metric=metric, higher_is_better=higher_is_better))
    return [path for _, path in dirs if path not in keep]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (never a half-written one), or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1][1] if dirs else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    trainer_state: dict,
    keep_last: int = 2,
    trainable_only: bool = False,
    score: dict | None = None,
    metric: str | None = None,
    keep_top_k: int = 0,
    higher_is_better: bool = True,
) -> Path:
    """Collective: every rank calls it. `trainer_state` (scheduler, data position, ...) is saved
    per rank together with the step and the RNG states. `trainable_only` leaves frozen parameters
    out (LoRA: the base weights are the initial checkpoint's). `score` ({"metric", "value",
    "validated_at"}) is recorded in the checkpoint's marker; older checkpoints are dropped unless
    among the newest `keep_last` or the `keep_top_k` best by `metric` (the scores recorded by earlier
    saves, also when this one has none). Returns the final folder."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}"
    # Every rank learns whether rank 0 could start (no rank may wait alone in a collective).
    error = None
    if get_rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(root)
            tmp.mkdir()
        except OSError as e:
            error = io_reason(e)
    error = broadcast_object(error)
    if error:
        raise WriteError(f"cannot write the step-{step} checkpoint to {tmp}: {error}")
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=_options(trainable_only))
        with _single_process_quietly():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
        torch.save(
            {"step": step, "world_size": get_world_size(), "rng": rng_state(), **trainer_state},
            tmp / f"rank{get_rank()}.pt",
        )
        barrier()
        if get_rank() == 0:
            marker = {"step": step, "world_size": get_world_size(), "trainable_only": trainable_only}
            if score is not None:
                marker["score"] = score
            (tmp / COMPLETE).write_text(json.dumps(marker) + "\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            stale = stale_checkpoints(
                root, keep_last, keep_top_k=keep_top_k, metric=metric, higher_is_better=higher_is_better
            )
            for old in stale:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
    except BaseException as e:
        if get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing behind
        reason = io_reason(e)
        if reason is None:
            raise
        raise WriteError(f"cannot write the step-{step} checkpoint to {tmp}: {reason}") from None
    return final


def remove_stale_temporaries(root: Path) -> None:
    """Remove what killed saves left (`.tmp-step_*`): they never accumulate."""
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def resolve_resume(resume, root: str | Path) -> Path | None:
    """`resume` as a config gives it: false/None -> None; true -> the latest complete checkpoint
    under `root` (None if there is none yet); a path -> that checkpoint (must be complete).
    Rank 0 decides and broadcasts, so every rank loads the same folder."""
    if resume in (None, False):
        return None
    if resume is True:
        path = latest_checkpoint(root) if get_rank() == 0 else None
        path = broadcast_object(path)
        return path
    path = Path(str(resume))
    if not path.is_dir():
        found = sorted(p.name for p in Path(root).glob("step_*")) if Path(root).is_dir() else []
        hint = f"; checkpoints in {root}: {', '.join(found)}" if found else f"; {root} holds no checkpoint"
        raise DpokitError(f"resume: {path} does not exist{hint}")
    if not (path / COMPLETE).is_file():
        raise DpokitError(f"resume: {path} is not a complete checkpoint (no {COMPLETE} file)")
    return path


@contextlib.contextmanager
def _single_process_quietly():
    """DCP without a process group (the single-device recipe) saves and loads in one process, as
    intended; it warns that it assumes so on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _options(trainable_only: bool) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, trainable_only: bool = False
) -> dict:
    """Collective: load model + optimizer shards and this rank's RNG states; returns this rank's
    trainer state (step, scheduler, data position, ...). A checkpoint of the other kind (full
    model vs adapters only), a missing or truncated shard or per-rank file is one `DpokitError`
    on every rank, naming the file."""
    path = Path(path)
    _check_kind(path, trainable_only)
    options = _options(trainable_only)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optimizer_state}
    error = None
    try:
        with _single_process_quietly():
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException
        error = f"resume: cannot load {path} ({_load_failure(e)}); resume from another checkpoint or start fresh"
    raise_together(error)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )
    reshard(model)  # drop parameters a no-grad forward left gathered: they predate the loaded weights
    own = path / f"rank{get_rank()}.pt"
    source = own if own.is_file() else path / "rank0.pt"
    saved, error = None, None
    try:
        saved = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        error = f"resume: cannot read {source} ({_load_failure(e)}); resume from another checkpoint or start fresh"
    raise_together(error)
    if saved["world_size"] == get_world_size():
        set_rng_state(saved["rng"])
    elif get_rank() == 0:
        print(
            f"note: {path} was saved by {saved['world_size']} ranks, this run has {get_world_size()}: "
            "weights, optimizer and data position resume exactly, per-rank RNG streams do not"
        )
    return saved


def _check_kind(path: Path, trainable_only: bool) -> None:
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        marker = {}
    saved = marker.get("trainable_only")
    if saved is not None and saved != trainable_only:
        kinds = {True: "the trainable (adapter) weights only", False: "the whole model"}
        raise DpokitError(
            f"resume: {path} holds {kinds[saved]}, this recipe resumes {kinds[trainable_only]}; "
            f"resume it with the recipe that wrote it (its config.yaml is in the run's output_dir)"
        )


def _load_failure(error: BaseException) -> str:
    """What went wrong loading a checkpoint, in a few words."""
    failures = getattr(error, "failures", None)  # DCP's CheckpointException: rank -> (exception, traceback)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        error = inner[0] if isinstance(inner, tuple) else inner
    if isinstance(error, FileNotFoundError):
        return f"{error.filename or error}: missing"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "Missing key in checkpoint state_dict" in text:
        return f"it does not hold this model's weights: {text}"
    return text.split(". This is an internal")[0][:300]  # torch.load's long advice on a truncated file


def save_hf_model(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    directory: str | Path,
    *,
    dtype: torch.dtype,
    source_dir: str | Path | None = None,
) -> Path | None:
    """Collective: every rank iterates `tensors` (our keys, full tensors: iterating all-gathers,
    e.g. `fsdp.full_tensors(model)` or `fsdp_lora.merged_full_tensors(model)`); rank 0 writes them
    with the one HF writer (`models.hf_checkpoint.write_hf_weights`), then config.json and
    `source_dir`'s tokenizer files. Returns the folder on rank 0, else None."""
    main = get_rank() == 0
    base = read_hf_config(source_dir)[0] if source_dir is not None else None
    write_hf_weights(tensors, directory, family=family_for_model(model, base), write=main)
    if main:
        write_hf_config(model, directory, dtype=dtype, source_dir=source_dir)
    barrier()
    return Path(directory) if main else None
