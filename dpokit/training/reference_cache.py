"""Precomputed reference log-probs: one no-grad pass over the data before training, cached on disk.

The cache file is named by a hash of everything the numbers depend on:
- the reference weights (hashed as they stream through the loader, name + dtype + shape + bytes),
- each split's tokenized pairs (prompt/chosen/rejected ids: this covers the data file, the
  tokenizer, the chat template and truncation settings at once),
- the settings of the forward (`average_logps`, the compute dtype, ...).
So a later epoch, or a later run with the same model and data, reuses it, and anything that
changes the numbers misses it.

Under FSDP2 every rank runs the same number of forwards (FSDP's collectives need that): pairs are
dealt round-robin, the last batch padded, and the per-pair results all-gathered so every rank ends
with the full tables. The result does not depend on the number of ranks, so a cache written by an
8-rank run serves a 1-rank run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from dpokit.distributed.fsdp import reshard
from dpokit.distributed.group import all_gather_tensor, get_rank, get_world_size
from dpokit.distributed.sampler import eval_batches
from dpokit.errors import DpokitError
from dpokit.training.forward import policy_logps
from dpokit.training.reference import PrecomputedReference

# Bumped when dpokit's reference arithmetic changes, so older cached tables are not read.
CACHE_VERSION = 2


class TensorFingerprint:
    """Wraps a (key, tensor) stream and hashes it as it passes: `wrap(tensors)` yields the same
    items; `hexdigest()` afterwards names the weights (independent of how they are sharded)."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def wrap(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in tensors:
            data = tensor.detach().to("cpu").contiguous()
            self._hash.update(f"{key}|{data.dtype}|{tuple(data.shape)}|".encode())
            self._hash.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
            yield key, tensor

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def base_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight of `model` except its LoRA adapters, as they are held (dtype
    included), NF4 weights dequantized: what an adapters-off reference computes with."""
    from dpokit.models.lora import is_nf4

    for name, tensor in model.state_dict().items():
        if ".lora_a." in name or ".lora_b." in name:
            continue
        yield name, tensor.get_original_weight() if is_nf4(tensor) else tensor


def weights_fingerprint(model: nn.Module) -> str:
    """`TensorFingerprint` of `base_weights(model)` (one pass over the weights)."""
    fingerprint = TensorFingerprint()
    for _ in fingerprint.wrap(base_weights(model)):
        pass
    return fingerprint.hexdigest()


def dataset_fingerprint(dataset: Sequence[dict]) -> str:
    """Hash of a tokenized preference dataset (every pair's prompt, chosen and rejected ids)."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        digest.update(json.dumps([item["prompt_ids"], item["chosen_ids"], item["rejected_ids"]]).encode())
    return digest.hexdigest()


def reference_cache_key(*, weights: str, datasets: dict[str, str], settings: dict) -> str:
    payload = json.dumps({"weights": weights, "datasets": datasets, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def reference_logps_key(
    *,
    weights: str,
    datasets: dict[str, Sequence[dict]],
    average_logps: bool,
    ld_alpha: float | None,
    dtype: str,
    param_dtype: str | None,
    architecture: Mapping | None = None,
) -> str:
    """The cache key of precomputed reference log-probs: everything they depend on, the weights'
    fingerprint (`TensorFingerprint`), every split's token ids and the settings of the forward.
    `ld_alpha` enters only when set, so caches written before LD-DPO existed keep their keys;
    `architecture` (the decoder's `args`) with `CACHE_VERSION`, so another architecture or a change
    of dpokit's arithmetic never reads a stale table."""
    settings = {"average_logps": average_logps, "dtype": dtype, "param_dtype": param_dtype}
    if ld_alpha is not None:
        settings["ld_alpha"] = ld_alpha
    if architecture is not None:  # what the weights compute: RoPE, windows, soft-caps, norms, ...
        settings["architecture"] = repr(sorted(architecture.items()))
        settings["version"] = CACHE_VERSION
    fingerprints = {name: dataset_fingerprint(data) for name, data in datasets.items()}
    return reference_cache_key(weights=weights, datasets=fingerprints, settings=settings)


@torch.no_grad()
def compute_reference_logps(
    model: nn.Module,
    dataset: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    *,
    batch_size: int,
    device: torch.device,
    average_logps: bool = False,
    ld_alpha: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_pairs] chosen and rejected reference log-probs (fp32, CPU) of every pair, on every rank."""
    rank, world_size = get_rank(), get_world_size()
    was_training = model.training
    model.eval()
    local = []  # rows of (index, valid, chosen, rejected)
    try:
        for batch in eval_batches(dataset, collate, batch_size=batch_size, rank=rank, world_size=world_size):
            out = policy_logps(model, batch.to(device), average_logps=average_logps, ld_alpha=ld_alpha)
            local.append(
                torch.stack(
                    [
                        batch.pair_index.double(),
                        batch.valid.double(),
                        out.chosen.double().cpu(),
                        out.rejected.double().cpu(),
                    ],
                    dim=1,
                )
            )
    finally:
        model.train(was_training)
        reshard(model)  # FSDP2 leaves the root gathered after a forward with no backward
    rows = torch.cat([r for r in all_gather_tensor(torch.cat(local))])
    rows = rows[rows[:, 1] > 0]
    chosen = torch.full((len(dataset),), float("nan"), dtype=torch.float64)
    rejected = torch.full((len(dataset),), float("nan"), dtype=torch.float64)
    index = rows[:, 0].long()
    chosen[index], rejected[index] = rows[:, 2], rows[:, 3]
    if torch.isnan(chosen).any() or torch.isnan(rejected).any():
        raise RuntimeError("precomputing reference log-probs missed some pairs")
    return chosen.float(), rejected.float()


def _write_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: readers see the old file or the whole new one


def precompute_reference_logps(
    model: nn.Module,
    datasets: dict[str, Sequence[dict]],
    collate: Callable[[list[dict]], dict],
    *,
    cache_dir: str | Path | None,
    key: str,
    batch_size: int,
    device: torch.device,
    average_logps: bool = False,
    ld_alpha: float | None = None,
) -> tuple[dict[str, PrecomputedReference], bool]:
    """One `PrecomputedReference` per split (e.g. {"train": ..., "validation": ...}), loaded from
    `cache_dir/reference_logps-<key>.pt` when present, else computed with `model` (which must hold
    the reference weights) and written there by rank 0. Returns (references, loaded_from_cache)."""
    path = Path(cache_dir) / f"reference_logps-{key[:32]}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key and set(cached["splits"]) >= set(datasets):
            return {name: PrecomputedReference(*cached["splits"][name]) for name in datasets}, True
    tables = {
        name: compute_reference_logps(
            model, data, collate, batch_size=batch_size, device=device, average_logps=average_logps, ld_alpha=ld_alpha
        )
        for name, data in datasets.items()
    }
    if path is not None and get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic({"key": key, "splits": tables}, path)
    return {name: PrecomputedReference(*table) for name, table in tables.items()}, False


def _check_one_rope_per_pair(model: nn.Module, splits: dict[str, Sequence[dict]]) -> None:
    """LongRoPE (Phi-3 128k) rotates a whole batch by its long factors once any sequence in it
    passes the switch length, so a pair's log-probs would depend on its batch mates, which differ
    between the precomputing pass and training: refused for such data."""
    switch = getattr(model, "rope_switch_length", None)
    if switch is None:
        return
    for name, data in splits.items():
        for i in range(len(data)):
            pair = data[i]
            longest = len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
            if longest > switch:
                raise DpokitError(
                    f"reference.strategy=precomputed: {name} pair {i} has {longest} tokens, more than the "
                    f"{switch} after which LongRoPE switches factors for its whole batch; use "
                    "reference.strategy=adapter_off (LoRA) or swap (full), or max_seq_len <= "
                    f"{switch}"
                )


def reference_splits(train_pairs: Sequence[dict], validation_sets: dict) -> dict[str, Sequence[dict]]:
    """The splits a precomputed reference covers: "train", "validation" and "validation/<name>"."""
    return {"train": train_pairs} | {
        ("validation" if name is None else f"validation/{name}"): data for name, data in validation_sets.items()
    }


def precomputed_references(
    model: nn.Module,
    train_pairs: Sequence[dict],
    validation_sets: dict,
    collate: Callable[[list[dict]], dict],
    *,
    weights: str,
    cache_dir: str | Path | None,
    batch_size: int,
    device: torch.device,
    dtype: str,
    param_dtype: str | None = None,
    average_logps: bool = False,
    ld_alpha: float | None = None,
) -> tuple[PrecomputedReference, dict, str]:
    """(train reference, {validation set name: reference}, a line saying what happened): the
    reference log-probs of every split from the cache under `cache_dir`, or one no-grad pass of
    `model` (holding the reference weights, fingerprinted as `weights`) written there."""
    splits = reference_splits(train_pairs, validation_sets)
    _check_one_rope_per_pair(model, splits)
    key = reference_logps_key(
        weights=weights,
        architecture=getattr(model, "args", None),
        datasets=splits,
        average_logps=average_logps,
        ld_alpha=ld_alpha,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    started = time.perf_counter()
    tables, cached = precompute_reference_logps(
        model,
        splits,
        collate,
        cache_dir=cache_dir,
        key=key,
        batch_size=batch_size,
        device=device,
        average_logps=average_logps,
        ld_alpha=ld_alpha,
    )
    note = (
        f"reference log-probs {'loaded from cache' if cached else 'precomputed'} in "
        f"{time.perf_counter() - started:.1f}s (cache key {key[:12]})"
    )
    validation = {name: tables["validation" if name is None else f"validation/{name}"] for name in validation_sets}
    return tables["train"], validation, note


LORA_STRATEGIES = ("adapter_off", "precomputed")


def lora_references(
    model: nn.Module,
    strategy: str,
    train_pairs: Sequence[dict],
    validation_sets: dict,
    collate: Callable[[list[dict]], dict],
    *,
    reference_free: bool,
    weights: Callable[[], str],
    cache_dir: str | Path | None,
    batch_size: int,
    device: torch.device,
    dtype: str,
    param_dtype: str | None = None,
    average_logps: bool = False,
    ld_alpha: float | None = None,
) -> tuple[object, dict, str | None]:
    """The reference of a LoRA recipe: the base model, i.e. `model` with its adapters off, run
    beside the policy ("adapter_off") or as log-probs computed once and cached ("precomputed",
    keyed by `weights()`, the base weights' fingerprint). Returns (train reference, {validation
    set name: reference}, a line to report or None); reference-free losses get `NoReference`."""
    from dpokit.models.lora import disable_adapter
    from dpokit.training.reference import AdapterOffReference, NoReference

    if strategy not in LORA_STRATEGIES:
        raise DpokitError(f"reference.strategy: unknown {strategy!r}; choose from {list(LORA_STRATEGIES)}")
    if reference_free:  # SimPO, CPO, ORPO, ...: no reference forward at all
        reference = NoReference()
    elif strategy == "adapter_off":
        reference = AdapterOffReference(model, average_logps=average_logps, ld_alpha=ld_alpha)
    else:
        with disable_adapter(model):
            reference, validation, note = precomputed_references(
                model,
                train_pairs,
                validation_sets,
                collate,
                weights=weights(),
                cache_dir=cache_dir,
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                param_dtype=param_dtype,
                average_logps=average_logps,
                ld_alpha=ld_alpha,
            )
        return reference, validation, note
    return reference, dict.fromkeys(validation_sets, reference), None
