from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from dpokit.losses.registry import is_reference_free
from dpokit.training.forward import policy_logps, preference_loss
from dpokit.training.metrics import PairMetrics


def move_batch(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_preference(
    model: nn.Module, reference, batches: Iterable[dict], loss_fn: Callable, *, device, average_logps: bool = False
) -> dict[str, float]:
    """Mean preference metrics over every pair of `batches` (model in eval mode, then restored).
    `reference` may be None, and is not run, when `loss_fn` is reference-free."""
    was_training = model.training
    model.eval()
    metrics = PairMetrics()
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            policy = policy_logps(model, batch, average=average_logps)
            ref = None if reference is None or is_reference_free(loss_fn) else reference.logps(batch)
            out = preference_loss(loss_fn, policy, ref, batch, averaged=average_logps)
            metrics.add(out, policy.chosen, policy.rejected)
    finally:
        model.train(was_training)
    return metrics.means()
