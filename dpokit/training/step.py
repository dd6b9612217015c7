"""The training step of every recipe (one device or FSDP2): gradient accumulation, then clip,
refuse non-finite values and update.

Normalisation over the global batch. With N pairs in an optimizer step over all micro-batches of
all W ranks, the gradient should be that of the per-pair mean

    L = (1 / N) * sum_{ranks r} sum_{micro-batches m} sum_{pairs i in (r, m)} loss_i.

FSDP averages gradients over ranks (divides the sum by W), so each micro-batch backpropagates
`loss.sum() * W / N`. N is all-reduced before the first backward, so uneven micro-batches are
weighted per pair too (the bug of averaging per micro-batch, then per rank, which weights pairs in
small micro-batches up). Packed micro-batches (`dpokit.distributed.sampler.PackedGlobalBatchSampler`: a pack holds
a varying number of pairs) rely on exactly that; `policy_logps` and every reference dispatch to the
packed forward on their own.

MoE policies (`dpokit.models.moe`) add the router's load-balancing loss of each micro-batch's
policy forward, weighted by config.json's router_aux_loss_coef and, like the pair losses, by the
micro-batch's pair count: the step optimises L + coef * (pair-weighted mean of the micro-batch
aux losses), reported unweighted as `router_aux_loss`. With one micro-batch on one device that is
transformers' `loss + router_aux_loss_coef * aux_loss` (the aux term itself is a ratio of sums over
one forward's tokens, so it is computed per forward, as transformers does). The tokens counted
are the batch's real tokens, in every layout (`dpokit.training.router`).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from dpokit.distributed.group import all_reduce_sum, get_world_size
from dpokit.errors import DpokitError
from dpokit.models.moe import route_statistics
from dpokit.training.forward import policy_logps, preference_loss
from dpokit.training.metrics import PairMetrics, all_reduce_pair_metrics
from dpokit.training.router import routed_token_weights, router_aux_loss_coef


class StepTimer:
    """Accumulates wall time per phase (synchronising CUDA so the numbers mean something), and
    the wall time of the whole optimizer step since `begin_step`."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.step_started = time.perf_counter()

    def begin_step(self) -> None:
        """A new optimizer step: the phase totals start from zero, the step clock restarts."""
        self.step_started = time.perf_counter()
        self.seconds.clear()

    def step_seconds(self) -> float:
        """Wall time since `begin_step`."""
        return time.perf_counter() - self.step_started

    def sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                timer.sync()
                self.started = time.perf_counter()

            def __exit__(self, *exc):
                timer.sync()
                timer.seconds[name] += time.perf_counter() - self.started

        return _Phase()


def _set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def accumulate_gradients(
    model: nn.Module,
    reference,
    micro_batches: list[dict],
    loss_fn: Callable,
    *,
    device: torch.device,
    average_logps: bool = False,
    ld_alpha: float | None = None,
    timer: StepTimer | None = None,
) -> tuple[PairMetrics, int]:
    """Forward + backward over this rank's micro-batches of one optimizer step, with the loss
    normalised over the global batch (module docstring). Returns the step's metrics summed over
    all ranks and the token count of the step (every rank). Gradients are reduced across ranks only after the
    last micro-batch."""
    timer = timer or StepTimer(device)
    # A reference that copies weights (the state-dict swap) times its copies: they are reported
    # as their own "swap" phase, out of the "reference" one they happen in.
    copy_seconds = getattr(reference, "seconds", None)
    swap_before = copy_seconds.get("swap", 0.0) if copy_seconds is not None else 0.0
    local_pairs = sum(b.num_pairs for b in micro_batches)
    global_pairs, tokens = all_reduce_sum([local_pairs, sum(b.num_tokens for b in micro_batches)])
    scale = get_world_size() / global_pairs
    metrics = PairMetrics()
    aux_coef = router_aux_loss_coef(model)
    for m, batch in enumerate(micro_batches):
        batch = batch.to(device)
        with timer("reference"):
            ref = reference.logps(batch)  # before the policy forward: nothing of it is saved for backward
        _set_gradient_sync(model, m == len(micro_batches) - 1)
        with timer("policy"):
            # MoE: the router's load-balancing loss of the policy forward (not the reference's).
            with route_statistics(model, routed_token_weights(batch)) as router:
                policy = policy_logps(model, batch, average_logps=average_logps, ld_alpha=ld_alpha)
            out = preference_loss(loss_fn, policy, ref, batch, average_logps=average_logps)
            objective = out.losses.sum()
            if router is not None:
                aux = router.loss()
                objective = objective + aux_coef * aux * batch.num_pairs
            (objective * scale).backward()
        metrics.add(out, policy.chosen, policy.rejected)
        if router is not None:
            metrics.sums["router_aux_loss"] += aux.item() * batch.num_pairs
    _set_gradient_sync(model, True)
    if copy_seconds is not None:
        swap = copy_seconds.get("swap", 0.0) - swap_before
        timer.seconds["reference"] -= swap
        timer.seconds["swap"] += swap
    return all_reduce_pair_metrics(metrics), int(tokens)


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
