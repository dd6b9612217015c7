"""Losses of the log-ratio margin h: DPO, IPO and the variants that change the link function
(hinge, robust, EXO, length-normalised, DiscoPOP) or compare sorted margins across the batch (AOT).

Notation used in every docstring: per-sequence log-probs summed over response tokens,
r_w = log pi(y_w|x) - log pi_ref(y_w|x), r_l likewise for the rejected response, the log-ratio
margin h = r_w - r_l, sigma the logistic function, n_w and n_l the response token counts.
Implicit rewards returned are beta * r_w and beta * r_l, detached, unless a docstring says otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpokit.losses._common import per_token, preference_output, ratios, require_reference, smoothed_sigmoid
from dpokit.losses.registry import register_loss
from dpokit.losses.types import PreferenceLossOutput


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
    return preference_output(losses, beta, chosen_log_ratio, rejected_log_ratio)


@register_loss("ipo")
def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    average_logps: bool = True,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Identity Preference Optimisation (Azar et al., 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", arXiv:2310.12036, eq. 17), tau = beta:

        L = (h - 1 / (2 * beta))^2,   h = r_w / n_w - r_l / n_l   (average_logps=True, default)
                                       h = r_w - r_l               (average_logps=False)

    where n_w, n_l are the response token counts. The anchors disagree here: NeMo-Aligner squares
    the summed margin (normalising only under its global `preference_average_logps` switch),
    while TRL divides each log-ratio by its length, a choice it reports confirming with the IPO
    authors (the paper's results use the normalised form). We default to the normalised form
    because with summed log-probs the squared target 1/(2 beta) is not comparable across lengths;
    `average_logps=False` gives the summed form. Rewards are beta * (the log-ratios used in h).
    """
    require_reference("ipo_loss", reference_chosen_logps, reference_rejected_logps)
    r_w = policy_chosen_logps - reference_chosen_logps
    r_l = policy_rejected_logps - reference_rejected_logps
    if average_logps:
        r_w, r_l = per_token(r_w, chosen_lengths, "ipo_loss"), per_token(r_l, rejected_lengths, "ipo_loss")
    losses = (r_w - r_l - 1.0 / (2.0 * beta)) ** 2
    return preference_output(losses, beta, r_w, r_l)


@register_loss("hinge")
def hinge_loss(
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *, beta: float
) -> PreferenceLossOutput:
    """Hinge loss on the log-ratio margin, as in SLiC (Zhao et al., 2023, "SLiC-HF",
    arXiv:2305.10425), with beta = 1/margin:

        L = max(0, 1 - beta * h).
    """
    r_w, r_l = ratios(
        "hinge_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return preference_output(torch.relu(1 - beta * (r_w - r_l)), beta, r_w, r_l)


@register_loss("robust")
def robust_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Robust DPO (Chowdhury et al., 2024, "Provably Robust DPO", arXiv:2403.00409): an unbiased
    estimate of the clean-label loss when labels flip with probability eps = label_smoothing:

        L = ((1 - eps) * -log sigma(beta h) - eps * -log sigma(-beta h)) / (1 - 2 eps).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    r_w, r_l = ratios(
        "robust_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (r_w - r_l)
    losses = ((1 - label_smoothing) * -F.logsigmoid(z) - label_smoothing * -F.logsigmoid(-z)) / (
        1 - 2 * label_smoothing
    )
    return preference_output(losses, beta, r_w, r_l)


@register_loss("exo_pair")
def exo_pair_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float,
    label_smoothing: float = 1e-3,
) -> PreferenceLossOutput:
    """EXO for pairs (Ji et al., 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment", arXiv:2402.00856, eq. 16): the reverse KL from the policy's pairwise preference
    distribution to a smoothed label distribution (1 - eps, eps):

        L = sigma(beta h) (log sigma(beta h) - log(1 - eps)) + sigma(-beta h) (log sigma(-beta h) - log eps).

    eps must be in (0, 1); TRL replaces eps = 0 by 1e-3, which is our default.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1), got {label_smoothing}")
    r_w, r_l = ratios(
        "exo_pair_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (r_w - r_l)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    losses = log_qw.exp() * (log_qw - math.log1p(-label_smoothing)) + log_ql.exp() * (
        log_ql - math.log(label_smoothing)
    )
    return preference_output(losses, beta, r_w, r_l)


@register_loss("sigmoid_norm")
def sigmoid_norm_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float,
    chosen_lengths=None,
    rejected_lengths=None,
) -> PreferenceLossOutput:
    """Length-normalised DPO (Lambert et al., 2024, "Tulu 3", arXiv:2411.15124, sec. 5; TRL
    `sigmoid_norm`): DPO on per-token log-ratios,

        L = -log sigma(beta (r_w / n_w - r_l / n_l)).

    Rewards are beta * r / n. Typical beta is much larger than DPO's (Tulu 3 uses 5).
    """
    r_w, r_l = ratios(
        "sigmoid_norm_loss",
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
    )
    r_w, r_l = (
        per_token(r_w, chosen_lengths, "sigmoid_norm_loss"),
        per_token(r_l, rejected_lengths, "sigmoid_norm_loss"),
    )
    return preference_output(-F.logsigmoid(beta * (r_w - r_l)), beta, r_w, r_l)


@register_loss("aot")
def aot_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Alignment via Optimal Transport, paired (Melnyk et al., 2024, "Distributional Preference
    Alignment of LLMs via Optimal Transport", arXiv:2406.05882). With the batch's policy and
    reference log-odds sorted independently, u = sort(log pi(y_w) - log pi(y_l)) and
    v = sort(log pi_ref(y_w) - log pi_ref(y_l)), the k-th loss is the smoothed DPO loss of their gap:

        L_k = -(1 - eps) log sigma(beta (u_k - v_k)) - eps log sigma(-beta (u_k - v_k)).

    Because of the sort, L_k is not the loss of pair k: only the batch mean is meaningful.
    """
    r_w, r_l = ratios(
        "aot_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    delta = (
        torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0).values
        - torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0).values
    )
    return preference_output(smoothed_sigmoid(beta * delta, label_smoothing), beta, r_w, r_l)


@register_loss("aot_unpaired")
def aot_unpaired_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Alignment via Optimal Transport, unpaired (Melnyk et al., 2024, arXiv:2406.05882): the
    chosen and rejected log-ratios are sorted independently over the batch, and

        L_k = -(1 - eps) log sigma(beta (sort(r_w)_k - sort(r_l)_k)) - eps log sigma(-beta (...)).

    Only the batch mean is meaningful (the k-th loss mixes different pairs).
    """
    r_w, r_l = ratios(
        "aot_unpaired_loss",
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
    )
    delta = torch.sort(r_w, dim=0).values - torch.sort(r_l, dim=0).values
    return preference_output(smoothed_sigmoid(beta * delta, label_smoothing), beta, r_w, r_l)


@register_loss("discopop")
def discopop_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float,
    tau: float = 0.05,
) -> PreferenceLossOutput:
    """DiscoPOP, the log-ratio modulated loss found by LLM-driven discovery (Chris Lu et al.,
    2024, "Discovering Preference Optimization Algorithms with and for Large Language Models",
    arXiv:2406.08414, eq. 5). With z = beta h and the mixing weight m = sigma(z / tau):

        L = (1 - m) * -log sigma(z) + m * exp(-z).

    The exponential term is evaluated as exp(log sigma(z / tau) - z), which stays finite for very
    negative z where exp(-z) alone would overflow (m underflows to 0 there; inf * 0 is nan).
    """
    r_w, r_l = ratios(
        "discopop_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (r_w - r_l)
    losses = torch.sigmoid(-z / tau) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)
    return preference_output(losses, beta, r_w, r_l)
