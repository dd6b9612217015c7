"""Losses that score each response's log-ratio on its own, not only the margin between them:
NCA, BCO, SPPO and the anchored APO pair.

Notation used in every docstring: per-sequence log-probs summed over response tokens,
r_w = log pi(y_w|x) - log pi_ref(y_w|x), r_l likewise for the rejected response, the log-ratio
margin h = r_w - r_l, sigma the logistic function, n_w and n_l the response token counts.
Implicit rewards returned are beta * r_w and beta * r_l, detached, unless a docstring says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.losses._common import preference_output, ratios
from dpokit.losses.registry import register_loss
from dpokit.losses.types import PreferenceLossOutput


@register_loss("nca_pair")
def nca_pair_loss(
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *, beta: float
) -> PreferenceLossOutput:
    """Noise Contrastive Alignment, pairwise (Chen et al., 2024, arXiv:2402.05369):

    L = -log sigma(beta r_w) - 0.5 log sigma(-beta r_w) - 0.5 log sigma(-beta r_l).
    """
    r_w, r_l = ratios(
        "nca_pair_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = -F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w) - 0.5 * F.logsigmoid(-beta * r_l)
    return preference_output(losses, beta, r_w, r_l)


@register_loss("bco_pair")
def bco_pair_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float,
    reward_shift: float | torch.Tensor = 0.0,
) -> PreferenceLossOutput:
    """Binary Classifier Optimisation on pairs (Jung et al., 2024, arXiv:2404.04656):

        L = -log sigma(beta r_w - delta) - log sigma(-(beta r_l - delta)).

    delta = reward_shift. The paper (and older TRL) uses a running mean of the rewards for delta,
    which is state; a pure function takes it as an input (current TRL uses delta = 0, our default).
    """
    r_w, r_l = ratios(
        "bco_pair_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = -F.logsigmoid(beta * r_w - reward_shift) - F.logsigmoid(-(beta * r_l - reward_shift))
    return preference_output(losses, beta, r_w, r_l)


@register_loss("sppo_hard")
def sppo_hard_loss(
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *, beta: float
) -> PreferenceLossOutput:
    """Self-Play Preference Optimisation with hard win probabilities (Wu et al., 2024,
    arXiv:2405.00675, eq. 4.7 with P = 1 for the winner, 0 for the loser; eta = 1/beta):

        L = (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2.
    """
    r_w, r_l = ratios(
        "sppo_hard_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2
    return preference_output(losses, beta, r_w, r_l)


@register_loss("apo_zero")
def apo_zero_loss(
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *, beta: float
) -> PreferenceLossOutput:
    """Anchored Preference Optimisation, zero anchor (D'Oosterlinck et al., 2024, "Anchored
    Preference Optimization and Contrastive Revisions", arXiv:2408.06266, eq. 7), for chosen
    responses better than the model's own: push the chosen likelihood up, the rejected one down.

        L = (1 - sigma(beta r_w)) + sigma(beta r_l).
    """
    r_w, r_l = ratios(
        "apo_zero_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return preference_output(1 - torch.sigmoid(beta * r_w) + torch.sigmoid(beta * r_l), beta, r_w, r_l)


@register_loss("apo_down")
def apo_down_loss(
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *, beta: float
) -> PreferenceLossOutput:
    """Anchored Preference Optimisation, down anchor (D'Oosterlinck et al., 2024,
    arXiv:2408.06266, eq. 8), for chosen responses worse than the model's own: push both
    likelihoods down, the rejected one more.

        L = sigma(beta r_w) + (1 - sigma(beta h)).
    """
    r_w, r_l = ratios(
        "apo_down_loss", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return preference_output(torch.sigmoid(beta * r_w) + 1 - torch.sigmoid(beta * (r_w - r_l)), beta, r_w, r_l)
