"""Preference losses as pure functions of per-sequence log-prob tensors (the log-probs come from
`dpokit.logprobs`).

Select a loss by name (`get_loss("ipo", beta=0.1)`, `loss_names()`) or by `_component_`; call any
of them with `call_loss` (it supplies token counts / ground-truth rewards where the loss takes them);
`is_reference_free(loss_fn)` says whether the reference forward can be skipped. See docs/losses.md.
"""

from dpokit.losses.combine import combined_loss, wpo_weights
from dpokit.losses.f_divergence import F_DIVERGENCES, f_divergence_loss, f_divergence_scores
from dpokit.losses.margin import (
    aot_loss,
    aot_unpaired_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    robust_loss,
    sigmoid_norm_loss,
)
from dpokit.losses.per_response import apo_down_loss, apo_zero_loss, bco_pair_loss, nca_pair_loss, sppo_hard_loss
from dpokit.losses.reference_free import cpo_loss, orpo_loss, sft_loss, simpo_loss
from dpokit.losses.registry import call_loss, get_loss, is_reference_free, loss_names, register_loss, uses_gt_rewards
from dpokit.losses.reward_aware import rpo_bwd_kl_loss, rpo_fwd_kl_loss, rpo_sq_loss
from dpokit.losses.types import CombinedLossOutput, PreferenceLossOutput

__all__ = [
    "CombinedLossOutput",
    "F_DIVERGENCES",
    "PreferenceLossOutput",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "call_loss",
    "combined_loss",
    "cpo_loss",
    "discopop_loss",
    "dpo_loss",
    "exo_pair_loss",
    "f_divergence_loss",
    "f_divergence_scores",
    "get_loss",
    "hinge_loss",
    "ipo_loss",
    "is_reference_free",
    "uses_gt_rewards",
    "loss_names",
    "nca_pair_loss",
    "orpo_loss",
    "register_loss",
    "robust_loss",
    "rpo_bwd_kl_loss",
    "rpo_fwd_kl_loss",
    "rpo_sq_loss",
    "sft_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "sppo_hard_loss",
    "wpo_weights",
]
