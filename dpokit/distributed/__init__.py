"""Distributed plumbing: the process group (`group`), FSDP2 wiring and rank-local loading
(`fsdp`, `fsdp_lora`), the global-batch sampler and evaluation shards (`sampler`), and sharded
checkpoints with exact resume plus the final gathered HF save (`checkpoint`). Above models, below
training: nothing here knows about losses or the DPO step. Every piece works on one process too
(no process group: rank 0 of 1)."""
