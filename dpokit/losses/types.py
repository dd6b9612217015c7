from __future__ import annotations

from typing import NamedTuple

import torch


class PreferenceLossOutput(NamedTuple):
    """Per-pair losses [B] and the implicit rewards of the chosen and rejected responses [B]
    (detached: they are for logging and accuracy, not for gradients)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
