"""Reference-free preference losses: SimPO, CPO, ORPO. They never read reference log-probs, so a
recipe skips the reference forward entirely (`dpokit.losses.is_reference_free`).

Notation: per-sequence log-probs summed over response tokens, log pi(y_w|x) and log pi(y_l|x);
n_w, n_l the response token counts; sigma the logistic function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.losses._common import log1mexp, per_token
from dpokit.losses.registry import register_loss
from dpokit.losses.types import PreferenceLossOutput


@register_loss("simpo", reference_free=True)
def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """SimPO (Meng et al., 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", arXiv:2405.14734, eq. 6): the length-normalised log-likelihood is the reward,
    with a target margin gamma:

        z = beta * log pi(y_w|x) / n_w - beta * log pi(y_l|x) / n_l - gamma
        L = -(1 - eps) log sigma(z) - eps log sigma(-z)       (eps = label_smoothing, default 0)

    gamma is the absolute margin as in the paper (TRL's CPOTrainer takes gamma directly too).
    Rewards are beta * log pi(y|x) / n.
    """
    a_w = per_token(policy_chosen_logps, chosen_lengths, "simpo_loss")
    a_l = per_token(policy_rejected_logps, rejected_lengths, "simpo_loss")
    z = beta * (a_w - a_l) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PreferenceLossOutput(losses, beta * a_w.detach(), beta * a_l.detach())


@register_loss("cpo", reference_free=True)
def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    cpo_alpha: float = 1.0,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Contrastive Preference Optimisation (Xu et al., 2024, "Contrastive Preference Optimization:
    Pushing the Boundaries of LLM Performance in Machine Translation", arXiv:2401.08417, eq. 8):
    DPO with a uniform reference plus a behaviour-cloning NLL term on the chosen response,

        L = -(1 - eps) log sigma(beta z) - eps log sigma(-beta z) - alpha * log pi(y_w|x) / n_w,
        z = log pi(y_w|x) - log pi(y_l|x),

    with alpha = cpo_alpha. The NLL is the mean per-token NLL of each pair's chosen response
    (TRL averages tokens over the whole batch instead; the two agree when lengths are equal).
    Rewards are beta * log pi(y|x).
    """
    nll = -per_token(policy_chosen_logps, chosen_lengths, "cpo_loss")
    z = beta * (policy_chosen_logps - policy_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z) + cpo_alpha * nll
    return PreferenceLossOutput(losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach())


# A mean token log-prob of exactly 0 makes the odds infinite; capping just below keeps ORPO finite.
_MAX_MEAN_LOGP = -1e-6


@register_loss("orpo", reference_free=True)
def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Odds-Ratio Preference Optimisation (Hong et al., 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model", arXiv:2403.07691, eqs. 6-7), lambda = beta. With the
    mean token log-likelihoods a = log pi(y|x) / n and odds(y) = P / (1 - P), P = exp(a):

        log OR = (a_w - a_l) - (log(1 - exp(a_w)) - log(1 - exp(a_l)))
        L = -a_w - lambda * log sigma(log OR)

    (SFT negative log-likelihood on the chosen response plus the odds-ratio term). log(1 - e^a) is
    computed stably; a mean log-prob of exactly 0 is capped at -1e-6. Rewards are lambda * a.
    """
    a_w = per_token(policy_chosen_logps, chosen_lengths, "orpo_loss").clamp(max=_MAX_MEAN_LOGP)
    a_l = per_token(policy_rejected_logps, rejected_lengths, "orpo_loss").clamp(max=_MAX_MEAN_LOGP)
    log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
    losses = -a_w - beta * F.logsigmoid(log_odds)
    return PreferenceLossOutput(losses, beta * a_w.detach(), beta * a_l.detach())


@register_loss("sft", reference_free=True)
def sft_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor | None = None,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    average_logps: bool = False,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Supervised (negative log-likelihood) loss on the chosen response, the auxiliary term of
    NeMo-Aligner's DPO (`sft_loss_weight`) and the "generation" term of MPO:

        L = -log pi(y_w|x)            (average_logps=False: summed over tokens)
        L = -log pi(y_w|x) / n_w      (average_logps=True: mean over the n_w response tokens)

    Rejected log-probs and the reference are ignored; the rewards are zeros (no preference).
    """
    logps = per_token(policy_chosen_logps, chosen_lengths, "sft_loss") if average_logps else policy_chosen_logps
    zeros = torch.zeros_like(policy_chosen_logps).detach()
    return PreferenceLossOutput(-logps, zeros, zeros.clone())
