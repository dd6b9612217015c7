from __future__ import annotations

from typing import NamedTuple

import torch


class PreferenceLossOutput(NamedTuple):
    """Per-pair losses [B] and the implicit rewards of the chosen and rejected responses [B]
    (detached: they are for logging and accuracy, not for gradients)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class CombinedLossOutput(NamedTuple):
    """What `combined_loss` returns: `losses` [B] is the total that is backpropagated,
    preference_weight * preference_losses + sft_weight * sft_losses; the parts are kept so the
    metrics can report them separately (`preference_losses` already includes the term weights)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    preference_losses: torch.Tensor
    sft_losses: torch.Tensor
