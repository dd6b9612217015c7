"""Losses by name, and the one place that knows how to call any of them.

Every loss in `dpokit.losses` has the call convention

    loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
         *, <hyper-parameters>, [chosen_lengths, rejected_lengths], [chosen_gt_rewards, rejected_gt_rewards])

with per-sequence log-probs summed over response tokens, shape [B]. Reference-free losses accept
(and ignore) `None` for the reference log-probs. The optional keyword inputs are what the loss needs
beyond log-probs: `call_loss` passes them when the loss's signature names them, so a recipe calls
every loss the same way. A config selects a loss either by name (`get_loss("ipo", beta=0.1)`) or
with `_component_: dpokit.losses.ipo_loss` + `_partial_: true`; both give a `functools.partial`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

# Keyword inputs (beyond the four log-prob tensors) that `call_loss` can supply.
LENGTH_INPUTS = ("chosen_lengths", "rejected_lengths")
GT_REWARD_INPUTS = ("chosen_gt_rewards", "rejected_gt_rewards")


@dataclass(frozen=True)
class LossEntry:
    name: str
    fn: Callable
    defaults: dict = field(default_factory=dict)


_LOSSES: dict[str, LossEntry] = {}


def register_loss(name: str, *, reference_free: bool | Callable[[dict], bool] = False, aliases: dict | None = None):
    """Decorator: make `fn` selectable by `name` (and by each alias name -> preset keyword arguments).

    `reference_free` is a bool, or a function of the partial's bound keywords for losses whose
    answer depends on their configuration (e.g. a weighted sum of other losses).
    """

    def decorate(fn: Callable) -> Callable:
        fn.reference_free = reference_free
        for entry_name, defaults in {name: {}, **(aliases or {})}.items():
            if entry_name in _LOSSES:
                raise ValueError(f"loss name {entry_name!r} is registered twice")
            _LOSSES[entry_name] = LossEntry(entry_name, fn, dict(defaults))
        return fn

    return decorate


def loss_names() -> list[str]:
    """Every name `get_loss` accepts."""
    return sorted(_LOSSES)


def get_loss(name: str, **kwargs) -> functools.partial:
    """The loss registered as `name` with its hyper-parameters bound, e.g. `get_loss("dpo", beta=0.1)`."""
    try:
        entry = _LOSSES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _LOSSES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown loss {name!r}{hint}; known: {', '.join(loss_names())}") from None
    return functools.partial(entry.fn, **{**entry.defaults, **kwargs})


def _unwrap(fn: Callable) -> tuple[Callable, dict]:
    """The underlying function of (nested) partials and the keywords they bind."""
    keywords: dict = {}
    while isinstance(fn, functools.partial):
        keywords = {**fn.keywords, **keywords}
        fn = fn.func
    return fn, keywords


def is_reference_free(loss_fn: Callable) -> bool:
    """True when `loss_fn` never looks at reference log-probs, so recipes may skip the reference
    forward. Unknown callables (a user's own loss) are assumed to need the reference."""
    fn, keywords = _unwrap(loss_fn)
    flag = getattr(fn, "reference_free", False)
    return bool(flag(keywords) if callable(flag) else flag)


def uses_gt_rewards(loss_fn: Callable) -> bool:
    """True when `loss_fn` reads ground-truth rewards (RPO; a combined loss with an RPO term), so
    a recipe can refuse data without them instead of training on the loss's defaults."""
    fn, keywords = _unwrap(loss_fn)
    flag = getattr(fn, "uses_gt_rewards", None)
    if flag is not None:
        return bool(flag(keywords) if callable(flag) else flag)
    return "chosen_gt_rewards" in _accepted_keywords(fn)


def _accepted_keywords(fn: Callable) -> set[str]:
    base, _ = _unwrap(fn)
    try:
        params = inspect.signature(base).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def call_loss(
    loss_fn: Callable,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_gt_rewards: torch.Tensor | None = None,
    rejected_gt_rewards: torch.Tensor | None = None,
):
    """Call any loss with what it declares it needs.

    Token counts go to every loss whose signature takes them. Ground-truth rewards go only where
    given (not None), so a loss's own defaults (or values bound in its partial) apply otherwise.
    """
    accepted = _accepted_keywords(loss_fn)
    extras = {}
    if "chosen_lengths" in accepted and chosen_lengths is not None:
        extras.update(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if "chosen_gt_rewards" in accepted and chosen_gt_rewards is not None:
        extras.update(chosen_gt_rewards=chosen_gt_rewards, rejected_gt_rewards=rejected_gt_rewards)
    return loss_fn(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, **extras
    )
