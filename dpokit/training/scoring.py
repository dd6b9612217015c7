"""Log-probs of labelled positions from final hidden states, and the per-pair result type.

`scored_token_logps` projects only the positions that are scored, a chunk at a time through the
model's `output_projection` (`chunked_token_logps`), so no [tokens, vocab] logits tensor is held.
The padded forward (`forward.policy_logps`) and the packed one (`packed_forward`) both use it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dpokit.logprobs import DEFAULT_CHUNK_SIZE, chunked_token_logps, token_logps


class PolicyLogps(NamedTuple):
    chosen: torch.Tensor  # [B]
    rejected: torch.Tensor  # [B]


def scored_token_logps(
    model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """[N] fp32 log-probs of `labels` [N] from the final hidden states [N, D] of the scored
    positions: a chunk at a time through `model.output_projection` when the model has one and
    its head is a matmul, else from the full logits of `model.project`."""
    projection = model.output_projection(hidden) if hasattr(model, "output_projection") else None
    if projection is not None:
        softcap = getattr(model, "logit_softcap", None)
        return chunked_token_logps(*projection, labels, chunk_size=chunk_size, softcap=softcap)
    return token_logps(model.project(hidden), labels)
