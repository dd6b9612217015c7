"""Reference policies: where the DPO reference log-probs come from.

Every strategy exposes `logps(batch) -> (chosen_logps, rejected_logps)` computed without grad, so
recipes swap strategies without touching the training step. Those that run a forward take the
policy's log-prob settings (`average_logps`, `ld_alpha`: see `forward.policy_logps`):

- `AdapterOffReference`: LoRA recipes; the base model (adapters off) is the reference.
- `StateDictSwapReference`: full fine-tuning with one model (NeMo-Aligner's method). Each rank keeps
  a CPU copy of its own reference shards and swaps them into the model for the reference forward.
- `FrozenCopyReference`: a second (sharded) model that never trains: more memory, no swap time.
- `PrecomputedReference`: log-probs computed once before training (see `reference_cache`).
- `NoReference`: reference-free losses (SimPO, ORPO-style SFT terms): returns None for both.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
from torch import nn

from dpokit.data.batch import PreferenceBatch
from dpokit.distributed.fsdp import local_tensor, reshard
from dpokit.models.lora import disable_adapter
from dpokit.training.forward import policy_logps
from dpokit.training.scoring import PolicyLogps


class AdapterOffReference:
    """The LoRA policy with every adapter switched off is the reference (exactly the base)."""

    def __init__(self, model: nn.Module, *, average_logps: bool = False, ld_alpha: float | None = None):
        self.model, self.average_logps, self.ld_alpha = model, average_logps, ld_alpha

    @torch.no_grad()
    def logps(self, batch: PreferenceBatch) -> PolicyLogps:
        with disable_adapter(self.model):
            return policy_logps(self.model, batch, average_logps=self.average_logps, ld_alpha=self.ld_alpha)

    @contextlib.contextmanager
    def generating(self):
        """The module that decodes as the reference: the policy with its adapters off."""
        with disable_adapter(self.model):
            yield self.model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class StateDictSwapReference:
    """Full fine-tuning with a single model: the reference weights are kept off the device and
    swapped in for the reference forward (NeMo-Aligner's full-parameter DPO).

    Each rank holds a CPU copy of only its own shards (pinned when the model is on CUDA, so the
    copies are asynchronous DMA). `logps` copies the training shards out to a CPU stash, copies
    the reference shards in, runs the forward, and copies the training shards back: nothing is
    ever gathered and the training weights come back bitwise unchanged. Under FSDP2 every module
    reshards after forward, and `reshard` frees anything left unsharded, so no all-gathered copy
    of the reference weights outlives the reference forward.

    `seconds["swap"]` accumulates the time spent copying (for the benchmark).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        weights_from: nn.Module | None = None,
        average_logps: bool = False,
        ld_alpha: float | None = None,
    ):
        self.model, self.average_logps, self.ld_alpha = model, average_logps, ld_alpha
        self.params = [p for p in model.parameters()]
        device = local_tensor(self.params[0]).device
        pin = device.type == "cuda"
        # The reference is the policy's current shards, or those of `weights_from` (the same
        # architecture, sharded the same way, with other weights).
        source = list((weights_from or model).parameters())
        if [tuple(local_tensor(p).shape) for p in source] != [tuple(local_tensor(p).shape) for p in self.params]:
            raise ValueError("weights_from must be the policy's architecture, sharded the same way")
        self.reference = [local_tensor(p).detach().to("cpu", copy=True) for p in source]
        self.stash = [torch.empty_like(t) for t in self.reference]
        if pin:
            self.reference = [t.pin_memory() for t in self.reference]
            self.stash = [t.pin_memory() for t in self.stash]
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @torch.no_grad()
    def _copy(self, sources, destinations) -> None:
        started = time.perf_counter()
        for src, dst in zip(sources, destinations):
            dst.copy_(src, non_blocking=True)
        _sync(self.device)
        self.seconds["swap"] += time.perf_counter() - started

    @contextlib.contextmanager
    def swapped(self):
        """Inside the block the model holds the reference weights."""
        shards = [local_tensor(p) for p in self.params]
        reshard(self.model)  # an earlier no-grad forward may have left policy weights unsharded
        self._copy(shards, self.stash)
        self._copy(self.reference, shards)
        try:
            yield self.model
        finally:
            # FSDP2 keeps the root's parameters unsharded after a forward (it expects a backward
            # next): free them, or the next forward would reuse the reference's embedding/head.
            reshard(self.model)
            self._copy(self.stash, shards)

    def generating(self):
        """The module that decodes as the reference: the policy with the reference weights in."""
        return self.swapped()

    @torch.no_grad()
    def logps(self, batch: PreferenceBatch) -> PolicyLogps:
        with self.swapped(), _eval_mode(self.model):
            return policy_logps(self.model, batch, average_logps=self.average_logps, ld_alpha=self.ld_alpha)


class FrozenCopyReference:
    """A second model holding the reference weights (sharded like the policy under FSDP2).
    Costs a second copy of the parameters (no gradients, no optimizer state); saves the swap."""

    def __init__(self, model: nn.Module, *, average_logps: bool = False, ld_alpha: float | None = None):
        self.model, self.average_logps, self.ld_alpha = model, average_logps, ld_alpha
        model.eval()
        model.requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: PreferenceBatch) -> PolicyLogps:
        try:
            return policy_logps(self.model, batch, average_logps=self.average_logps, ld_alpha=self.ld_alpha)
        finally:
            reshard(self.model)  # no backward follows: don't keep the root's weights gathered

    @contextlib.contextmanager
    def generating(self):
        try:
            yield self.model
        finally:
            reshard(self.model)


class PrecomputedReference:
    """Reference log-probs looked up by each pair's dataset index (`batch.pair_index`).

    `chosen` / `rejected` are [num_pairs] tables for one dataset split, computed once before
    training by `dpokit.training.reference_cache.precompute_reference_logps`."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor):
        if chosen.shape != rejected.shape or chosen.dim() != 1:
            raise ValueError(f"expected two [num_pairs] tables, got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
        self.chosen, self.rejected = chosen, rejected

    def logps(self, batch: PreferenceBatch) -> PolicyLogps:
        if batch.pair_index is None:
            raise ValueError("a precomputed reference needs batches with pair_index (see dpokit.distributed.sampler)")
        index = batch.pair_index.to(self.chosen.device)
        device = batch.input_ids.device
        return PolicyLogps(self.chosen[index].to(device), self.rejected[index].to(device))

    @contextlib.contextmanager
    def generating(self):
        yield None  # only log-probs were kept: there is no reference model to decode with


class NoReference:
    """For reference-free losses: no reference forward at all (`logps` returns None)."""

    def logps(self, batch: PreferenceBatch) -> None:
        return None

    @contextlib.contextmanager
    def generating(self):
        yield None
