"""DPO with LoRA adapters on one device (CPU, one GPU or Apple MPS).

The reference policy is the same model with its adapters switched off, so there is exactly one
copy of the weights. The step, metrics, checkpoints and resume are the library's, as in the
distributed recipes: kill a run and `resume=true` continues it exactly. Run it with

    dpokit run dpo_lora_single_device --config tiny [key=value ...]

or copy it (`dpokit cp dpo_lora_single_device my_dpo.py`) and edit: this file is the whole loop.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from omegaconf import OmegaConf

from dpokit.config import checkpointer, instantiate, instantiate_datasets, recipe_main, sample_prompts
from dpokit.data import collate_preference_pairs, training_set
from dpokit.errors import DpokitError, RunInterrupted
from dpokit.fileio import atomic_dir
from dpokit.losses import is_reference_free
from dpokit.models import (
    adapter_params,
    cast_base,
    parameter_summary,
    prepare_blocks,
    read_hf_config,
    resolve_dtype,
)
from dpokit.training import (
    AdapterOffReference,
    RunReport,
    StepTimer,
    StopRequests,
    Throughput,
    accumulate_gradients,
    check_gt_rewards,
    claim_output_dir,
    clip_and_step,
    eval_batches,
    evaluate_preference,
    evaluation_due,
    lora_references,
    resolve_device,
    retain_freed_cpu_memory,
    sample_completions,
    save_lora_checkpoint,
    seed_everything,
    total_training_steps,
    training_sampler,
    warmup_warning,
    weights_fingerprint,
)

CONFIG_KEYS = (
    "output_dir",
    "seed",
    "device",
    "dtype",
    "activation_checkpointing",
    "activation_offloading",
    "compile",
    "checkpoint_dir",
    "tokenizer",
    "model",
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
    "optimizer",
    "lr_scheduler",
    "batch_size",
    "gradient_accumulation_steps",
    "epochs",
    "max_steps",
    "max_grad_norm",
    "eval_every",
    "eval_batch_size",
    "packing",
    "save_dtype",
    "checkpoint.dir",
    "checkpoint.every",
    "checkpoint.keep_last",
    "checkpoint.on_interrupt",
    "checkpoint.keep_top_k",
    "checkpoint.metric",
    "checkpoint.higher_is_better",
    "loggers",
    "resume",
)


def main(cfg) -> None:
    """DPO with LoRA on a single device; the reference is the model with adapters off."""
    seed_everything(cfg.seed)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # several copies would race on one output_dir
        raise DpokitError("dpo_lora_single_device runs on one process; for several use dpo_lora_distributed")
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype, "dtype")
    if device.type == "cpu":
        retain_freed_cpu_memory()  # the step reuses its large blocks instead of page-faulting fresh ones
    save_dtype = resolve_dtype(cfg.save_dtype, "save_dtype")  # checked before training, not after
    if cfg.activation_offloading and device.type != "cuda":
        raise DpokitError(f"activation_offloading: true needs a CUDA device; this run is on {device.type}")
    if cfg.activation_offloading and cfg.compile:
        raise DpokitError("activation_offloading: true with compile: true is not supported; choose one")
    if cfg.checkpoint_dir is not None:
        read_hf_config(cfg.checkpoint_dir)  # the export copies its config: a bad path fails now
    output_dir = Path(cfg.output_dir)
    claim_output_dir(output_dir, is_main=True)  # created, writable, and no other run's
    OmegaConf.save(cfg, output_dir / "config.yaml")
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    report = RunReport(output_dir, is_main=True, loggers=plain_cfg["loggers"])  # trackers checked now

    # Data: chosen and rejected of a pair go through the model as rows of one padded batch, or,
    # with packing, several pairs share each row (`batch_size` then counts packs).
    tokenizer = instantiate(cfg.tokenizer)
    # train_dataset or a weighted mixture (train_datasets); validation_dataset and validation_datasets.
    train_set, validation_sets = instantiate_datasets(cfg, tokenizer, report.say)
    packer = None if cfg.packing is None else partial(instantiate, cfg.packing)  # `packing:` online
    train_set, packed = training_set(train_set, packer=packer, ld_alpha=cfg.ld_alpha)  # or a `dpokit pack` file
    if packed:
        report.say(f"packing: {train_set.stats.summary()}")
    sampler = training_sampler(
        train_set,
        pad_id=tokenizer.pad_id,
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        rank=0,
        world_size=1,
        seed=cfg.seed,
    )

    # Model: only the adapters train; the reference is the same module with adapters off. The
    # frozen base is cast to `dtype`, the adapters stay fp32 so small updates are not rounded away.
    model = cast_base(instantiate(cfg.model), dtype).to(device)
    prepare_blocks(
        model,
        activation_checkpointing=cfg.activation_checkpointing,
        activation_offloading=cfg.activation_offloading,
        compile_blocks=cfg.compile,
    )
    trainable = list(adapter_params(model).values())
    loss_fn = instantiate(cfg.loss)
    check_gt_rewards(loss_fn, train_set.pairs if packed else train_set)  # RPO needs rewards in the data
    logps_settings = {"average_logps": cfg.average_logps, "ld_alpha": cfg.ld_alpha}
    report.say(f"model: {parameter_summary(model)}")
    # The reference is the base (adapters off): run beside the policy, or its log-probs computed
    # once and cached under a key of the base weights, data and settings (a sweep pays it once).
    reference, validation_references, note = lora_references(
        model,
        cfg.reference.strategy,
        train_set.pairs if packed else train_set,
        validation_sets,
        partial(collate_preference_pairs, pad_id=tokenizer.pad_id),
        reference_free=is_reference_free(loss_fn),
        weights=lambda: weights_fingerprint(model),
        cache_dir=cfg.reference.cache_dir,
        batch_size=cfg.eval_batch_size,
        device=device,
        dtype=cfg.dtype,
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

    # Resume: adapters + optimizer, scheduler, data position, RNG, step (the base is checkpoint_dir's).
    checkpoints = checkpointer(cfg.checkpoint, trainable_only=True)
    samples = sample_prompts(cfg.samples, seed=cfg.seed, tokenizer=tokenizer)  # null: no samples
    start_step = checkpoints.resume(cfg.resume, model, optimizer, scheduler, sampler)
    warning = checkpoints.check_metric(validation_sets, eval_every=cfg.eval_every)  # keep_top_k's metric
    if warning:
        report.warn(warning)

    collate = partial(collate_preference_pairs, pad_id=tokenizer.pad_id)  # validation: padded

    def validate(step: int) -> None:
        for name, dataset in validation_sets.items():
            batches = eval_batches(dataset, collate, batch_size=cfg.eval_batch_size, rank=0, world_size=1)
            metrics = evaluate_preference(
                model, validation_references[name], batches, loss_fn, device=device, **logps_settings
            )
            report.validation(step, metrics, dataset=name)
        if samples is not None:  # the fixed prompts decoded by the policy and the reference
            report.samples(step, sample_completions(model, adapters_off, tokenizer, samples, step=step))

    timer = StepTimer(device)
    # Tokens/s per device, peak memory, MFU; to metrics.jsonl and the trackers of `loggers:` (rank 0).
    throughput = Throughput(
        model, device=device, dtype=dtype, world_size=1, reference_forward=isinstance(reference, AdapterOffReference)
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
            # The gradient is that of the mean over every pair of the step, however it is split.
            metrics, tokens = accumulate_gradients(
                model, reference, sampler.next_step(), loss_fn, device=device, timer=timer, **logps_settings
            )
            with timer("optimizer"):
                train_metrics = metrics.means()
                grad_norm, lr = clip_and_step(
                    trainable, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm,
                    loss=train_metrics["preference_loss"], step=step, last_checkpoint=checkpoints.latest,
                )  # fmt: skip
            report.train_step(
                step, train_metrics, lr=lr, grad_norm=grad_norm, tokens=tokens, seconds=timer.step_seconds(),
                phases=timer.seconds,
            )  # fmt: skip
            if evaluation_due(step, every=cfg.eval_every, total_steps=total_steps, at_end=cfg.validate_at_end):
                validate(step)
            stopping = stop.agreed()  # Ctrl-C / SIGTERM on any rank: every rank stops after this step
            if checkpoints.due(step, stopping=stopping):
                saved = checkpoints.save(step, model, optimizer, scheduler, sampler, report.validations)
                report.say(f"step {step}: checkpoint {saved}")
            if stopping:
                raise RunInterrupted(step, checkpoints.latest(), stop.signal_name)

    # With an HF checkpoint_dir, final/ is a complete HF folder (its config and tokenizer files
    # too). The merge is fp32; a narrower save_dtype is measured on a few validation sequences.
    validation_set = validation_sets[None]
    probe_sequences = list(collate([validation_set[i] for i in range(min(4, len(validation_set)))]).input_ids)
    final_dir = output_dir / "final"
    with atomic_dir(final_dir, "the final model") as staging:  # final/ appears whole or not at all
        export = save_lora_checkpoint(
            model, staging, source_dir=cfg.checkpoint_dir, dtype=save_dtype, probe_sequences=probe_sequences
        )
        report.describe_final(staging, step=total_steps, best=checkpoints.best())  # dpokit_run.json
    report.say(export.summary())
    report.finish(final_dir)


if __name__ == "__main__":
    recipe_main(main, CONFIG_KEYS)
