"""One forward over a collated preference batch -> per-sequence log-probs of chosen and rejected,
and the call of a preference loss with what it needs from the batch.

By default the log-probs never materialise the [2B, T, V] logits: the model returns its final
hidden states, only the labelled (response) positions are kept, and `chunked_token_logps` projects
them through the output head a chunk of tokens at a time, in the forward and in the backward.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from dpokit.data.batch import PackedBatch, PreferenceBatch
from dpokit.errors import DpokitError
from dpokit.logprobs import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, length_desensitized_logps, token_logps
from dpokit.losses.registry import call_loss, uses_gt_rewards
from dpokit.training.packed_forward import packed_policy_logps
from dpokit.training.scoring import PolicyLogps, scored_token_logps


def _per_token_logps(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int, materialize: bool
):
    """[2B, T] fp32 log-probs of the labels (0 where unlabelled)."""
    if not materialize and hasattr(model, "hidden_states") and hasattr(model, "output_projection"):
        hidden = model.hidden_states(input_ids)
        mask = labels != IGNORE_INDEX
        flat = scored_token_logps(model, hidden[mask], labels[mask], chunk_size=chunk_size)
        return torch.zeros(labels.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)
    return token_logps(model(input_ids), labels)


def policy_logps(
    model: nn.Module,
    batch: PreferenceBatch,
    *,
    average_logps: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    materialize_logits: bool = False,
    ld_alpha: float | None = None,
) -> PolicyLogps:
    """Chosen rows are the first half of the batch, rejected rows the second (see collate).

    average_logps: mean over response tokens instead of the sum.
    chunk_size: tokens per chunk of logits in the memory-lean path (see `chunked_token_logps`).
    materialize_logits: compute full logits with `model(input_ids)` and log-softmax them instead
        (the reference path; also used automatically for models without `hidden_states`).
    ld_alpha: LD-DPO length desensitisation (`length_desensitized_logps`); None = plain sum.

    A `PackedBatch` (packed or prefix-shared, from `dpokit.data.collate_packed`)
    goes through `dpokit.training.packed_forward.packed_policy_logps` instead.
    """
    if isinstance(batch, PackedBatch):
        if ld_alpha is not None:
            raise ValueError("ld_alpha is not supported on packed batches")
        return packed_policy_logps(model, batch, average_logps=average_logps)
    labels = batch.labels
    counts = (labels != IGNORE_INDEX).sum(-1)
    if (counts == 0).any():
        rows = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"sequence(s) {rows[:5]} have no response tokens to score")
    per_token = _per_token_logps(model, batch.input_ids, labels, chunk_size, materialize_logits)
    num_pairs = batch.num_pairs
    if ld_alpha is None:
        logps = per_token.sum(-1)
    else:
        logps = length_desensitized_logps(per_token, labels, num_pairs, ld_alpha=ld_alpha)
    if average_logps:
        logps = logps / counts
    return PolicyLogps(logps[:num_pairs], logps[num_pairs:])


def preference_loss(
    loss_fn: Callable,
    policy: PolicyLogps,
    reference: PolicyLogps | None,
    batch: PreferenceBatch,
    *,
    average_logps: bool = False,
):
    """Call `loss_fn` on the batch's log-probs with whatever else it takes (`dpokit.losses.call_loss`):
    response token counts, and per-pair ground-truth rewards when the batch carries
    `chosen_reward` / `rejected_reward` tensors [B] (RPO). `reference` is None for reference-free
    losses. average_logps: the log-probs are already per-token means, so the losses get counts of 1
    (a length-normalising loss must not divide twice).
    """
    chosen_lengths, rejected_lengths = batch.response_lengths()
    if average_logps:
        chosen_lengths, rejected_lengths = torch.ones_like(chosen_lengths), torch.ones_like(rejected_lengths)
    return call_loss(
        loss_fn,
        policy.chosen,
        policy.rejected,
        None if reference is None else reference.chosen,
        None if reference is None else reference.rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        chosen_gt_rewards=batch.chosen_reward,
        rejected_gt_rewards=batch.rejected_reward,
    )


def check_gt_rewards(loss_fn: Callable, pairs: Sequence[dict], *, dataset: str = "train_dataset") -> None:
    """Refuse to train a reward-aware loss (RPO, ...) on pairs without ground-truth rewards: it
    would silently optimise towards the loss's default rewards (1 and 0) instead."""
    if not uses_gt_rewards(loss_fn):
        return
    with_rewards = sum("chosen_reward" in pair for pair in pairs)
    if with_rewards == len(pairs):
        return
    which = "no pair of" if with_rewards == 0 else f"only {with_rewards} of {len(pairs)} pairs of"
    verb = "carries" if with_rewards == 0 else "carry"
    raise DpokitError(
        f"loss: reads ground-truth rewards (chosen_reward / rejected_reward), but {which} {dataset} "
        f"{verb} them; it would train on its default rewards. Add them to the data or choose a loss without rewards"
    )
