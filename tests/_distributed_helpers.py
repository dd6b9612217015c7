"""Shared by the distributed tests: a tiny model, synthetic pairs, an HF-style safetensors
checkpoint written by the test itself, and a training loop over the library pieces that runs the
same way on a plain model in one process and on an FSDP2 model in several (gloo) processes."""

from __future__ import annotations

import json
import os
import random
import socket
from functools import partial
from pathlib import Path

import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from dpokit.data import collate_preference_pairs
from dpokit.data.synthetic import case_following_pairs
from dpokit.losses import dpo_loss
from dpokit.models import llama

TINY = dict(
    vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64, rope_theta=10_000.0
)
PAD = 0
FULL_RECIPE_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "dpo_full_distributed" / "tiny.yaml"


def build_model() -> torch.nn.Module:
    return llama(**TINY)


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(1, TINY["vocab_size"]) for _ in range(k)]

    return [
        {
            "prompt_ids": ids(rng.randint(3, 8)),
            "chosen_ids": ids(rng.randint(2, 6)),
            "rejected_ids": ids(rng.randint(2, 6)),
        }
        for _ in range(n)
    ]


collate = partial(collate_preference_pairs, pad_id=PAD)
loss_fn = partial(dpo_loss, beta=0.5)


def write_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A random-init tiny model saved as HF-style safetensors (our keys under `model.`)."""
    torch.manual_seed(seed)
    model = build_model()
    directory.mkdir(parents=True, exist_ok=True)
    state = {(k if k.startswith("lm_head.") else f"model.{k}"): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / "model.safetensors")
    return directory


def read_checkpoint(directory: Path):
    """(our key, tensor) one tensor at a time, as the HF loader yields them."""
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            yield key.removeprefix("model."), f.get_tensor(key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from dpokit.distributed.group import destroy_distributed, exit_worker, init_distributed

    init_distributed("cpu")
    try:
        fn(rank, *args)
    except BaseException:
        destroy_distributed(wait_for_peers=False)
        raise  # to mp.spawn, with its traceback
    destroy_distributed()
    exit_worker(0)


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, *args) in `world_size` gloo processes (fn must be importable: a module-level function)."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def make_model(
    checkpoint: Path, *, sharded: bool, trainable: bool = True, activation_checkpointing: bool = False
) -> torch.nn.Module:
    """The checkpoint's model: plain (loaded the ordinary way) or meta-built, FSDP2-sharded and
    loaded rank-locally through the seam under test."""
    from dpokit.distributed.fsdp import load_into_shards, materialize, shard_model

    if sharded:
        with torch.device("meta"):
            model = build_model()
        shard_model(model, activation_checkpointing=activation_checkpointing)
        materialize(model, "cpu")
        load_into_shards(model, read_checkpoint(checkpoint))
    else:
        model = build_model()
        model.load_state_dict(dict(read_checkpoint(checkpoint)))
    return model.requires_grad_(trainable)


def make_reference(strategy: str, policy, checkpoint: Path, pairs, *, sharded: bool):
    from dpokit.training.reference import FrozenCopyReference, PrecomputedReference, StateDictSwapReference
    from dpokit.training.reference_cache import compute_reference_logps

    if strategy == "swap":
        return StateDictSwapReference(policy)
    if strategy == "frozen":
        return FrozenCopyReference(make_model(checkpoint, sharded=sharded, trainable=False))
    if strategy == "precomputed":
        chosen, rejected = compute_reference_logps(policy, pairs, collate, batch_size=5, device=torch.device("cpu"))
        return PrecomputedReference(chosen, rejected)
    raise ValueError(strategy)


def train_trajectory(
    checkpoint: Path,
    strategy: str,
    *,
    sharded: bool,
    rank: int,
    world_size: int,
    steps: int,
    batch_size: int,
    accumulation: int,
    num_pairs: int = 48,
) -> dict:
    """`steps` SGD steps of DPO; returns per-step (rank-reduced) losses and grad norms and the
    final full weights."""
    from dpokit.distributed.fsdp import full_tensors
    from dpokit.distributed.sampler import GlobalBatchSampler
    from dpokit.training.step import accumulate_gradients

    pairs = synthetic_pairs(num_pairs)
    # The frozen-copy run also recomputes activations in backward (must not change any number).
    policy = make_model(checkpoint, sharded=sharded, activation_checkpointing=strategy == "frozen")
    reference = make_reference(strategy, policy, checkpoint, pairs, sharded=sharded)
    # SGD: Adam's m / sqrt(v) turns 1e-9 differences in a near-zero gradient into lr-sized ones,
    # which would make the weight comparison test Adam rather than the distributed step.
    optimizer = torch.optim.SGD(policy.parameters(), lr=5.0)
    sampler = GlobalBatchSampler(
        pairs,
        collate,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        rank=rank,
        world_size=world_size,
        seed=0,
    )
    losses, grad_norms = [], []
    for _ in range(steps):
        metrics, _ = accumulate_gradients(policy, reference, sampler.next_step(), loss_fn, device=torch.device("cpu"))
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1e9)
        grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        losses.append(metrics.means()["preference_loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights = dict(full_tensors(policy))
    return {"losses": losses, "grad_norms": grad_norms, "weights": weights}


LORA = dict(lora_targets=("q_proj", "v_proj", "lm_head"), lora_rank=4, lora_alpha=8.0)


def make_lora_model(checkpoint: Path, *, sharded: bool) -> torch.nn.Module:
    """A LoRA twin of the checkpoint's model: base weights from the checkpoint, adapters from
    `fresh_adapter_tensors` (seeded; B is zero, so the adapted model starts as the base, and A
    random so that B gets gradients)."""
    import itertools

    from dpokit.distributed.fsdp import load_into_shards, materialize, shard_model
    from dpokit.distributed.fsdp_lora import fresh_adapter_tensors
    from dpokit.models import lora_llama

    if sharded:
        with torch.device("meta"):
            model = lora_llama(**LORA, **TINY)
        shard_model(model)
        materialize(model, "cpu")
        load_into_shards(model, itertools.chain(read_checkpoint(checkpoint), fresh_adapter_tensors(model, seed=1)))
    else:
        model = lora_llama(**LORA, **TINY)
        state = dict(itertools.chain(read_checkpoint(checkpoint), fresh_adapter_tensors(model, seed=1)))
        model.load_state_dict(state)
    return model


def train_lora_trajectory(
    checkpoint: Path,
    *,
    sharded: bool,
    rank: int,
    world_size: int,
    steps: int,
    batch_size: int,
    accumulation: int,
    num_pairs: int = 48,
) -> dict:
    """Like `train_trajectory` for LoRA with the adapter-off reference; returns the merged weights."""
    from dpokit.distributed.fsdp_lora import merged_full_tensors
    from dpokit.distributed.sampler import GlobalBatchSampler
    from dpokit.models import merged_state_dict
    from dpokit.training.reference import AdapterOffReference
    from dpokit.training.step import accumulate_gradients

    pairs = synthetic_pairs(num_pairs)
    model = make_lora_model(checkpoint, sharded=sharded)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=5.0)
    sampler = GlobalBatchSampler(
        pairs,
        collate,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        rank=rank,
        world_size=world_size,
        seed=0,
    )
    reference = AdapterOffReference(model)
    losses = []
    for _ in range(steps):
        metrics, _ = accumulate_gradients(model, reference, sampler.next_step(), loss_fn, device=torch.device("cpu"))
        losses.append(metrics.means()["preference_loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    merged = dict(merged_full_tensors(model)) if sharded else merged_state_dict(model)
    return {"losses": losses, "merged": {k: v.detach().clone() for k, v in merged.items()}}


def small_full_recipe_config(tmp_path: Path, *, train_pairs: int, batch_size: int) -> DictConfig:
    """`dpo_full_distributed`'s tiny config made smaller for tests: a 2-layer dim-32 model,
    `train_pairs` / 8 bundled-style pairs (written under `tmp_path`), gradient accumulation 2,
    4 steps, a checkpoint every 2 steps, no validation before the end."""
    cfg = OmegaConf.load(FULL_RECIPE_CONFIG)
    cfg.model = {
        "_component_": "dpokit.models.llama",
        "vocab_size": 272,
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "hidden_dim": 64,
        "max_seq_len": 128,
        "rope_theta": 10000.0,
    }
    for name, n, seed in (("train_dataset", train_pairs, 0), ("validation_dataset", 8, 1)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in case_following_pairs(n, seed)))
        cfg[name] = {"_component_": "dpokit.data.PreferenceDataset", "path": str(path), "max_seq_len": 64}
    cfg.batch_size, cfg.gradient_accumulation_steps, cfg.max_steps = batch_size, 2, 4
    cfg.eval_every, cfg.eval_batch_size = 100, 8
    cfg.checkpoint.every, cfg.checkpoint.keep_last = 2, 5
    cfg.lr_scheduler.warmup_steps = 1
    return cfg
