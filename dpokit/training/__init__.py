"""Pieces every recipe needs: the preference forward, reference policies, metrics, evaluation,
the step (sampler, gradient accumulation, report, checkpoints and resume), LR schedules, runtime
helpers and the final export. Plain functions and classes taking plain values. FSDP2 wiring and
distributed checkpoints are the layer below, `dpokit.distributed`."""

from dpokit.distributed.group import resolve_device
from dpokit.distributed.sampler import eval_batches, training_sampler
from dpokit.training.evaluate import evaluate_preference
from dpokit.training.export import save_lora_checkpoint
from dpokit.training.forward import check_gt_rewards, policy_logps, preference_loss
from dpokit.training.host_memory import retain_freed_cpu_memory
from dpokit.training.loggers import MetricLogger, open_loggers
from dpokit.training.metrics import JsonlLogger, PairMetrics, preference_accuracy
from dpokit.training.reference import (
    AdapterOffReference,
    FrozenCopyReference,
    NoReference,
    PrecomputedReference,
    StateDictSwapReference,
)
from dpokit.training.reference_cache import (
    TensorFingerprint,
    lora_references,
    precompute_reference_logps,
    precomputed_references,
    reference_logps_key,
    weights_fingerprint,
)
from dpokit.training.run import (
    Checkpointer,
    RunReport,
    StopRequests,
    claim_output_dir,
    evaluation_due,
    process_group,
    total_training_steps,
)
from dpokit.training.runtime import seed_everything
from dpokit.training.samples import SamplePrompts, sample_completions
from dpokit.training.schedules import warmup_cosine_schedule, warmup_warning
from dpokit.training.scoring import PolicyLogps
from dpokit.training.step import StepTimer, accumulate_gradients, clip_and_step
from dpokit.training.throughput import Throughput

__all__ = [
    "lora_references",
    "precomputed_references",
    "weights_fingerprint",
    "SamplePrompts",
    "sample_completions",
    "AdapterOffReference",
    "Checkpointer",
    "FrozenCopyReference",
    "JsonlLogger",
    "MetricLogger",
    "NoReference",
    "PairMetrics",
    "PolicyLogps",
    "PrecomputedReference",
    "RunReport",
    "StateDictSwapReference",
    "StepTimer",
    "StopRequests",
    "Throughput",
    "TensorFingerprint",
    "accumulate_gradients",
    "check_gt_rewards",
    "claim_output_dir",
    "clip_and_step",
    "eval_batches",
    "evaluate_preference",
    "evaluation_due",
    "policy_logps",
    "precompute_reference_logps",
    "preference_accuracy",
    "preference_loss",
    "open_loggers",
    "process_group",
    "reference_logps_key",
    "resolve_device",
    "retain_freed_cpu_memory",
    "save_lora_checkpoint",
    "seed_everything",
    "total_training_steps",
    "training_sampler",
    "warmup_cosine_schedule",
    "warmup_warning",
]
