"""DPO with LoRA adapters on one device (CPU, one GPU or Apple MPS).

The reference policy is the same model with its adapters switched off, so there is exactly one
copy of the weights. Run it with

    dpokit run dpo_lora_single_device --config tiny [key=value ...]

or copy it (`dpokit cp dpo_lora_single_device my_dpo.py`) and edit: this file is the whole loop.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from dpokit.config import instantiate, recipe_main
from dpokit.data import collate_packed, collate_preference_pairs, training_set
from dpokit.errors import DpokitError
from dpokit.losses import is_reference_free
from dpokit.models import adapter_params, cast_base, parameter_summary
from dpokit.training import (
    AdapterOffReference,
    JsonlLogger,
    PairMetrics,
    batches_forever,
    clip_and_step,
    evaluate_preference,
    move_batch,
    policy_logps,
    preference_loss,
    resolve_device,
    resolve_dtype,
    save_lora_checkpoint,
    seed_everything,
    warmup_warning,
)

CONFIG_KEYS = (
    "output_dir",
    "seed",
    "device",
    "dtype",
    "checkpoint_dir",
    "tokenizer",
    "model",
    "train_dataset",
    "validation_dataset",
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
)


def main(cfg) -> None:
    """DPO with LoRA on a single device; the reference is the model with adapters off."""
    data_generator = seed_everything(cfg.seed)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml")

    # Data: chosen and rejected of a batch go through the model as one padded batch, or, with
    # packing, several pairs share each row (a batch is then `batch_size` packs).
    tokenizer = instantiate(cfg.tokenizer)
    train_set = instantiate(cfg.train_dataset, tokenizer=tokenizer)
    validation_set = instantiate(cfg.validation_dataset, tokenizer=tokenizer)
    print(f"train: {train_set.stats.summary()}\nvalidation: {validation_set.stats.summary()}")
    collate = partial(collate_preference_pairs, pad_id=tokenizer.pad_id)
    packer = None if cfg.packing is None else partial(instantiate, cfg.packing)  # `packing:` online
    train_set, packed = training_set(train_set, packer=packer, ld_alpha=cfg.ld_alpha)  # or a `dpokit pack` file
    if packed:
        print(f"packing: {train_set.stats.summary()}")
        train_collate = partial(
            collate_packed,
            pad_id=tokenizer.pad_id,
            pack_size=train_set.pack_size,
            prefix_sharing=train_set.prefix_sharing,
        )
    else:
        train_collate = collate
    items_per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    if len(train_set) < items_per_step:
        raise DpokitError(f"{train_set.path}: {len(train_set)} training items, fewer than one step's {items_per_step}")
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=train_collate,
        generator=data_generator,
    )
    validation_loader = DataLoader(validation_set, batch_size=cfg.eval_batch_size, collate_fn=collate)

    # Model: only the adapters train; the reference is the same module with adapters off. The
    # frozen base is cast to `dtype`, the adapters stay fp32 so small updates are not rounded away.
    model = cast_base(instantiate(cfg.model), dtype).to(device)
    trainable = list(adapter_params(model).values())
    loss_fn = instantiate(cfg.loss)
    # Reference-free losses (SimPO, CPO, ORPO, ...) never run the reference forward.
    reference = None
    if not is_reference_free(loss_fn):
        reference = AdapterOffReference(model, average_logps=cfg.average_logps, ld_alpha=cfg.ld_alpha)
    print(f"model: {parameter_summary(model)}")

    steps_per_epoch = len(train_set) // items_per_step
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = instantiate(cfg.optimizer, trainable)
    scheduler = instantiate(cfg.lr_scheduler, optimizer, total_steps=total_steps)
    warning = warmup_warning(warmup_steps=cfg.lr_scheduler.get("warmup_steps", 0), total_steps=total_steps)
    if warning:
        print(f"warning: lr_scheduler.{warning}", file=sys.stderr)

    log = JsonlLogger(output_dir / "metrics.jsonl")

    def validate(step: int) -> dict:
        metrics = evaluate_preference(
            model,
            reference,
            validation_loader,
            loss_fn,
            device=device,
            average_logps=cfg.average_logps,
            ld_alpha=cfg.ld_alpha,
        )
        log.log({"step": step, "split": "validation", **metrics})
        return metrics

    val = validate(0)
    first_val_acc = val["acc"]
    progress = tqdm(total=total_steps, desc="dpo", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 5)
    progress.write(f"step 0: validation loss {val['preference_loss']:.4f} acc {val['acc']:.3f}")
    batches = batches_forever(train_loader)
    model.train()
    for step in range(1, total_steps + 1):
        started = time.perf_counter()
        metrics, tokens = PairMetrics(), 0
        micro_batches = [move_batch(next(batches), device) for _ in range(cfg.gradient_accumulation_steps)]
        pairs_in_step = sum(batch["num_pairs"] for batch in micro_batches)  # varies when packed
        for batch in micro_batches:
            policy = policy_logps(model, batch, average=cfg.average_logps, ld_alpha=cfg.ld_alpha)
            ref = None if reference is None else reference.logps(batch)
            out = preference_loss(loss_fn, policy, ref, batch, averaged=cfg.average_logps)
            # Sum over pairs / pairs in the whole step: the gradient is the mean over every pair of
            # the step, however it is split into micro-batches.
            (out.losses.sum() / pairs_in_step).backward()
            metrics.add(out, policy.chosen, policy.rejected)
            tokens += batch["num_tokens"]
        train = metrics.means()
        grad_norm, lr = clip_and_step(
            trainable, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm, loss=train["preference_loss"], step=step
        )

        record = {
            "step": step,
            "split": "train",
            "loss": train["loss"],
            **train,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / (time.perf_counter() - started),
        }
        log.log(record)
        progress.update()
        progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.2f}", refresh=False)
        if step % cfg.eval_every == 0 or step == total_steps:
            val = validate(step)
            progress.write(f"step {step}: validation loss {val['preference_loss']:.4f} acc {val['acc']:.3f}")
    progress.close()
    log.close()

    # With an HF checkpoint_dir, the output is a complete HF folder (its config and tokenizer files
    # too). The merge is fp32; a bf16 save_dtype is measured on a few validation sequences.
    probe_sequences = list(next(iter(validation_loader))["input_ids"][:4])
    export = save_lora_checkpoint(
        model,
        output_dir / "final",
        source_dir=cfg.checkpoint_dir,
        dtype=resolve_dtype(cfg.save_dtype),
        probe_sequences=probe_sequences,
    )
    print(export.summary())
    print(f"validation accuracy {first_val_acc:.3f} -> {val['acc']:.3f}")
    print(f"metrics: {log.path}\ncheckpoint: {export.directory}\noutput directory: {output_dir.resolve()}")


if __name__ == "__main__":
    recipe_main(main, CONFIG_KEYS)
