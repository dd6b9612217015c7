"""Distributed plumbing: the process group (`group`), FSDP2 wiring and rank-local loading
(`fsdp`, `fsdp_lora`), the global-batch sampler and evaluation shards (`sampler`), and sharded
checkpoints with exact resume plus the final gathered HF save (`checkpoint`). Above models, below
training: nothing here knows about losses or the DPO step. Every piece works on one process too
(no process group: rank 0 of 1)."""

from dpokit.distributed.checkpoint import load_checkpoint, save_checkpoint, save_hf_model
from dpokit.distributed.fsdp import (
    check_no_meta,
    full_tensors,
    load_into_shards,
    materialize,
    reshard,
    shard_model,
    state_dict_tensors,
)
from dpokit.distributed.fsdp_lora import adapter_full_tensors, fresh_adapter_tensors, merged_full_tensors
from dpokit.distributed.group import (
    DistributedEnv,
    all_reduce_sum,
    barrier,
    destroy_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    resolve_device,
)
from dpokit.distributed.sampler import eval_batches, training_sampler

__all__ = [
    "DistributedEnv",
    "adapter_full_tensors",
    "all_reduce_sum",
    "barrier",
    "check_no_meta",
    "destroy_distributed",
    "eval_batches",
    "fresh_adapter_tensors",
    "full_tensors",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "load_checkpoint",
    "load_into_shards",
    "materialize",
    "merged_full_tensors",
    "reshard",
    "resolve_device",
    "save_checkpoint",
    "save_hf_model",
    "shard_model",
    "state_dict_tensors",
    "training_sampler",
]
