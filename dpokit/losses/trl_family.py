"""TRL's DPO variants (`DPOConfig.loss_type`) as pure functions, plus the f-divergence family.

Notation: per-sequence log-probs summed over response tokens; r_w = log pi(y_w|x) - log pi_ref(y_w|x),
r_l likewise; h = r_w - r_l; sigma the logistic function; n_w, n_l the response token counts.
Rewards returned are beta * r_w and beta * r_l, detached, unless a docstring says otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpokit.losses._common import per_token, require_reference
from dpokit.losses.registry import register_loss
from dpokit.losses.types import PreferenceLossOutput

# exp() arguments are capped here (forward-KL and alpha scores): e^50 ~ 5e21 is still finite in
# fp32 and in a squared/sigmoid loss, and a log-ratio that large is already a diverged run.
MAX_EXP = 50.0


def _ratios(name, pc, pr, rc, rr):
    require_reference(name, rc, rr)
    return pc - rc, pr - rr


def _out(losses, beta, r_w, r_l) -> PreferenceLossOutput:
    return PreferenceLossOutput(losses, beta * r_w.detach(), beta * r_l.detach())


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@register_loss("hinge")
def hinge_loss(pc, pr, rc, rr, *, beta: float) -> PreferenceLossOutput:
    """Hinge loss on the log-ratio margin, as in SLiC (Zhao et al., 2023, "SLiC-HF",
    arXiv:2305.10425), with beta = 1/margin:

        L = max(0, 1 - beta * h).
    """
    r_w, r_l = _ratios("hinge_loss", pc, pr, rc, rr)
    return _out(torch.relu(1 - beta * (r_w - r_l)), beta, r_w, r_l)


@register_loss("robust")
def robust_loss(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """Robust DPO (Chowdhury et al., 2024, "Provably Robust DPO", arXiv:2403.00409): an unbiased
    estimate of the clean-label loss when labels flip with probability eps = label_smoothing:

        L = ((1 - eps) * -log sigma(beta h) - eps * -log sigma(-beta h)) / (1 - 2 eps).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    r_w, r_l = _ratios("robust_loss", pc, pr, rc, rr)
    z = beta * (r_w - r_l)
    losses = ((1 - label_smoothing) * -F.logsigmoid(z) - label_smoothing * -F.logsigmoid(-z)) / (
        1 - 2 * label_smoothing
    )
    return _out(losses, beta, r_w, r_l)


@register_loss("exo_pair")
def exo_pair_loss(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 1e-3) -> PreferenceLossOutput:
    """EXO for pairs (Ji et al., 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment", arXiv:2402.00856, eq. 16): the reverse KL from the policy's pairwise preference
    distribution to a smoothed label distribution (1 - eps, eps):

        L = sigma(beta h) (log sigma(beta h) - log(1 - eps)) + sigma(-beta h) (log sigma(-beta h) - log eps).

    eps must be in (0, 1); TRL replaces eps = 0 by 1e-3, which is our default.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1), got {label_smoothing}")
    r_w, r_l = _ratios("exo_pair_loss", pc, pr, rc, rr)
    z = beta * (r_w - r_l)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    losses = log_qw.exp() * (log_qw - math.log1p(-label_smoothing)) + log_ql.exp() * (
        log_ql - math.log(label_smoothing)
    )
    return _out(losses, beta, r_w, r_l)


@register_loss("nca_pair")
def nca_pair_loss(pc, pr, rc, rr, *, beta: float) -> PreferenceLossOutput:
    """Noise Contrastive Alignment, pairwise (Chen et al., 2024, arXiv:2402.05369):

    L = -log sigma(beta r_w) - 0.5 log sigma(-beta r_w) - 0.5 log sigma(-beta r_l).
    """
    r_w, r_l = _ratios("nca_pair_loss", pc, pr, rc, rr)
    losses = -F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w) - 0.5 * F.logsigmoid(-beta * r_l)
    return _out(losses, beta, r_w, r_l)


@register_loss("bco_pair")
def bco_pair_loss(pc, pr, rc, rr, *, beta: float, reward_shift: float | torch.Tensor = 0.0) -> PreferenceLossOutput:
    """Binary Classifier Optimisation on pairs (Jung et al., 2024, arXiv:2404.04656):

        L = -log sigma(beta r_w - delta) - log sigma(-(beta r_l - delta)).

    delta = reward_shift. The paper (and older TRL) uses a running mean of the rewards for delta,
    which is state; a pure function takes it as an input (current TRL uses delta = 0, our default).
    """
    r_w, r_l = _ratios("bco_pair_loss", pc, pr, rc, rr)
    losses = -F.logsigmoid(beta * r_w - reward_shift) - F.logsigmoid(-(beta * r_l - reward_shift))
    return _out(losses, beta, r_w, r_l)


@register_loss("sppo_hard")
def sppo_hard_loss(pc, pr, rc, rr, *, beta: float) -> PreferenceLossOutput:
    """Self-Play Preference Optimisation with hard win probabilities (Wu et al., 2024,
    arXiv:2405.00675, eq. 4.7 with P = 1 for the winner, 0 for the loser; eta = 1/beta):

        L = (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2.
    """
    r_w, r_l = _ratios("sppo_hard_loss", pc, pr, rc, rr)
    losses = (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2
    return _out(losses, beta, r_w, r_l)


@register_loss("aot")
def aot_loss(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """Alignment via Optimal Transport, paired (Melnyk et al., 2024, "Distributional Preference
    Alignment of LLMs via Optimal Transport", arXiv:2406.05882). With the batch's policy and
    reference log-odds sorted independently, u = sort(log pi(y_w) - log pi(y_l)) and
    v = sort(log pi_ref(y_w) - log pi_ref(y_l)), the k-th loss is the smoothed DPO loss of their gap:

        L_k = -(1 - eps) log sigma(beta (u_k - v_k)) - eps log sigma(-beta (u_k - v_k)).

    Because of the sort, L_k is not the loss of pair k: only the batch mean is meaningful.
    """
    r_w, r_l = _ratios("aot_loss", pc, pr, rc, rr)
    delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    return _out(_smoothed_sigmoid(beta * delta, label_smoothing), beta, r_w, r_l)


@register_loss("aot_unpaired")
def aot_unpaired_loss(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """Alignment via Optimal Transport, unpaired (Melnyk et al., 2024, arXiv:2406.05882): the
    chosen and rejected log-ratios are sorted independently over the batch, and

        L_k = -(1 - eps) log sigma(beta (sort(r_w)_k - sort(r_l)_k)) - eps log sigma(-beta (...)).

    Only the batch mean is meaningful (the k-th loss mixes different pairs).
    """
    r_w, r_l = _ratios("aot_unpaired_loss", pc, pr, rc, rr)
    delta = torch.sort(r_w, dim=0).values - torch.sort(r_l, dim=0).values
    return _out(_smoothed_sigmoid(beta * delta, label_smoothing), beta, r_w, r_l)


@register_loss("apo_zero")
def apo_zero_loss(pc, pr, rc, rr, *, beta: float) -> PreferenceLossOutput:
    """Anchored Preference Optimisation, zero anchor (D'Oosterlinck et al., 2024, "Anchored
    Preference Optimization and Contrastive Revisions", arXiv:2408.06266, eq. 7), for chosen
    responses better than the model's own: push the chosen likelihood up, the rejected one down.

        L = (1 - sigma(beta r_w)) + sigma(beta r_l).
    """
    r_w, r_l = _ratios("apo_zero_loss", pc, pr, rc, rr)
    return _out(1 - torch.sigmoid(beta * r_w) + torch.sigmoid(beta * r_l), beta, r_w, r_l)


@register_loss("apo_down")
def apo_down_loss(pc, pr, rc, rr, *, beta: float) -> PreferenceLossOutput:
    """Anchored Preference Optimisation, down anchor (D'Oosterlinck et al., 2024,
    arXiv:2408.06266, eq. 8), for chosen responses worse than the model's own: push both
    likelihoods down, the rejected one more.

        L = sigma(beta r_w) + (1 - sigma(beta h)).
    """
    r_w, r_l = _ratios("apo_down_loss", pc, pr, rc, rr)
    return _out(torch.sigmoid(beta * r_w) + 1 - torch.sigmoid(beta * (r_w - r_l)), beta, r_w, r_l)


@register_loss("discopop")
def discopop_loss(pc, pr, rc, rr, *, beta: float, tau: float = 0.05) -> PreferenceLossOutput:
    """DiscoPOP, the log-ratio modulated loss found by LLM-driven discovery (Chris Lu et al.,
    2024, "Discovering Preference Optimization Algorithms with and for Large Language Models",
    arXiv:2406.08414, eq. 5). With z = beta h and the mixing weight m = sigma(z / tau):

        L = (1 - m) * -log sigma(z) + m * exp(-z).

    The exponential term is evaluated as exp(log sigma(z / tau) - z), which stays finite for very
    negative z where exp(-z) alone would overflow (m underflows to 0 there; inf * 0 is nan).
    """
    r_w, r_l = _ratios("discopop_loss", pc, pr, rc, rr)
    z = beta * (r_w - r_l)
    losses = torch.sigmoid(-z / tau) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)
    return _out(losses, beta, r_w, r_l)


@register_loss("sigmoid_norm")
def sigmoid_norm_loss(
    pc, pr, rc, rr, *, beta: float, chosen_lengths=None, rejected_lengths=None
) -> PreferenceLossOutput:
    """Length-normalised DPO (Lambert et al., 2024, "Tulu 3", arXiv:2411.15124, sec. 5; TRL
    `sigmoid_norm`): DPO on per-token log-ratios,

        L = -log sigma(beta (r_w / n_w - r_l / n_l)).

    Rewards are beta * r / n. Typical beta is much larger than DPO's (Tulu 3 uses 5).
    """
    r_w, r_l = _ratios("sigmoid_norm_loss", pc, pr, rc, rr)
    r_w, r_l = (
        per_token(r_w, chosen_lengths, "sigmoid_norm_loss"),
        per_token(r_l, rejected_lengths, "sigmoid_norm_loss"),
    )
    return _out(-F.logsigmoid(beta * (r_w - r_l)), beta, r_w, r_l)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(log_ratio: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(u) at u = pi / pi_ref = exp(log_ratio), the score f-DPO puts where DPO has log u
    (Wang et al., 2023, "Beyond Reverse KL", arXiv:2309.16240, table 1; constants dropped):

        reverse_kl:        log u
        forward_kl:        -1/u = -exp(-log u)
        js_divergence:     log(2u / (1 + u)) -> log sigma(log u)
        alpha_divergence:  (1 - u^-alpha) / alpha,  alpha in (0, 1)

    The alpha family interpolates reverse KL (alpha -> 0) and forward KL (alpha -> 1), as in the
    paper. (Current TRL writes the same family as (u^(a-1) - 1)/(a-1), i.e. a = 1 - alpha.)
    Exponents are capped at MAX_EXP so extreme log-ratios stay finite.
    """
    if divergence == "reverse_kl":
        return log_ratio
    if divergence == "forward_kl":
        return -torch.exp(torch.clamp(-log_ratio, max=MAX_EXP))
    if divergence == "js_divergence":
        return F.logsigmoid(log_ratio)
    if divergence == "alpha_divergence":
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha_divergence needs alpha in (0, 1), got {alpha}")
        return (1 - torch.exp(torch.clamp(-alpha * log_ratio, max=MAX_EXP))) / alpha
    raise ValueError(f"unknown f-divergence {divergence!r}; choose from {list(F_DIVERGENCES)}")


@register_loss(
    "f_dpo",
    aliases={name: {"divergence": name} for name in F_DIVERGENCES},
)
def f_divergence_loss(
    pc, pr, rc, rr, *, beta: float, divergence: str = "reverse_kl", alpha: float = 0.5, label_smoothing: float = 0.0
) -> PreferenceLossOutput:
    """f-DPO (Wang et al., 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization
    with Diverse Divergence Constraints", arXiv:2309.16240): DPO with the reverse-KL constraint
    replaced by an f-divergence, which swaps the log-ratio for the score s = f'(pi / pi_ref)
    (see `f_divergence_scores`):

        L = -(1 - eps) log sigma(beta (s_w - s_l)) - eps log sigma(-beta (s_w - s_l)).

    divergence = "reverse_kl" is exactly DPO. Rewards are beta * r (the plain log-ratios).
    """
    r_w, r_l = _ratios("f_divergence_loss", pc, pr, rc, rr)
    margin = f_divergence_scores(r_w, divergence, alpha) - f_divergence_scores(r_l, divergence, alpha)
    return _out(_smoothed_sigmoid(beta * margin, label_smoothing), beta, r_w, r_l)
