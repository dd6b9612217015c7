"""Validation: preference metrics of a model over held-out batches, on one process or summed over ranks."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from dpokit.data.batch import PreferenceBatch
from dpokit.distributed.fsdp import reshard
from dpokit.losses.registry import is_reference_free
from dpokit.losses.types import PreferenceLossOutput
from dpokit.training.forward import policy_logps, preference_loss
from dpokit.training.metrics import PairMetrics, all_reduce_pair_metrics


@torch.no_grad()
def preference_eval_metrics(
    model: nn.Module,
    reference,
    batches: Iterable[PreferenceBatch],
    loss_fn: Callable,
    *,
    device,
    average_logps: bool = False,
    ld_alpha: float | None = None,
) -> PairMetrics:
    """Preference metrics summed over every pair of `batches` (model in eval mode, then restored).

    `reference` may be None, and is not run, when `loss_fn` is reference-free. A batch may carry a
    boolean `valid` [B] (padding pairs that let every rank run the same number of forwards): only
    valid pairs are counted.
    """
    was_training = model.training
    model.eval()
    metrics = PairMetrics()
    try:
        for batch in batches:
            batch = batch.to(device)
            policy = policy_logps(model, batch, average_logps=average_logps, ld_alpha=ld_alpha)
            ref = None if reference is None or is_reference_free(loss_fn) else reference.logps(batch)
            out = preference_loss(loss_fn, policy, ref, batch, average_logps=average_logps)
            valid = batch.valid
            if valid is not None:
                out = PreferenceLossOutput(*(t[valid] for t in out))
                policy = type(policy)(policy.chosen[valid], policy.rejected[valid])
            metrics.add(out, policy.chosen, policy.rejected)
    finally:
        model.train(was_training)
    return metrics


def evaluate_preference(
    model: nn.Module,
    reference,
    batches: Iterable[PreferenceBatch],
    loss_fn: Callable,
    *,
    device,
    average_logps: bool = False,
    ld_alpha: float | None = None,
) -> dict[str, float]:
    """Mean preference metrics over every pair of every rank's `batches` (one process: its own).
    Under FSDP2 each rank passes its shard from `dpokit.distributed.eval_batches`; padding pairs
    (`valid == False`) are not counted, and the means are over pairs, not over per-rank means."""
    try:
        metrics = preference_eval_metrics(
            model, reference, batches, loss_fn, device=device, average_logps=average_logps, ld_alpha=ld_alpha
        )
    finally:
        reshard(model)  # FSDP2 leaves the root gathered after a forward with no backward
    return all_reduce_pair_metrics(metrics).means()
