"""One forward over a packed or prefix-shared preference batch -> per-sequence log-probs.

The batch comes from `dpokit.data.collate_packed`: several sequences per row, positions restarting
per document, and per-position `sequence_ids` naming the sequence a labelled position belongs to.
Per-sequence log-probs are segment sums of token log-probs:

    logp(seq s) = sum over positions t with sequence_ids[t] = s of log p(labels[t] | tokens <= t)

(divided by the count of such positions when `average_logps`). Only labelled positions are projected to
the vocabulary, so prompt tokens cost no output-head compute, and they are projected a chunk at a
time (`chunked_token_logps`, as the padded path), so no [tokens, V] logits tensor is held. Returns the same `PolicyLogps` as
`dpokit.training.forward.policy_logps` on the padded batch of the same pairs.
"""

from __future__ import annotations

import torch
from torch import nn

from dpokit.data.batch import PackedBatch
from dpokit.models.attention import build_attention_mask
from dpokit.training.scoring import PolicyLogps, scored_token_logps


def segment_logps(
    token_values: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int, *, average_logps: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_values [N], sequence_ids [N] (all >= 0) -> (per-sequence sums or means [S], counts [S])."""
    sums = torch.zeros(num_sequences, dtype=token_values.dtype, device=token_values.device)
    sums = sums.index_add(0, sequence_ids, token_values)
    counts = torch.bincount(sequence_ids, minlength=num_sequences)
    if (counts == 0).any():
        rows = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"sequence(s) {rows[:5]} have no response tokens to score")
    return (sums / counts if average_logps else sums), counts


def packed_policy_logps(
    model: nn.Module, batch: PackedBatch, *, average_logps: bool = False, attention_backend: str = "auto"
) -> PolicyLogps:
    """Chosen / rejected log-probs [num_pairs] of a packed (optionally prefix-shared) batch.

    `model` needs `hidden_states(tokens, positions, mask)` and `project(hidden)` (TransformerDecoder).
    attention_backend: "auto" (FlexAttention on CUDA, per-document SDPA elsewhere), "segments",
    "sdpa" (one dense boolean mask), "flex".
    """
    mask = build_attention_mask(batch.document_ids, batch.branch_ids, attention_backend)
    hidden = model.hidden_states(batch.input_ids, batch.position_ids, mask)
    sequence_ids = batch.sequence_ids.reshape(-1)
    labelled = sequence_ids >= 0
    hidden = hidden.reshape(-1, hidden.shape[-1])[labelled]
    labels = batch.labels.reshape(-1)[labelled]
    per_token = scored_token_logps(model, hidden, labels)
    num_pairs = batch.num_pairs
    logps, _ = segment_logps(per_token, sequence_ids[labelled], 2 * num_pairs, average_logps=average_logps)
    return PolicyLogps(logps[:num_pairs], logps[num_pairs:])
