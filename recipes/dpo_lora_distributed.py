"""DPO with LoRA adapters on one or many GPUs (or CPU processes) with FSDP2.

    dpokit run dpo_lora_distributed --config tiny --nproc_per_node 2        # 2 CPU processes

The base weights are frozen and sharded with FSDP2 like in `dpo_full_distributed`; only the LoRA
adapters train. The reference is the same model with its adapters switched off, so there is one
copy of the weights and no swap. Intermediate checkpoints hold only what trains (adapters and
their optimizer state; the base is the initial checkpoint's), the final save is the merged model
in Hugging Face safetensors plus the adapter alone in PEFT layout.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from dpokit.data import collate_preference_pairs
from dpokit.recipes.configs import instantiate, recipe_main
from dpokit.training import JsonlLogger, resolve_dtype, seed_everything
from dpokit.training.dist_checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_hf_safetensors,
)
from dpokit.training.dist_data import GlobalBatchSampler, eval_batches
from dpokit.training.distributed import barrier, destroy_distributed, init_distributed
from dpokit.training.fsdp import check_no_meta, load_into_shards, materialize, reshard, shard_model, state_dict_tensors
from dpokit.training.optim_step import clip_and_step
from dpokit.training.preference_step import StepTimer, accumulate_gradients, evaluate_distributed
from dpokit.training.fsdp_lora import adapter_full_tensors, fresh_adapter_tensors, merged_full_tensors
from dpokit.training.reference import AdapterOffReference

CONFIG_KEYS = (
    "output_dir", "seed", "device", "dtype", "tokenizer", "model", "checkpoint_dir", "train_dataset",
    "validation_dataset", "loss", "average_logps", "fsdp", "optimizer", "lr_scheduler", "batch_size",
    "gradient_accumulation_steps", "epochs", "max_steps", "max_grad_norm", "eval_every", "eval_batch_size",
    "checkpoint", "resume", "save_dtype",
)


def weight_source(cfg, model):
    """A fresh (key, tensor) stream of the initial weights, one tensor at a time: the base weights
    of a Hugging Face checkpoint plus freshly initialised adapters, or (without `checkpoint_dir`) a
    random init of the whole model from the seed (tiny models only)."""
    if cfg.checkpoint_dir is not None:
        from dpokit.models.hf_checkpoint import iter_hf_weights

        return itertools.chain(iter_hf_weights(cfg.checkpoint_dir), fresh_adapter_tensors(model, seed=cfg.seed))
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        full = instantiate(cfg.model)
    return state_dict_tensors(full)


def build_sharded_model(cfg, env):
    """Meta-device build -> FSDP2 sharding -> rank-local loading (base + adapters)."""
    with torch.device("meta"):
        model = instantiate(cfg.model)  # the LoRA builder marks only the adapters trainable
    model.to(resolve_dtype(cfg.dtype))
    param_dtype = resolve_dtype(cfg.fsdp.param_dtype) if cfg.fsdp.param_dtype else None
    shard_model(
        model, param_dtype=param_dtype, reduce_dtype=resolve_dtype(cfg.fsdp.reduce_dtype),
        cpu_offload=cfg.fsdp.cpu_offload, activation_checkpointing=cfg.fsdp.activation_checkpointing,
        compile_blocks=cfg.fsdp.compile,
    )
    materialize(model, "cpu" if cfg.fsdp.cpu_offload else env.device, buffer_device=env.device)
    load_into_shards(model, weight_source(cfg, model), source=str(cfg.checkpoint_dir or "random init"))
    check_no_meta(model)
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


def write_peft_adapter(model, adapters: dict, directory: Path, cfg) -> None:
    """adapter_model.safetensors (PEFT key names) + adapter_config.json in `directory`.

    Never the merged model's own folder: transformers would apply an adapter it finds next to
    config.json on top of the already-merged weights."""
    from safetensors.torch import save_file

    from dpokit.models.hf_checkpoint import peft_adapter_config, peft_key

    directory.mkdir(parents=True, exist_ok=True)
    save_file({peft_key(k): v.contiguous() for k, v in adapters.items()}, directory / "adapter_model.safetensors",
              metadata={"format": "pt"})
    config = peft_adapter_config(model, cfg.checkpoint_dir)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(cfg) -> None:
    """DPO with LoRA and FSDP2 (torchrun); the reference is the model with adapters off."""
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

    # Model: frozen sharded base + trainable adapters; the reference is the same model, adapters off.
    model = build_sharded_model(cfg, env)
    trainable = [p for p in model.parameters() if p.requires_grad]
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in trainable):,} trainable (LoRA), sharded over {env.world_size} rank(s)")
    loss_fn = instantiate(cfg.loss)
    reference = validation_reference = AdapterOffReference(model, average_logps=cfg.average_logps)

    total_steps = cfg.epochs * sampler.steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = instantiate(cfg.optimizer, trainable)
    scheduler = instantiate(cfg.lr_scheduler, optimizer, total_steps=total_steps)

    # Resume: model + optimizer shards, scheduler, data position, RNG, step.
    checkpoint_root = Path(cfg.checkpoint.dir)
    resume_from = resolve_resume(cfg.resume, checkpoint_root)
    start_step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, trainable_only=True)
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
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        started = time.perf_counter()
        timer.seconds.clear()
        metrics, tokens = accumulate_gradients(
            model, reference, sampler.next_step(), loss_fn, device=env.device, average_logps=cfg.average_logps,
            timer=timer,
        )
        with timer("optimizer"):
            train_metrics = metrics.means()
            grad_norm, lr = clip_and_step(
                trainable, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm,
                loss=train_metrics["preference_loss"], step=step,
                last_checkpoint=partial(latest_checkpoint, checkpoint_root),
            )
            reshard(model)  # nothing gathered before the update may serve the next forward

        elapsed = time.perf_counter() - started
        if log:
            log.log({
                "step": step, "split": "train", "loss": train_metrics["preference_loss"], **train_metrics, "lr": lr,
                "grad_norm": grad_norm, "tokens_per_s_rank0": tokens / elapsed, "step_s": elapsed,
                "policy_s": timer.seconds["policy"], "reference_s": timer.seconds["reference"],
                "optimizer_s": timer.seconds["optimizer"],
            })
        progress.update()
        progress.set_postfix(loss=f"{train_metrics['preference_loss']:.3f}", acc=f"{train_metrics['acc']:.2f}",
                             refresh=False)
        if step % cfg.eval_every == 0 or step == total_steps:
            val = validate(step)
            say(f"step {step}: validation loss {val['preference_loss']:.4f} acc {val['acc']:.3f}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            path = save_checkpoint(
                checkpoint_root, step, model, optimizer, keep_last=cfg.checkpoint.keep_last, trainable_only=True,
                trainer_state={"scheduler": scheduler.state_dict(), "data": sampler.state_dict()},
            )
            say(f"step {step}: checkpoint {path}")
    progress.close()
    if log:
        log.close()

    # Final: the merged model (HF safetensors, gathered one module at a time) in final/, the adapter
    # alone (PEFT layout) in final/adapter/.
    final_dir = save_hf_safetensors(merged_full_tensors(model, dtype=resolve_dtype(cfg.save_dtype)),
                                    output_dir / "final")
    adapters = adapter_full_tensors(model)
    if main_rank:
        write_hf_metadata(model, final_dir, cfg)
        write_peft_adapter(model, adapters, final_dir / "adapter", cfg)
    barrier()
    if main_rank:
        if first_val and val:
            print(f"validation accuracy {first_val['acc']:.3f} -> {val['acc']:.3f}")
        print(f"metrics: {output_dir / 'metrics.jsonl'}\ncheckpoint: {final_dir}\noutput directory: "
              f"{output_dir.resolve()}")


if __name__ == "__main__":
    recipe_main(main, CONFIG_KEYS)
