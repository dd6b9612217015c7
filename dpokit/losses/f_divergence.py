"""f-DPO: DPO with the reverse-KL constraint replaced by another f-divergence.

Notation used in every docstring: per-sequence log-probs summed over response tokens,
r_w = log pi(y_w|x) - log pi_ref(y_w|x), r_l likewise for the rejected response, the log-ratio
margin h = r_w - r_l, sigma the logistic function, n_w and n_l the response token counts.
Implicit rewards returned are beta * r_w and beta * r_l, detached, unless a docstring says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.losses._common import preference_output, ratios, smoothed_sigmoid
from dpokit.losses.registry import register_loss
from dpokit.losses.types import PreferenceLossOutput

# exp() arguments are capped here (forward-KL and alpha scores): e^50 ~ 5e21 is still finite in
# fp32 and in a squared/sigmoid loss, and a log-ratio that large is already a diverged run.
MAX_EXP = 50.0


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
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """f-DPO (Wang et al., 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization
    with Diverse Divergence Constraints", arXiv:2309.16240): DPO with the reverse-KL constraint
    replaced by an f-divergence, which swaps the log-ratio for the score s = f'(pi / pi_ref)
    (see `f_divergence_scores`):

        L = -(1 - eps) log sigma(beta (s_w - s_l)) - eps log sigma(-beta (s_w - s_l)).

    divergence = "reverse_kl" is exactly DPO. Rewards are beta * r (the plain log-ratios).
    """
    r_w, r_l = ratios(
        "f_divergence_loss",
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
    )
    margin = f_divergence_scores(r_w, divergence, alpha) - f_divergence_scores(r_l, divergence, alpha)
    return preference_output(smoothed_sigmoid(beta * margin, label_smoothing), beta, r_w, r_l)
