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
    average_logps: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, T, V], labels [N, T] (already aligned: logits[:, t] predicts labels[:, t]) ->
    (log-probs [N] summed over labelled tokens, or their mean if `average_logps`; token counts [N]).

    A sequence with no labelled token is an error: its log-prob would be meaningless.
    """
    counts = (labels != ignore_index).sum(-1)
    if (counts == 0).any():
        rows = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"sequence(s) {rows[:5]} have no response tokens to score")
    per_token = token_logps(logits, labels, ignore_index)
    summed = per_token.sum(-1)
    return (summed / counts if average_logps else summed), counts


def length_desensitized_logps(
    per_token_logps: torch.Tensor,
    labels: torch.Tensor,
    num_pairs: int,
    *,
    ld_alpha: float,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """LD-DPO's sequence log-probs (Liu et al., 2024, "Length Desensitization in Direct Preference
    Optimization", arXiv:2409.06411, eq. 9). For a pair whose responses have n_w and n_l tokens,
    with the shared length m = min(n_w, n_l),

        log pi_ld(y|x) = sum_{t <= m} log p(y_t) + ld_alpha * sum_{t > m} log p(y_t),

    i.e. the tokens beyond the shorter response count with weight ld_alpha in [0, 1] (1 = plain sum).
    per_token_logps, labels: [2B, T], chosen rows first (the collate layout); returns [2B]. Apply
    it to the policy and the reference alike.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    mask = labels != ignore_index
    position = mask.cumsum(-1)  # 1-based index of each response token within its response
    counts = mask.sum(-1)
    shared = torch.minimum(counts[:num_pairs], counts[num_pairs:]).repeat(2)
    weight = torch.where(position <= shared[:, None], 1.0, ld_alpha) * mask
    return (per_token_logps * weight.to(per_token_logps.dtype)).sum(-1)
