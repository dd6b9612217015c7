"""From logits and labels to per-token and per-sequence log-probabilities."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log p(labels[..., t] | logits[..., t, :]) for every position; 0 where labels == ignore_index.

    Computed in fp32 as logit[label] - logsumexp(logits), which avoids materialising a second
    [.., T, V] tensor of log-softmax values.
    """
    logits = logits.float()
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, 0)
    picked = torch.gather(logits, -1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked - torch.logsumexp(logits, dim=-1), 0.0)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, T, V], labels [N, T] (already aligned: logits[:, t] predicts labels[:, t]) ->
    (log-probs [N] summed over labelled tokens, or their mean if `average`; token counts [N]).

    A sequence with no labelled token is an error: its log-prob would be meaningless.
    """
    counts = (labels != ignore_index).sum(-1)
    if (counts == 0).any():
        rows = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"sequence(s) {rows[:5]} have no response tokens to score")
    per_token = token_logps(logits, labels, ignore_index)
    summed = per_token.sum(-1)
    return (summed / counts if average else summed), counts
