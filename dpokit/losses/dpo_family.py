"""NeMo-Aligner's preference family: DPO, IPO and the reward-aware RPO variants, plus the SFT term.

Notation used in every docstring: per-sequence log-probs summed over response tokens,
r_w = log pi(y_w|x) - log pi_ref(y_w|x), r_l likewise for the rejected response, the log-ratio
margin h = r_w - r_l, and sigma the logistic function. Implicit rewards are beta * r (detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.losses._common import per_token, require_reference
from dpokit.losses.registry import register_loss
from dpokit.losses.types import PreferenceLossOutput


def _rewards(beta, r_w, r_l) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * r_w.detach(), beta * r_l.detach()


@register_loss("dpo", aliases={"sigmoid": {}})
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
    require_reference("dpo_loss", reference_chosen_logps, reference_rejected_logps)
    chosen_log_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratio = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_log_ratio - rejected_log_ratio)
    # logsigmoid keeps extreme margins finite where log(sigmoid(x)) would underflow to -inf.
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLossOutput(losses, *_rewards(beta, chosen_log_ratio, rejected_log_ratio))


@register_loss("ipo")
def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    average_log_probs: bool = True,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Identity Preference Optimisation (Azar et al., 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", arXiv:2310.12036, eq. 17), tau = beta:

        L = (h - 1 / (2 * beta))^2,   h = r_w / n_w - r_l / n_l   (average_log_probs=True, default)
                                       h = r_w - r_l               (average_log_probs=False)

    where n_w, n_l are the response token counts. The anchors disagree here: NeMo-Aligner squares
    the summed margin (normalising only under its global `preference_average_log_probs` switch),
    while TRL divides each log-ratio by its length, a choice it reports confirming with the IPO
    authors (the paper's results use the normalised form). We default to the normalised form
    because with summed log-probs the squared target 1/(2 beta) is not comparable across lengths;
    `average_log_probs=False` gives the summed form. Rewards are beta * (the log-ratios used in h).
    """
    require_reference("ipo_loss", reference_chosen_logps, reference_rejected_logps)
    r_w = policy_chosen_logps - reference_chosen_logps
    r_l = policy_rejected_logps - reference_rejected_logps
    if average_log_probs:
        r_w, r_l = per_token(r_w, chosen_lengths, "ipo_loss"), per_token(r_l, rejected_lengths, "ipo_loss")
    losses = (r_w - r_l - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLossOutput(losses, *_rewards(beta, r_w, r_l))


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
    return PreferenceLossOutput(losses, *_rewards(beta, r_w, r_l))


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
    return PreferenceLossOutput(losses, *_rewards(beta, r_w, r_l))


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
    return PreferenceLossOutput(losses, *_rewards(beta, r_w, r_l))


@register_loss("sft", reference_free=True)
def sft_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor | None = None,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    average_log_probs: bool = False,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Supervised (negative log-likelihood) loss on the chosen response, the auxiliary term of
    NeMo-Aligner's DPO (`sft_loss_weight`) and the "generation" term of MPO:

        L = -log pi(y_w|x)            (average_log_probs=False: summed over tokens)
        L = -log pi(y_w|x) / n_w      (average_log_probs=True: mean over the n_w response tokens)

    Rejected log-probs and the reference are ignored; the rewards are zeros (no preference).
    """
    logps = per_token(policy_chosen_logps, chosen_lengths, "sft_loss") if average_log_probs else policy_chosen_logps
    zeros = torch.zeros_like(policy_chosen_logps).detach()
    return PreferenceLossOutput(-logps, zeros, zeros.clone())
