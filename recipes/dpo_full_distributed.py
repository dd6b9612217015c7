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
5. Every `checkpoint.every` steps a sharded checkpoint (model, optimizer, scheduler, data position,
   RNG) is written atomically; `resume=true` continues exactly from the latest one.
6. The final weights are gathered to rank 0 and written as Hugging Face safetensors.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from dpokit.data import collate_preference_pairs
from dpokit.errors import DpokitError
from dpokit.losses import is_reference_free
from dpokit.recipes.configs import instantiate, recipe_main
from dpokit.training import JsonlLogger, resolve_dtype, seed_everything
from dpokit.training.dist_checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint, save_full_model
from dpokit.training.dist_data import GlobalBatchSampler, eval_batches
from dpokit.training.distributed import barrier, destroy_distributed, init_distributed
from dpokit.training.fsdp import check_no_meta, load_into_shards, materialize, reshard, shard_model, state_dict_tensors
from dpokit.training.optim_step import clip_and_step
from dpokit.training.preference_step import StepTimer, accumulate_gradients, evaluate_distributed
from dpokit.training.reference import FrozenCopyReference, NoReference, StateDictSwapReference
from dpokit.training.reference_cache import (
    TensorFingerprint,
    dataset_fingerprint,
    precompute_reference_logps,
    reference_cache_key,
)

CONFIG_KEYS = (
    "output_dir", "seed", "device", "dtype", "tokenizer", "model", "checkpoint_dir", "train_dataset",
    "validation_dataset", "loss", "average_logps", "reference", "fsdp", "optimizer", "lr_scheduler", "batch_size",
    "gradient_accumulation_steps", "epochs", "max_steps", "max_grad_norm", "eval_every", "eval_batch_size",
    "checkpoint", "resume", "save_dtype",
)
STRATEGIES = ("swap", "frozen", "precomputed", "none")


def weight_source(cfg):
    """A fresh (key, tensor) stream of the initial weights, one tensor at a time. With
    `checkpoint_dir` it reads a Hugging Face checkpoint; without, it is a random init from the
    seed (identical on every rank; only sensible for tiny models)."""
    if cfg.checkpoint_dir is not None:
        from dpokit.models.hf_checkpoint import iter_hf_weights

        return iter_hf_weights(cfg.checkpoint_dir)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = instantiate(cfg.model)
    return state_dict_tensors(model)


def build_sharded_model(cfg, env, *, trainable: bool, fingerprint: TensorFingerprint | None = None):
    """Meta-device build -> FSDP2 sharding -> rank-local loading of the initial weights."""
    with torch.device("meta"):
        model = instantiate(cfg.model)
    model.to(resolve_dtype(cfg.dtype))  # master weights (fp32); still meta, so free
    param_dtype = resolve_dtype(cfg.fsdp.param_dtype) if cfg.fsdp.param_dtype else None
    shard_model(
        model, param_dtype=param_dtype, reduce_dtype=resolve_dtype(cfg.fsdp.reduce_dtype),
        cpu_offload=cfg.fsdp.cpu_offload, activation_checkpointing=trainable and cfg.fsdp.activation_checkpointing,
        compile_blocks=cfg.fsdp.compile,
    )
    materialize(model, "cpu" if cfg.fsdp.cpu_offload else env.device, buffer_device=env.device)
    tensors = weight_source(cfg)
    if fingerprint is not None:
        tensors = fingerprint.wrap(tensors)
    load_into_shards(model, tensors, source=str(cfg.checkpoint_dir or "random init"))
    check_no_meta(model)
    model.requires_grad_(trainable)
    return model


def write_hf_metadata(model, directory: Path, cfg) -> None:
    """config.json (and the source checkpoint's tokenizer files) beside the final weights, so the
    folder loads with `AutoModelForCausalLM.from_pretrained` and serves as a `checkpoint_dir`."""
    from dpokit.models.hf_checkpoint import copy_tokenizer_files
    from dpokit.models.hf_config import hf_config_from_model

    base = None
    if cfg.checkpoint_dir is not None:
        base = json.loads((Path(cfg.checkpoint_dir) / "config.json").read_text())
        copy_tokenizer_files(cfg.checkpoint_dir, directory)
    config = hf_config_from_model(model, resolve_dtype(cfg.save_dtype), base)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(cfg) -> None:
    """Full-parameter DPO with FSDP2 (torchrun); reference by state-dict swap, frozen copy or precomputed."""
    owns_process_group = not torch.distributed.is_initialized()  # else a caller (a test) set it up
    env = init_distributed(cfg.device)
    try:
        train(cfg, env)
    finally:
        if owns_process_group:
            destroy_distributed()


def train(cfg, env) -> None:
    main_rank = env.is_main
    say = tqdm.write if main_rank else (lambda message: None)  # rank 0 speaks; tqdm keeps its bar intact
    seed_everything(cfg.seed + env.rank)
    output_dir = Path(cfg.output_dir)
    if main_rank:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml")
    if cfg.reference.strategy not in STRATEGIES:
        raise DpokitError(f"reference.strategy: unknown {cfg.reference.strategy!r}; choose from {list(STRATEGIES)}")

    # Data: every rank tokenizes the (small) dataset; the sampler deals pairs so that the global
    # batch of each step does not depend on the number of ranks.
    tokenizer = instantiate(cfg.tokenizer)
    train_set = instantiate(cfg.train_dataset, tokenizer=tokenizer)
    validation_set = instantiate(cfg.validation_dataset, tokenizer=tokenizer)
    collate = partial(collate_preference_pairs, pad_id=tokenizer.pad_id)
    sampler = GlobalBatchSampler(
        train_set, collate, batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        rank=env.rank, world_size=env.world_size, seed=cfg.seed,
    )
    say(f"train: {train_set.stats.summary()}\nvalidation: {validation_set.stats.summary()}")
    say(f"{env.world_size} rank(s) on {env.device.type}; global batch {sampler.global_batch} pairs")

    # Model: the policy, sharded; its initial weights are also the reference's.
    fingerprint = TensorFingerprint() if cfg.reference.strategy == "precomputed" else None
    model = build_sharded_model(cfg, env, trainable=True, fingerprint=fingerprint)
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, sharded over {env.world_size} rank(s)")
    loss_fn = instantiate(cfg.loss)

    # A reference-free loss (SimPO, ...) needs no reference whatever the config says.
    strategy = "none" if is_reference_free(loss_fn) else cfg.reference.strategy
    if strategy == "none" and not is_reference_free(loss_fn):
        raise DpokitError("reference.strategy: 'none' needs a reference-free loss (e.g. dpokit.losses.simpo_loss)")
    validation_reference = None
    if strategy == "swap":
        reference = StateDictSwapReference(model, average_logps=cfg.average_logps)
    elif strategy == "frozen":
        reference = FrozenCopyReference(build_sharded_model(cfg, env, trainable=False),
                                        average_logps=cfg.average_logps)
    elif strategy == "precomputed":
        # One no-grad pass of the (still untrained) policy over both splits, or the cached result.
        key = reference_cache_key(
            weights=fingerprint.hexdigest(),
            datasets={"train": dataset_fingerprint(train_set), "validation": dataset_fingerprint(validation_set)},
            settings={"average_logps": cfg.average_logps, "dtype": cfg.dtype, "param_dtype": cfg.fsdp.param_dtype},
        )
        started = time.perf_counter()
        tables, cached = precompute_reference_logps(
            model, {"train": train_set, "validation": validation_set}, collate, cache_dir=cfg.reference.cache_dir,
            key=key, batch_size=cfg.eval_batch_size, device=env.device, average_logps=cfg.average_logps,
        )
        say(f"reference log-probs {'loaded from cache' if cached else 'precomputed'} in "
            f"{time.perf_counter() - started:.1f}s (cache key {key[:12]})")
        reference, validation_reference = tables["train"], tables["validation"]
    else:
        reference = NoReference()
    validation_reference = validation_reference or reference

    total_steps = cfg.epochs * sampler.steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = instantiate(cfg.optimizer, model.parameters())
    scheduler = instantiate(cfg.lr_scheduler, optimizer, total_steps=total_steps)

    # Resume: model + optimizer shards, scheduler, data position, RNG, step.
    checkpoint_root = Path(cfg.checkpoint.dir)
    resume_from = resolve_resume(cfg.resume, checkpoint_root)
    start_step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["data"])
        start_step = state["step"]
        say(f"resumed from {resume_from} at step {start_step}")

    log = JsonlLogger(output_dir / "metrics.jsonl", append=resume_from is not None) if main_rank else None

    def validate(step: int) -> dict:
        metrics = evaluate_distributed(
            model, validation_reference,
            eval_batches(validation_set, collate, batch_size=cfg.eval_batch_size, rank=env.rank,
                         world_size=env.world_size),
            loss_fn, device=env.device, average_logps=cfg.average_logps,
        )
        if log:
            log.log({"step": step, "split": "validation", **metrics})
        return metrics

    val = first_val = validate(start_step) if start_step == 0 else None
    if val:
        say(f"step 0: validation loss {val['preference_loss']:.4f} acc {val['acc']:.3f}")
    progress = tqdm(total=total_steps, initial=start_step, desc="dpo", dynamic_ncols=True, disable=not main_rank,
                    mininterval=0.5 if sys.stderr.isatty() else 5)
    timer = StepTimer(env.device)
    swap_seconds = getattr(reference, "seconds", {"swap": 0.0})
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        started = time.perf_counter()
        timer.seconds.clear()
        swap_before = swap_seconds.get("swap", 0.0)
        metrics, tokens = accumulate_gradients(
            model, reference, sampler.next_step(), loss_fn, device=env.device, average_logps=cfg.average_logps,
            timer=timer,
        )
        with timer("optimizer"):
            train_metrics = metrics.means()
            grad_norm, lr = clip_and_step(
                model.parameters(), optimizer, scheduler, max_grad_norm=cfg.max_grad_norm,
                loss=train_metrics["preference_loss"], step=step,
                last_checkpoint=partial(latest_checkpoint, checkpoint_root),
            )
            reshard(model)  # nothing gathered before the update may serve the next forward

        elapsed = time.perf_counter() - started
        if log:
            swap = swap_seconds.get("swap", 0.0) - swap_before
            log.log({
                "step": step, "split": "train", "loss": train_metrics["preference_loss"], **train_metrics, "lr": lr,
                "grad_norm": grad_norm, "tokens_per_s_rank0": tokens / elapsed, "step_s": elapsed,
                "policy_s": timer.seconds["policy"], "reference_s": timer.seconds["reference"] - swap,
                "swap_s": swap, "optimizer_s": timer.seconds["optimizer"],
            })
        progress.update()
        progress.set_postfix(loss=f"{train_metrics['preference_loss']:.3f}", acc=f"{train_metrics['acc']:.2f}",
                             refresh=False)
        if step % cfg.eval_every == 0 or step == total_steps:
            val = validate(step)
            say(f"step {step}: validation loss {val['preference_loss']:.4f} acc {val['acc']:.3f}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            path = save_checkpoint(
                checkpoint_root, step, model, optimizer, keep_last=cfg.checkpoint.keep_last,
                trainer_state={"scheduler": scheduler.state_dict(), "data": sampler.state_dict()},
            )
            say(f"step {step}: checkpoint {path}")
    progress.close()
    if log:
        log.close()

    final_dir = save_full_model(model, output_dir / "final", dtype=resolve_dtype(cfg.save_dtype))
    if main_rank:
        write_hf_metadata(model, final_dir, cfg)
    barrier()
    if main_rank:
        if first_val and val:
            print(f"validation accuracy {first_val['acc']:.3f} -> {val['acc']:.3f}")
        print(f"metrics: {output_dir / 'metrics.jsonl'}\ncheckpoint: {final_dir}\noutput directory: "
              f"{output_dir.resolve()}")


if __name__ == "__main__":
    recipe_main(main, CONFIG_KEYS)
