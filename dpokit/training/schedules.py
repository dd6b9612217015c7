from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_schedule(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup from 0 to the base LR over `warmup_steps`, then cosine decay to
    `min_lr_ratio * base LR` at `total_steps`:

        lr(s) = base * (s + 1) / (warmup + 1)                         for s < warmup
        lr(s) = base * (min + (1 - min) * (1 + cos(pi * p)) / 2),     p = (s - warmup) / (total - warmup)

    A warmup as long as the run or longer never reaches the base LR and never decays; recipes
    print `warmup_warning` for it.
    """
    if total_steps <= 0 or warmup_steps < 0:
        raise ValueError(f"need total_steps > 0 and warmup_steps >= 0, got {total_steps} and {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_warning(*, warmup_steps: int, total_steps: int) -> str | None:
    """A one-line warning when a linear warmup of `warmup_steps` does not end within a run of
    `total_steps` (the peak LR is then (total / (warmup + 1)) of the base LR), else None."""
    if warmup_steps < total_steps:
        return None
    peak = total_steps / (warmup_steps + 1)
    return (
        f"warmup_steps={warmup_steps} is not below the run's {total_steps} steps: the learning rate "
        f"rises to only {peak:.0%} of its base value and never decays; lower warmup_steps or run longer"
    )
