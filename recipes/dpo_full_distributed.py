"""Full-parameter DPO on one or many GPUs (or CPU processes) with FSDP2.

    dpokit run dpo_full_distributed --config llama3_8b                      # all local GPUs
    dpokit run dpo_full_distributed --config tiny --nproc_per_node 2        # 2 CPU processes

What happens, top to bottom:
1. torchrun starts one process per device; each joins the process group (NCCL on CUDA, gloo on CPU).
2. The model is built on the meta device (no memory), sharded with FSDP2 (`fully_shard` per block
   and on the root), then every rank loads its own shards of the checkpoint, one tensor at a time.
3. The reference policy is chosen in the config (`reference.strategy`): `swap` (one model; the
   reference shards wait on CPU and are swapped in for the reference forward), `frozen` (a second
   sharded model), `precomputed` (reference log-probs computed once before training and cached on
   disk) or `none` (reference-free losses).
4. Each optimizer step takes a global batch of `batch_size x gradient_accumulation_steps x ranks`
   pairs; the loss is the per-pair mean over the whole global batch. Gradients are clipped, a
   NaN/inf loss or gradient stops the run naming the step, the LR follows warmup + cosine.
   `ld_alpha` (LD-DPO, null = off) weights response tokens beyond the shorter response of each
   pair by ld_alpha in the policy's and the reference's log-probs alike.
   With `packing` (or a `dpokit pack` file as `train_dataset`) the data is packed once and a
   micro-batch is `batch_size` packs; the step's pairs still do not depend on the number of ranks,
   and the loss is still the mean over the step's (all-reduced) pair count. Validation stays padded.
5. Every `checkpoint.every` steps a sharded checkpoint (model, optimizer, scheduler, data position,
   RNG) is written atomically; `resume=true` continues exactly from the latest one.
6. The final weights are gathered to rank 0 and written as Hugging Face safetensors.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dpokit.config import checkpointer, instantiate, instantiate_datasets, recipe_main, sample_prompts
from dpokit.data import collate_preference_pairs, training_set
from dpokit.distributed import (
    barrier,
    check_no_meta,
    full_tensors,
    load_into_shards,
    materialize,
    reshard,
    save_hf_model,
    shard_model,
    state_dict_tensors,
)
from dpokit.errors import DpokitError, RunInterrupted
from dpokit.fileio import atomic_dir
from dpokit.losses import is_reference_free
from dpokit.models import read_hf_config, resolve_dtype
from dpokit.training import (
    FrozenCopyReference,
    NoReference,
    RunReport,
    StateDictSwapReference,
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
    precomputed_references,
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
    "samples",
    "validate_at_start",
    "validate_at_end",
    "loss",
    "average_logps",
    "ld_alpha",
    "reference.strategy",
    "reference.cache_dir",
    "reference.checkpoint_dir",
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
STRATEGIES = ("swap", "frozen", "precomputed", "none")


def weight_source(cfg, checkpoint_dir=None):
    """A fresh (key, tensor) stream of the initial weights, one tensor at a time. With a
    `checkpoint_dir` (the argument, else the config's) it reads a Hugging Face checkpoint; without,
    it is a random init from the seed (identical on every rank; only sensible for tiny models)."""
    checkpoint_dir = checkpoint_dir or cfg.checkpoint_dir
    if checkpoint_dir is not None:
        from dpokit.models import iter_hf_weights

        return iter_hf_weights(checkpoint_dir)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = instantiate(cfg.model)
    return state_dict_tensors(model)


def build_sharded_model(
    cfg, env, *, trainable: bool, fingerprint: TensorFingerprint | None = None, checkpoint_dir=None
):
    """Meta-device build -> FSDP2 sharding -> rank-local loading of the initial weights (of
    `checkpoint_dir` when given: a reference other than the initial policy)."""
    with torch.device("meta"):
        model = instantiate(cfg.model)
    model.to(resolve_dtype(cfg.dtype, "dtype"))  # master weights (fp32); still meta, so free
    param_dtype = resolve_dtype(cfg.fsdp.param_dtype, "fsdp.param_dtype") if cfg.fsdp.param_dtype else None
    shard_model(
        model,
        param_dtype=param_dtype,
        reduce_dtype=resolve_dtype(cfg.fsdp.reduce_dtype, "fsdp.reduce_dtype"),
        cpu_offload=cfg.fsdp.cpu_offload,
        activation_checkpointing=trainable and cfg.fsdp.activation_checkpointing,
        compile_blocks=cfg.fsdp.compile,
    )
    materialize(model, "cpu" if cfg.fsdp.cpu_offload else env.device, buffer_device=env.device)
    tensors = weight_source(cfg, checkpoint_dir)
    if fingerprint is not None:
        tensors = fingerprint.wrap(tensors)
    load_into_shards(model, tensors, source=str(checkpoint_dir or cfg.checkpoint_dir or "random init"))
    check_no_meta(model)
    model.requires_grad_(trainable)
    return model


def main(cfg) -> None:
    """Full-parameter DPO with FSDP2 (torchrun); reference by state-dict swap, frozen copy or precomputed."""
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
    if cfg.reference.strategy not in STRATEGIES:
        raise DpokitError(f"reference.strategy: unknown {cfg.reference.strategy!r}; choose from {list(STRATEGIES)}")

    # Data: every rank tokenizes the (small) dataset; the sampler deals pairs (or, packed, packs of
    # pairs) so that the global batch of each step does not depend on the number of ranks.
    tokenizer = instantiate(cfg.tokenizer)
    # train_dataset or a weighted mixture (train_datasets); validation_dataset and validation_datasets.
    train_set, validation_sets = instantiate_datasets(cfg, tokenizer, report.say)
    collate = partial(collate_preference_pairs, pad_id=tokenizer.pad_id)  # validation and precompute: padded
    packer = None if cfg.packing is None else partial(instantiate, cfg.packing)  # `packing:` online
    train_set, packed = training_set(train_set, packer=packer, ld_alpha=cfg.ld_alpha)  # or a `dpokit pack` file
    train_pairs = train_set.pairs if packed else train_set  # what `pair_index` indexes
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

    # Model: the policy, sharded; its initial weights are also the reference's unless
    # reference.checkpoint_dir names other weights (e.g. policy = an SFT model, reference = its base).
    reference_dir = cfg.reference.checkpoint_dir
    if reference_dir is not None:
        read_hf_config(reference_dir)  # a bad path fails now, not after the policy has loaded
    fingerprint = TensorFingerprint() if cfg.reference.strategy == "precomputed" else None
    model = build_sharded_model(cfg, env, trainable=True, fingerprint=None if reference_dir else fingerprint)
    report.say(
        f"model: {sum(p.numel() for p in model.parameters()):,} parameters, sharded over {env.world_size} rank(s)"
    )
    loss_fn = instantiate(cfg.loss)
    check_gt_rewards(loss_fn, train_pairs)  # RPO needs rewards in the data
    # Log-prob settings shared by the policy and every reference forward (ld_alpha: LD-DPO, None = off).
    logps_settings = {"average_logps": cfg.average_logps, "ld_alpha": cfg.ld_alpha}

    # A reference-free loss (SimPO, ...) needs no reference whatever the config says.
    strategy = "none" if is_reference_free(loss_fn) else cfg.reference.strategy
    if strategy == "none" and not is_reference_free(loss_fn):
        raise DpokitError("reference.strategy: 'none' needs a reference-free loss (e.g. dpokit.losses.simpo_loss)")
    validation_references = None
    # A separate reference model: kept (frozen), or used once for its weights (swap) or log-probs (precomputed).
    reference_model = None
    if reference_dir is not None and strategy in ("swap", "frozen", "precomputed"):
        reference_model = build_sharded_model(
            cfg, env, trainable=False, fingerprint=fingerprint, checkpoint_dir=reference_dir
        )
    if strategy == "swap":
        reference = StateDictSwapReference(model, weights_from=reference_model, **logps_settings)
    elif strategy == "frozen":
        frozen = reference_model or build_sharded_model(cfg, env, trainable=False)
        reference = FrozenCopyReference(frozen, **logps_settings)
    elif strategy == "precomputed":
        # One no-grad pass of the (still untrained) reference over every split, or the cached result.
        reference, validation_references, note = precomputed_references(
            reference_model or model,
            train_pairs,
            validation_sets,
            collate,
            weights=fingerprint.hexdigest(),
            cache_dir=cfg.reference.cache_dir,
            batch_size=cfg.eval_batch_size,
            device=env.device,
            dtype=cfg.dtype,
            param_dtype=cfg.fsdp.param_dtype,
            **logps_settings,
        )
        report.say(note)
    else:
        reference = NoReference()
    validation_references = validation_references or dict.fromkeys(validation_sets, reference)
    if reference_dir is not None and reference_model is None:
        report.warn("reference.checkpoint_dir is not used: the loss is reference-free")
    if strategy != "frozen" and reference_model is not None:
        del reference_model  # its weights live on in the swap's CPU copy or the tables
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    total_steps = total_training_steps(
        steps_per_epoch=sampler.steps_per_epoch, epochs=cfg.epochs, max_steps=cfg.max_steps
    )
    optimizer = instantiate(cfg.optimizer, model.parameters())
    scheduler = instantiate(cfg.lr_scheduler, optimizer, total_steps=total_steps)
    warning = warmup_warning(warmup_steps=cfg.lr_scheduler.get("warmup_steps", 0), total_steps=total_steps)
    if warning:
        report.warn(f"lr_scheduler.{warning}")

    # Resume: model + optimizer shards, scheduler, data position, RNG, step.
    checkpoints = checkpointer(cfg.checkpoint)
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
            report.samples(step, sample_completions(model, reference, tokenizer, samples, step=step))

    timer = StepTimer(env.device)
    # Tokens/s per device, peak memory, MFU; to metrics.jsonl and the trackers of `loggers:` (rank 0).
    throughput = Throughput(
        model,
        device=env.device,
        dtype=resolve_dtype(cfg.fsdp.param_dtype or cfg.dtype, "dtype"),
        world_size=env.world_size,
        reference_forward=strategy in ("swap", "frozen"),
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
                    model.parameters(),
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

    # Final: an HF folder (weights gathered one tensor at a time, config.json, tokenizer files).
    final_dir = output_dir / "final"
    with atomic_dir(final_dir, "the final model", write=env.is_main) as staging:  # whole or not at all
        save_hf_model(
            model, full_tensors(model, dtype=save_dtype), staging, dtype=save_dtype, source_dir=cfg.checkpoint_dir
        )
        report.describe_final(staging, step=total_steps, best=checkpoints.best())  # dpokit_run.json
    barrier()
    report.finish(final_dir)


if __name__ == "__main__":
    recipe_main(main, CONFIG_KEYS)
