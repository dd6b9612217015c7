"""Pieces every recipe needs: the preference forward, reference policies, metrics, evaluation,
LR schedules, runtime helpers and checkpoints. Plain functions and classes taking plain values."""

from dpokit.training.checkpoint import save_lora_checkpoint
from dpokit.training.evaluate import evaluate_preference, move_batch
from dpokit.training.forward import policy_logps, preference_loss, response_lengths
from dpokit.training.metrics import JsonlLogger, PairMetrics, preference_accuracy
from dpokit.training.optim_step import clip_and_step
from dpokit.training.reference import AdapterOffReference
from dpokit.training.runtime import batches_forever, resolve_device, resolve_dtype, seed_everything
from dpokit.training.schedules import warmup_cosine_schedule, warmup_warning
from dpokit.training.scoring import PolicyLogps

__all__ = [
    "AdapterOffReference",
    "JsonlLogger",
    "PairMetrics",
    "PolicyLogps",
    "batches_forever",
    "clip_and_step",
    "evaluate_preference",
    "move_batch",
    "policy_logps",
    "preference_accuracy",
    "preference_loss",
    "response_lengths",
    "resolve_device",
    "resolve_dtype",
    "save_lora_checkpoint",
    "seed_everything",
    "warmup_cosine_schedule",
    "warmup_warning",
]
