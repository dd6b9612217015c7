"""One forward over a collated preference batch -> per-sequence log-probs of chosen and rejected."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dpokit.losses.logprobs import sequence_logps


class PolicyLogps(NamedTuple):
    chosen: torch.Tensor  # [B]
    rejected: torch.Tensor  # [B]


def policy_logps(model: nn.Module, batch: dict, *, average: bool = False) -> PolicyLogps:
    """Chosen rows are the first half of the batch, rejected rows the second (see collate)."""
    logits = model(batch["input_ids"])
    logps, _ = sequence_logps(logits, batch["labels"], average=average)
    num_pairs = batch["num_pairs"]
    return PolicyLogps(logps[:num_pairs], logps[num_pairs:])
