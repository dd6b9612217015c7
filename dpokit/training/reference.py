"""Reference policies: where the DPO reference log-probs come from.

Every strategy exposes `logps(batch) -> (chosen_logps, rejected_logps)` computed without grad, so
recipes swap strategies without touching the training step. This module holds the adapter-off
strategy used by LoRA recipes (the base model is the reference; no second copy of the weights).
"""

from __future__ import annotations

import torch
from torch import nn

from dpokit.models.lora import disable_adapter
from dpokit.training.forward import PolicyLogps, policy_logps


class AdapterOffReference:
    """The LoRA policy with every adapter switched off is the reference (exactly the base)."""

    def __init__(self, model: nn.Module, *, average_logps: bool = False):
        self.model, self.average_logps = model, average_logps

    @torch.no_grad()
    def logps(self, batch: dict) -> PolicyLogps:
        with disable_adapter(self.model):
            return policy_logps(self.model, batch, average=self.average_logps)
