"""Reward-aware Preference Optimisation (RPO): the implicit reward margin is fitted to ground-truth
reward margins from the data (squared distance, forward or backward KL between Bernoulli
preferences).

Notation used in every docstring: per-sequence log-probs summed over response tokens,
r_w = log pi(y_w|x) - log pi_ref(y_w|x), r_l likewise for the rejected response, the log-ratio
margin h = r_w - r_l, sigma the logistic function, n_w and n_l the response token counts.
Implicit rewards returned are beta * r_w and beta * r_l, detached, unless a docstring says otherwise.
r*_w, r*_l are the per-pair ground-truth rewards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.losses._common import preference_output, require_reference
from dpokit.losses.registry import register_loss
from dpokit.losses.types import PreferenceLossOutput


def _gt_margin(chosen_gt_rewards, rejected_gt_rewards, gt_reward_scale, like: torch.Tensor) -> torch.Tensor:
    chosen = torch.as_tensor(chosen_gt_rewards, dtype=like.dtype, device=like.device)
    rejected = torch.as_tensor(rejected_gt_rewards, dtype=like.dtype, device=like.device)
    return (gt_reward_scale * (chosen - rejected)).expand_as(like)


@register_loss("rpo_sq")
def rpo_sq_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    gt_reward_scale: float = 1.0,
    chosen_gt_rewards: torch.Tensor | float = 1.0,
    rejected_gt_rewards: torch.Tensor | float = 0.0,
) -> PreferenceLossOutput:
    """Reward-aware Preference Optimisation, squared distance (Nvidia, "Nemotron-4 340B Technical
    Report", arXiv:2406.11704, sec. 3.4.2; NeMo-Aligner `rpo_sq`). The policy's implicit reward
    margin is regressed onto the scaled ground-truth reward margin:

        L = (beta * h - eta * (r*_w - r*_l))^2,   eta = gt_reward_scale,

    with r*_w, r*_l the per-pair ground-truth rewards (from a reward model or labellers; defaults
    1 and 0 as in NeMo-Aligner, used when the data has none).
    """
    require_reference("rpo_sq_loss", reference_chosen_logps, reference_rejected_logps)
    r_w = policy_chosen_logps - reference_chosen_logps
    r_l = policy_rejected_logps - reference_rejected_logps
    target = _gt_margin(chosen_gt_rewards, rejected_gt_rewards, gt_reward_scale, r_w)
    losses = (beta * (r_w - r_l) - target) ** 2
    return preference_output(losses, beta, r_w, r_l)


def _bernoulli_logs(beta, r_w, r_l, chosen_gt_rewards, rejected_gt_rewards, gt_reward_scale):
    policy_margin = beta * (r_w - r_l)
    gt_margin = _gt_margin(chosen_gt_rewards, rejected_gt_rewards, gt_reward_scale, r_w)
    log_p, log_1mp = F.logsigmoid(policy_margin), F.logsigmoid(-policy_margin)
    log_q, log_1mq = F.logsigmoid(gt_margin), F.logsigmoid(-gt_margin)
    return log_p, log_1mp, log_q, log_1mq


@register_loss("rpo_fwd_kl")
def rpo_fwd_kl_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    gt_reward_scale: float = 1.0,
    chosen_gt_rewards: torch.Tensor | float = 1.0,
    rejected_gt_rewards: torch.Tensor | float = 0.0,
) -> PreferenceLossOutput:
    """Reward-aware Preference Optimisation with the Bernoulli "forward" KL (NeMo-Aligner
    `rpo_fwd_kl`; Nemotron-4 340B report, arXiv:2406.11704). With the policy's preference
    probability p = sigma(beta * h) and the ground truth's q = sigma(eta * (r*_w - r*_l)):

        L = KL(Bern(p) || Bern(q)) = p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q)).

    (NeMo-Aligner's naming: "forward" puts the policy distribution first.) Ground-truth rewards
    default to 1 and 0; eta = gt_reward_scale.
    """
    require_reference("rpo_fwd_kl_loss", reference_chosen_logps, reference_rejected_logps)
    r_w = policy_chosen_logps - reference_chosen_logps
    r_l = policy_rejected_logps - reference_rejected_logps
    log_p, log_1mp, log_q, log_1mq = _bernoulli_logs(
        beta, r_w, r_l, chosen_gt_rewards, rejected_gt_rewards, gt_reward_scale
    )
    losses = log_p.exp() * (log_p - log_q) + log_1mp.exp() * (log_1mp - log_1mq)
    return preference_output(losses, beta, r_w, r_l)


@register_loss("rpo_bwd_kl")
def rpo_bwd_kl_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    gt_reward_scale: float = 1.0,
    chosen_gt_rewards: torch.Tensor | float = 1.0,
    rejected_gt_rewards: torch.Tensor | float = 0.0,
) -> PreferenceLossOutput:
    """Reward-aware Preference Optimisation with the Bernoulli "backward" KL (NeMo-Aligner
    `rpo_bwd_kl`; Nemotron-4 340B report, arXiv:2406.11704). With p = sigma(beta * h) and
    q = sigma(eta * (r*_w - r*_l)):

        L = KL(Bern(q) || Bern(p)) = q (log q - log p) + (1 - q) (log(1 - q) - log(1 - p)).

    With q = 1 (a hard label) this is exactly DPO's -log sigma(beta * h).
    """
    require_reference("rpo_bwd_kl_loss", reference_chosen_logps, reference_rejected_logps)
    r_w = policy_chosen_logps - reference_chosen_logps
    r_l = policy_rejected_logps - reference_rejected_logps
    log_p, log_1mp, log_q, log_1mq = _bernoulli_logs(
        beta, r_w, r_l, chosen_gt_rewards, rejected_gt_rewards, gt_reward_scale
    )
    losses = log_q.exp() * (log_q - log_p) + log_1mq.exp() * (log_1mq - log_1mp)
    return preference_output(losses, beta, r_w, r_l)
