"""The end of every training step, shared by the recipes: clip, refuse non-finite values, update."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from dpokit.errors import DpokitError


def clip_and_step(
    params: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    max_grad_norm: float,
    loss: float,
    step: int,
    last_checkpoint: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """Clip the gradient norm to `max_grad_norm`, then step the optimizer and the LR schedule.

    A non-finite `loss` or gradient norm stops the run before the update, with an error naming the
    step (and, given `last_checkpoint`, the last good checkpoint). Returns (grad norm, LR used).
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
        message = (
            f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm.item()}); "
            f"stopped before the optimizer step"
        )
        if last_checkpoint is not None:
            message += f". Last good checkpoint: {last_checkpoint() or 'none'}"
        raise DpokitError(message)
    lr = float(scheduler.get_last_lr()[0])  # torchao optimizers keep lr as a tensor
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item(), lr
