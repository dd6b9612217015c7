"""One loss built from others: NeMo-Aligner's preference + SFT objective with its switches, MPO's
weighted sum of several preference losses, and WPO's per-pair weighting."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from dpokit.losses._common import per_token
from dpokit.losses.registry import (
    _accepted_keywords,
    call_loss,
    get_loss,
    is_reference_free,
    register_loss,
    uses_gt_rewards,
)
from dpokit.losses.types import CombinedLossOutput


def _terms(preference_loss, preference_loss_weight, loss_kwargs) -> list[tuple[Callable, float]]:
    # Any sequence (lists from a YAML config included) is several terms; a name or callable is one.
    losses = (
        [preference_loss] if isinstance(preference_loss, str) or callable(preference_loss) else list(preference_loss)
    )
    weights = (
        [preference_loss_weight] if isinstance(preference_loss_weight, (int, float)) else list(preference_loss_weight)
    )
    if len(losses) != len(weights) or not losses:
        raise ValueError(f"combined_loss: {len(losses)} preference loss(es) but {len(weights)} weight(s)")
    # Shared hyper-parameters (beta, ...) go to each named term that takes them; one that no term
    # takes is a typo, not something to drop silently.
    fns, used = [], set()
    for loss in losses:
        if isinstance(loss, str):
            accepted = _accepted_keywords(get_loss(loss))
            own = {k: v for k, v in loss_kwargs.items() if k in accepted}
            used |= set(own)
            fns.append(get_loss(loss, **own))
        else:
            fns.append(loss)
    unused = sorted(set(loss_kwargs) - used)
    if unused:
        raise ValueError(f"combined_loss: no preference loss takes the argument(s) {unused}")
    return list(zip(fns, [float(w) for w in weights]))


def _bound_terms(keywords: dict) -> list:
    loss_kwargs = {k: v for k, v in keywords.items() if k not in _OWN_KEYWORDS}
    return _terms(keywords.get("preference_loss", "dpo"), keywords.get("preference_loss_weight", 1.0), loss_kwargs)


def _reference_free(keywords: dict) -> bool:
    return all(is_reference_free(fn) for fn, _ in _bound_terms(keywords))


def _uses_gt_rewards(keywords: dict) -> bool:
    return any(uses_gt_rewards(fn) for fn, _ in _bound_terms(keywords))


def wpo_weights(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> torch.Tensor:
    """Weighted Preference Optimisation pair weights (Zhou et al., 2024, "WPO: Enhancing RLHF with
    Weighted Preference Optimization", arXiv:2406.11827, eq. 2, length-normalised):

        w = exp(log pi(y_w|x) / n_w + log pi(y_l|x) / n_l),   detached (a weight, not a target).

    The paper's "sampled alignment" refinement (TRL's default) divides each token probability by
    sum_v pi(v)^2, which needs vocabulary-wide sums per token, not per-sequence log-probs.
    """
    mean_w = per_token(policy_chosen_logps.detach(), chosen_lengths, "wpo_weights")
    mean_l = per_token(policy_rejected_logps.detach(), rejected_lengths, "wpo_weights")
    return torch.exp(mean_w + mean_l)


@register_loss("combined", reference_free=_reference_free, aliases={"mpo": {}, "nemo": {}})
def combined_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    preference_loss: str | Callable | Sequence[str | Callable] = "dpo",
    preference_loss_weight: float | Sequence[float] = 1.0,
    sft_loss_weight: float = 0.0,
    preference_average_logps: bool = False,
    sft_average_logps: bool | None = None,
    wpo_weighting: bool = False,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_gt_rewards: torch.Tensor | None = None,
    rejected_gt_rewards: torch.Tensor | None = None,
    **loss_kwargs,
) -> CombinedLossOutput:
    """A weighted sum of preference losses plus an auxiliary SFT term on the chosen response:

        L = sum_k w_k * c * L_k(logps)  +  sft_loss_weight * L_sft,

    * NeMo-Aligner's DPO objective (`preference_loss` a name such as "dpo", "ipo", "rpo_sq",
      "rpo_fwd_kl", "rpo_bwd_kl"; `preference_loss_weight`, `sft_loss_weight`): L_sft = -log pi(y_w|x).
    * `preference_average_logps`: the losses see mean-per-token log-probs log pi(y|x) / n
      (NeMo's switch); the terms then get token counts of 1, so a term that normalises by length
      itself (ipo, sigmoid_norm, simpo, orpo, ...) does not divide twice.
      `sft_average_logps` (default: same as preference_average_logps): L_sft = -log pi(y_w|x) / n_w.
    * MPO (Wang et al., 2024, "Enhancing the Reasoning Ability of Multimodal LLMs via Mixed
      Preference Optimization", arXiv:2411.10442): `preference_loss` a list (e.g. ["dpo", "bco_pair",
      "sft"]) with a matching `preference_loss_weight` list; TRL's `loss_type` / `loss_weights`.
    * WPO (`wpo_weighting=True`): each preference term is multiplied by c = `wpo_weights(...)`
      of the pair (c = 1 otherwise).

    Terms given by name are built with `get_loss(name, **loss_kwargs)` (e.g. beta=0.1); terms may
    also be loss callables (partials). Rewards are those of the first term.
    """
    terms = _terms(preference_loss, preference_loss_weight, loss_kwargs)
    inputs = [policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps]
    lengths = (chosen_lengths, rejected_lengths)
    if preference_average_logps:
        inputs = [
            None if x is None else per_token(x, length, "combined_loss") for x, length in zip(inputs, lengths * 2)
        ]
        lengths = (torch.ones_like(policy_chosen_logps), torch.ones_like(policy_rejected_logps))
    weights = (
        wpo_weights(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
        if wpo_weighting
        else 1.0
    )

    preference, rewards = 0.0, None
    for fn, weight in terms:
        out = call_loss(
            fn,
            *inputs,
            chosen_lengths=lengths[0],
            rejected_lengths=lengths[1],
            chosen_gt_rewards=chosen_gt_rewards,
            rejected_gt_rewards=rejected_gt_rewards,
        )
        preference = preference + weight * weights * out.losses
        rewards = rewards or (out.chosen_rewards, out.rejected_rewards)
    preference = torch.as_tensor(preference, dtype=policy_chosen_logps.dtype).expand_as(policy_chosen_logps)

    sft_average = preference_average_logps if sft_average_logps is None else sft_average_logps
    sft = -(per_token(policy_chosen_logps, chosen_lengths, "combined_loss") if sft_average else policy_chosen_logps)
    return CombinedLossOutput(preference + sft_loss_weight * sft, *rewards, preference, sft)


combined_loss.uses_gt_rewards = _uses_gt_rewards

_OWN_KEYWORDS = {
    "preference_loss",
    "preference_loss_weight",
    "sft_loss_weight",
    "preference_average_logps",
    "sft_average_logps",
    "wpo_weighting",
    "chosen_lengths",
    "rejected_lengths",
    "chosen_gt_rewards",
    "rejected_gt_rewards",
}
