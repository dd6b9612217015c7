"""Preference losses as pure functions of per-sequence log-prob tensors."""

from dpokit.losses.dpo import dpo_loss
from dpokit.losses.logprobs import sequence_logps, token_logps
from dpokit.losses.types import PreferenceLossOutput

__all__ = ["PreferenceLossOutput", "dpo_loss", "sequence_logps", "token_logps"]
