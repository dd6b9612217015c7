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

import json
import random
import re
import shutil
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dpokit.errors import DpokitError
from dpokit.training.distributed import barrier, broadcast_object, get_rank, get_world_size
from dpokit.training.fsdp import reshard

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


def stale_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """The complete checkpoints under `root` beyond the newest `keep_last` (0 keeps all), oldest first."""
    dirs = checkpoint_dirs(root)
    return [path for _, path in dirs[:-keep_last]] if keep_last > 0 else []


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
) -> Path:
    """Collective: every rank calls it. `trainer_state` (scheduler, data position, ...) is saved
    per rank together with the step and the RNG states. `trainable_only` leaves frozen parameters
    out (LoRA: the base weights are the initial checkpoint's). Returns the final checkpoint folder."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    torch.save(
        {"step": step, "world_size": get_world_size(), "rng": rng_state(), **trainer_state},
        tmp / f"rank{get_rank()}.pt",
    )
    barrier()
    if get_rank() == 0:
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": get_world_size()}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in stale_checkpoints(root, keep_last):
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


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
    if not (path / COMPLETE).is_file():
        raise DpokitError(f"resume: {path} is not a complete checkpoint (no {COMPLETE} file)")
    return path


def _options(trainable_only: bool) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, trainable_only: bool = False
) -> dict:
    """Collective: load model + optimizer shards and this rank's RNG states; returns this rank's
    trainer state (step, scheduler, data position, ...)."""
    path = Path(path)
    options = _options(trainable_only)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )
    reshard(model)  # drop parameters a no-grad forward left gathered: they predate the loaded weights
    own = path / f"rank{get_rank()}.pt"
    saved = torch.load(own if own.is_file() else path / "rank0.pt", map_location="cpu", weights_only=True)
    if saved["world_size"] == get_world_size():
        set_rng_state(saved["rng"])
    elif get_rank() == 0:
        print(
            f"note: {path} was saved by {saved['world_size']} ranks, this run has {get_world_size()}: "
            "weights, optimizer and data position resume exactly, per-rank RNG streams do not"
        )
    return saved


def save_full_model(
    model: nn.Module,
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path | None:
    """Collective: gather the sharded model one tensor at a time and, on rank 0, write it as
    Hugging Face safetensors (see `save_hf_safetensors`). Returns the folder on rank 0, else None."""
    from dpokit.training.fsdp import full_tensors

    return save_hf_safetensors(full_tensors(model, dtype=dtype), directory, max_shard_bytes=max_shard_bytes)


def save_hf_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    directory: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> Path | None:
    """Collective: every rank iterates `tensors` (our keys, full tensors: iterating may all-gather);
    rank 0 writes them with HF key names as `model.safetensors`, or as
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` beyond `max_shard_bytes`.
    Rank 0 holds at most one file's worth of tensors. Returns the folder on rank 0, else None."""
    from safetensors.torch import save_file

    from dpokit.models.hf_checkpoint import hf_key

    directory = Path(directory)
    main = get_rank() == 0
    if main:
        directory.mkdir(parents=True, exist_ok=True)
    current: dict[str, torch.Tensor] = {}
    written: list[Path] = []
    weight_map: dict[str, int] = {}
    size = 0
    for key, tensor in tensors:
        if not main:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            written.append(_write_part(current, directory, len(written), save_file))
            current, size = {}, 0
        current[hf_key(key)] = tensor.contiguous()
        weight_map[hf_key(key)] = len(written)
        size += nbytes
    if main:
        if current:
            written.append(_write_part(current, directory, len(written), save_file))
        if len(written) == 1:
            written[0].rename(directory / "model.safetensors")
        else:
            names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
            for part, name in zip(written, names):
                part.rename(directory / name)
            index = {"metadata": {}, "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    barrier()
    return directory if main else None


def write_hf_metadata(
    model: nn.Module, directory: str | Path, *, source_dir: str | Path | None, dtype: torch.dtype
) -> None:
    """config.json (and `source_dir`'s tokenizer files) beside final weights saved in `dtype`, so
    the folder loads with `AutoModelForCausalLM.from_pretrained` and serves as a `checkpoint_dir`.
    Metadata such as token ids is kept from `source_dir`'s config.json. Rank 0 calls it."""
    from dpokit.models.hf_checkpoint import copy_tokenizer_files
    from dpokit.models.hf_config import hf_config_from_model

    directory = Path(directory)
    base = None
    if source_dir is not None:
        base = json.loads((Path(source_dir) / "config.json").read_text())
        copy_tokenizer_files(source_dir, directory)
    config = hf_config_from_model(model, dtype, base)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_part(tensors: dict[str, torch.Tensor], directory: Path, index: int, save_file) -> Path:
    part = directory / f".part-{index:05d}.safetensors"
    save_file(tensors, part, metadata={"format": "pt"})
    return part
