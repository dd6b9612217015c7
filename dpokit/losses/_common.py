"""Small numerical helpers shared by the loss modules."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpokit.losses.types import PreferenceLossOutput


def log_ratios(policy: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """log pi(y|x) - log pi_ref(y|x); a missing reference counts as log pi_ref = 0."""
    return policy if reference is None else policy - reference


def require_reference(name: str, *references) -> None:
    if any(r is None for r in references):
        raise ValueError(f"{name} needs reference log-probs (it is not a reference-free loss)")


def per_token(logps: torch.Tensor, lengths: torch.Tensor | None, name: str) -> torch.Tensor:
    """Summed log-probs -> mean per response token. Lengths are required and must be positive."""
    if lengths is None:
        raise ValueError(f"{name} needs the response token counts (chosen_lengths / rejected_lengths)")
    lengths = torch.as_tensor(lengths, device=logps.device)
    if (lengths <= 0).any():
        rows = (lengths <= 0).nonzero().flatten().tolist()
        raise ValueError(f"{name}: pair(s) {rows[:5]} have an empty response (0 tokens)")
    return logps / lengths.to(logps.dtype)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler, 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) far from it."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def ratios(name: str, policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    """(r_w, r_l): the chosen and rejected log-ratios log pi - log pi_ref; the reference is required."""
    require_reference(name, reference_chosen, reference_rejected)
    return policy_chosen - reference_chosen, policy_rejected - reference_rejected


def preference_output(losses: torch.Tensor, beta: float, r_w: torch.Tensor, r_l: torch.Tensor) -> PreferenceLossOutput:
    """The per-pair losses with the implicit rewards beta * r_w and beta * r_l, detached."""
    return PreferenceLossOutput(losses, beta * r_w.detach(), beta * r_l.detach())


def smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): the logistic loss with flip probability eps."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
