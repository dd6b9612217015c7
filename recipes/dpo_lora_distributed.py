"""DPO with LoRA adapters on one or many GPUs (or CPU processes) with FSDP2.

    dpokit run dpo_lora_distributed --config tiny --nproc_per_node 2        # 2 CPU processes

The base weights are frozen and sharded with FSDP2 like in `dpo_full_distributed`; only the LoRA
adapters train. The reference is the same model with its adapters switched off, so there is one
copy of the weights and no swap. Intermediate checkpoints hold only what trains (adapters and
their optimizer state; the base is the initial checkpoint's), the final save is the merged model
in Hugging Face safetensors plus the adapter alone in PEFT layout.

With `packing` (or a `dpokit pack` file as `train_dataset`) the data is packed once and a
micro-batch is `batch_size` packs, dealt to ranks as in `dpo_full_distributed`; validation stays padded.
"""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dpokit.config import checkpointer, instantiate, instantiate_datasets, recipe_main, sample_prompts
from dpokit.data import collate_preference_pairs, training_set
from dpokit.distributed import (
    adapter_full_tensors,
    barrier,
    check_no_meta,
    fresh_adapter_tensors,
    load_into_shards,
    materialize,
    merged_full_tensors,
    reshard,
    save_hf_model,
    shard_model,
    state_dict_tensors,
)
from dpokit.errors import RunInterrupted
from dpokit.fileio import atomic_dir
from dpokit.losses import is_reference_free
from dpokit.models import MergeRounding, resolve_dtype, save_peft_adapter
from dpokit.training import (
    AdapterOffReference,
    RunReport,
    StepTimer,
    StopRequests,
    TensorFingerprint,
    Throughput,
    accumulate_gradients,
    check_gt_rewards,
    claim_output_dir,
    clip_and_step,
    eval_batches,
    evaluate_preference,
    evaluation_due,
    lora_references,
    process_group,
    retain_freed_cpu_memory,
    sample_completions,
    seed_everything,
    total_training_steps,
    training_sampler,
    warmup_warning,
)

CONFIG_KEYS = (
    "output_dir",
    "seed",
    "device",
    "dtype",
    "tokenizer",
    "model",
    "checkpoint_dir",
    "train_dataset",
    "train_datasets",
    "validation_dataset",
    "validation_datasets",
    "reference.strategy",
    "reference.cache_dir",
    "samples",
    "validate_at_start",
    "validate_at_end",
    "loss",
    "average_logps",
    "ld_alpha",
    "fsdp.param_dtype",
    "fsdp.reduce_dtype",
    "fsdp.cpu_offload",
    "fsdp.activation_checkpointing",
    "fsdp.compile",
    "optimizer",
    "lr_scheduler",
    "batch_size",
    "gradient_accumulation_steps",
    "epochs",
    "max_steps",
    "max_grad_norm",
    "eval_every",
    "eval_batch_size",
    "checkpoint.dir",
    "checkpoint.every",
    "checkpoint.keep_last",
    "checkpoint.on_interrupt",
    "checkpoint.keep_top_k",
    "checkpoint.metric",
    "checkpoint.higher_is_better",
    "loggers",
    "resume",
    "save_dtype",
    "packing",
)


def weight_source(cfg, model, fingerprint=None):
    """A fresh (key, tensor) stream of the initial weights, one tensor at a time: the base weights
    of a Hugging Face checkpoint plus freshly initialised adapters, or (without `checkpoint_dir`) a
    random init of the whole model from the seed (tiny models only). `fingerprint` (a
    TensorFingerprint) hashes the base weights as they pass: the precomputed reference's key."""
    if cfg.checkpoint_dir is not None:
        from dpokit.models import iter_hf_weights

        base = iter_hf_weights(cfg.checkpoint_dir)
        adapters = fresh_adapter_tensors(model, seed=cfg.seed)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            full = dict(state_dict_tensors(instantiate(cfg.model)))
        base = ((k, t) for k, t in full.items() if ".lora_" not in k)
        adapters = ((k, t) for k, t in full.items() if ".lora_" in k)
    return itertools.chain(base if fingerprint is None else fingerprint.wrap(base), adapters)


def build_sharded_model(cfg, env, fingerprint=None):
    """Meta-device build -> FSDP2 sharding -> rank-local loading (base + adapters)."""
    with torch.device("meta"):
        model = instantiate(cfg.model)  # the LoRA builder marks only the adapters trainable
    model.to(resolve_dtype(cfg.dtype, "dtype"))
    param_dtype = resolve_dtype(cfg.fsdp.param_dtype, "fsdp.param_dtype") if cfg.fsdp.param_dtype else None
    shard_model(
        model,
        param_dtype=param_dtype,
        reduce_dtype=resolve_dtype(cfg.fsdp.reduce_dtype, "fsdp.reduce_dtype"),
        cpu_offload=cfg.fsdp.cpu_offload,
        activation_checkpointing=cfg.fsdp.activation_checkpointing,
        compile_blocks=cfg.fsdp.compile,
    )
    materialize(model, "cpu" if cfg.fsdp.cpu_offload else env.device, buffer_device=env.device)
    load_into_shards(model, weight_source(cfg, model, fingerprint), source=str(cfg.checkpoint_dir or "random init"))
    check_no_meta(model)
    return model


def main(cfg) -> None:
    """DPO with LoRA and FSDP2 (torchrun); the reference is the model with adapters off."""
    with process_group(cfg.device) as env:  # kept if a caller (a test) already made one
        train(cfg, env)


def train(cfg, env) -> None:
    seed_everything(cfg.seed + env.rank)
    if env.device.type == "cpu" or cfg.fsdp.cpu_offload:  # the step's large blocks live in host memory
        retain_freed_cpu_memory()  # reuse them instead of page-faulting fresh ones every step
    save_dtype = resolve_dtype(cfg.save_dtype, "save_dtype")  # checked before training, not after
    output_dir = Path(cfg.output_dir)
    claim_output_dir(output_dir, is_main=env.is_main)  # created, writable, and no other run's
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    # Rank 0 speaks, logs and draws the bar; the trackers of `loggers:` are checked now, opened later.
    report = RunReport(output_dir, is_main=env.is_main, loggers=plain_cfg["loggers"])
    if env.is_main:
        OmegaConf.save(cfg, output_dir / "config.yaml")

    # Data: every rank tokenizes the (small) dataset; the sampler deals pairs (or, packed, packs of
    # pairs) so that the global batch of each step does not depend on the number of ranks.
    tokenizer = instantiate(cfg.tokenizer)
    # train_dataset or a weighted mixture (train_datasets); validation_dataset and validation_datasets.
    train_set, validation_sets = instantiate_datasets(cfg, tokenizer, report.say)
    collate = partial(collate_preference_pairs, pad_id=tokenizer.pad_id)  # validation: padded
    packer = None if cfg.packing is None else partial(instantiate, cfg.packing)  # `packing:` online
    train_set, packed = training_set(train_set, packer=packer, ld_alpha=cfg.ld_alpha)  # or a `dpokit pack` file
    sampler = training_sampler(
        train_set,
        pad_id=tokenizer.pad_id,
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.seed,
    )
    if packed:
        report.say(f"packing: {train_set.stats.summary()}")
    unused = f" ({sampler.unused_per_epoch} per epoch wait for a later epoch)" if sampler.unused_per_epoch else ""
    report.say(
        f"{env.world_size} rank(s) on {env.device.type}; global batch {sampler.global_batch} {sampler.unit}{unused}"
    )

    # Model: frozen sharded base + trainable adapters; the reference is the same model, adapters off.
    fingerprint = TensorFingerprint() if cfg.reference.strategy == "precomputed" else None
    model = build_sharded_model(cfg, env, fingerprint)
    trainable = [p for p in model.parameters() if p.requires_grad]
    report.say(
        f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in trainable):,} trainable (LoRA), sharded over {env.world_size} rank(s)"
    )
    loss_fn = instantiate(cfg.loss)
    check_gt_rewards(loss_fn, train_set.pairs if packed else train_set)  # RPO needs rewards in the data
    # Log-prob settings shared by the policy and the reference forward (ld_alpha: LD-DPO, None = off).
    logps_settings = {"average_logps": cfg.average_logps, "ld_alpha": cfg.ld_alpha}
    # The reference is the base (adapters off): run beside the policy, or its log-probs computed
    # once and cached under a key of the base weights, data and settings (a sweep pays it once).
    reference, validation_references, note = lora_references(
        model,
        cfg.reference.strategy,
        train_set.pairs if packed else train_set,
        validation_sets,
        collate,
        reference_free=is_reference_free(loss_fn),
        weights=lambda: fingerprint.hexdigest(),  # hashed as the base weights streamed in
        cache_dir=cfg.reference.cache_dir,
        batch_size=cfg.eval_batch_size,
        device=env.device,
        dtype=cfg.dtype,
        param_dtype=cfg.fsdp.param_dtype,
        **logps_settings,
    )
    if note:
        report.say(note)
    adapters_off = AdapterOffReference(model, **logps_settings)  # what the samples' reference decodes

    total_steps = total_training_steps(
        steps_per_epoch=sampler.steps_per_epoch, epochs=cfg.epochs, max_steps=cfg.max_steps
    )
    optimizer = instantiate(cfg.optimizer, trainable)
    scheduler = instantiate(cfg.lr_scheduler, optimizer, total_steps=total_steps)
    warning = warmup_warning(warmup_steps=cfg.lr_scheduler.get("warmup_steps", 0), total_steps=total_steps)
    if warning:
        report.warn(f"lr_scheduler.{warning}")

    # Resume: adapter + optimizer shards (the base is the initial checkpoint's), scheduler, data
    # position, RNG, step.
    checkpoints = checkpointer(cfg.checkpoint, trainable_only=True)
    samples = sample_prompts(cfg.samples, seed=cfg.seed, tokenizer=tokenizer)  # null: no samples
    start_step = checkpoints.resume(cfg.resume, model, optimizer, scheduler, sampler)
    warning = checkpoints.check_metric(validation_sets, eval_every=cfg.eval_every)  # keep_top_k's metric
    if warning:
        report.warn(warning)

    def validate(step: int) -> None:
        for name, dataset in validation_sets.items():
            batches = eval_batches(
                dataset, collate, batch_size=cfg.eval_batch_size, rank=env.rank, world_size=env.world_size
            )
            metrics = evaluate_preference(
                model, validation_references[name], batches, loss_fn, device=env.device, **logps_settings
            )
            report.validation(step, metrics, dataset=name)
        if samples is not None:  # the fixed prompts decoded by the policy and the reference
            report.samples(step, sample_completions(model, adapters_off, tokenizer, samples, step=step))

    timer = StepTimer(env.device)
    # Tokens/s per device, peak memory, MFU; to metrics.jsonl and the trackers of `loggers:` (rank 0).
    throughput = Throughput(
        model,
        device=env.device,
        dtype=resolve_dtype(cfg.fsdp.param_dtype or cfg.dtype, "dtype"),
        world_size=env.world_size,
        reference_forward=isinstance(reference, AdapterOffReference),  # adapters off, every step
    )
    running = report.running(
        total_steps=total_steps, start_step=start_step, resumed_from=checkpoints.resumed_from,
        config=plain_cfg, throughput=throughput,
    )  # fmt: skip
    with running, StopRequests() as stop:
        if start_step == 0 and cfg.validate_at_start:
            validate(0)
        model.train()
        for step in range(start_step + 1, total_steps + 1):
            timer.begin_step()
            metrics, tokens = accumulate_gradients(
                model,
                reference,
                sampler.next_step(),
                loss_fn,
                device=env.device,
                timer=timer,
                **logps_settings,
            )
            with timer("optimizer"):
                train_metrics = metrics.means()
                grad_norm, lr = clip_and_step(
                    trainable,
                    optimizer,
                    scheduler,
                    max_grad_norm=cfg.max_grad_norm,
                    loss=train_metrics["preference_loss"],
                    step=step,
                    last_checkpoint=checkpoints.latest,
                )
                reshard(model)  # nothing gathered before the update may serve the next forward
            report.train_step(
                step,
                train_metrics,
                lr=lr,
                grad_norm=grad_norm,
                tokens=tokens,
                seconds=timer.step_seconds(),
                phases=timer.seconds,
            )
            if evaluation_due(step, every=cfg.eval_every, total_steps=total_steps, at_end=cfg.validate_at_end):
                validate(step)
            stopping = stop.agreed()  # Ctrl-C / SIGTERM on any rank: every rank stops after this step
            if checkpoints.due(step, stopping=stopping):
                saved = checkpoints.save(step, model, optimizer, scheduler, sampler, report.validations)
                report.say(f"step {step}: checkpoint {saved}")
            if stopping:
                raise RunInterrupted(step, checkpoints.latest(), stop.signal_name)

    # Final: the merged model (HF safetensors, gathered one module at a time) in final/, the adapter
    # alone (PEFT layout) in final/adapter/.
    # final/adapter/, never final/ itself: transformers would apply an adapter found next to
    # config.json on top of the already-merged weights.
    rounding = MergeRounding()
    final_dir = output_dir / "final"
    with atomic_dir(final_dir, "the final model", write=env.is_main) as staging:  # whole or not at all
        merged = merged_full_tensors(model, dtype=save_dtype, rounding=rounding)
        save_hf_model(model, merged, staging, dtype=save_dtype, source_dir=cfg.checkpoint_dir)
        adapters = adapter_full_tensors(model)  # collective
        if env.is_main:
            base = None if cfg.checkpoint_dir is None else str(cfg.checkpoint_dir)
            save_peft_adapter(model, staging / "adapter", base_model_name_or_path=base, adapters=adapters)
        report.describe_final(staging, step=total_steps, best=checkpoints.best())  # dpokit_run.json
    barrier()
    report.say(rounding.summary(save_dtype))
    report.finish(final_dir)


if __name__ == "__main__":
    recipe_main(main, CONFIG_KEYS)
