from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from dpokit.training.forward import policy_logps
from dpokit.training.metrics import PairMetrics


def move_batch(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_preference(
    model: nn.Module, reference, batches: Iterable[dict], loss_fn: Callable, *, device, average_logps: bool = False
) -> dict[str, float]:
    """Mean preference metrics over every pair of `batches` (model in eval mode, then restored)."""
    was_training = model.training
    model.eval()
    metrics = PairMetrics()
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            policy = policy_logps(model, batch, average=average_logps)
            ref = reference.logps(batch)
            out = loss_fn(policy.chosen, policy.rejected, ref.chosen, ref.rejected)
            metrics.add(out, policy.chosen, policy.rejected)
    finally:
        model.train(was_training)
    return metrics.means()
