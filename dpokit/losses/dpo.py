from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.losses.types import PreferenceLossOutput


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290), with the
    conservative-DPO label smoothing of Mitchell (2023, "A note on DPO with noisy preferences").

    With per-sequence log-probs (summed over response tokens) and the log-ratio margin

        h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)),

    the per-pair loss is

        L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h),

    where eps = label_smoothing is the assumed probability that the preference label is flipped
    (eps = 0 is plain DPO). The implicit rewards are r_w = beta * (log pi(y_w|x) - log pi_ref(y_w|x))
    and r_l likewise; they are returned detached.

    All inputs have shape [B]; returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_log_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratio = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_log_ratio - rejected_log_ratio)
    # logsigmoid keeps extreme margins finite where log(sigmoid(x)) would underflow to -inf.
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLossOutput(
        losses, beta * chosen_log_ratio.detach(), beta * rejected_log_ratio.detach()
    )
