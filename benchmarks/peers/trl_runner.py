"""TRL's `DPOTrainer` on the benchmark workload. Run with the TRL venv's python (setup_trl.sh);
no dpokit import.

The pairs are already token ids, so `_prepare_dataset` is replaced by the identity (TRL would
otherwise decode nothing and re-tokenize text; it is not timed either way) and the sampler is
sequential, so TRL sees the same pairs in the same batches as the other runners. Everything timed
is TRL's own: its `DataCollatorForPreference`, its fused LM head (log-probs without the full
logits), its reference forward on an explicit `ref_model` (or `precompute_ref_log_probs`), its
sigmoid DPO loss, transformers' Trainer step with torch AdamW.

Settings (best honest ones on this stack): bf16 = `bf16=True` (autocast over fp32 weights, as
dpokit's bf16), `attn_implementation="sdpa"`, gradient checkpointing off (TRL's default is on: it
trades a second forward for memory; --gradient-checkpointing turns it back on), no gradient
clipping, constant learning rate. `padding_free` is not offered: TRL 1.16 disables it ("temporarily
unavailable after a refactor": setting it warns and falls back to padding). Step time = wall time
between the Trainer's on_step_begin and on_step_end callbacks, after the warmup steps.

LoRA (--lora-rank > 0, benchmarks/lora_plan.py): `peft_config=LoraConfig(r, lora_alpha, target_modules,
lora_dropout=0)` and no ref_model, so TRL's reference is the same PEFT model with its adapter
disabled (or precompute_ref_log_probs). --base-dtype bf16 loads the model in bf16 (PEFT keeps the
adapters in fp32: `autocast_adapter_dtype=True`, its default) under `bf16=True` autocast.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from shared_io import emit, read_model_config, read_workload, throughput_result  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer over a dataset that already has prompt_ids / chosen_ids / rejected_ids, in order."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class StepTimes(TrainerCallback):
    def __init__(self):
        self.seconds, self.logs = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def id_tokenizer(pad_id: int, eos_id: int, vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer object that only carries the special ids (the data is already ids)."""
    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    vocab["<pad>"], vocab["</s>"] = pad_id, eos_id
    del vocab[f"<t{pad_id}>"], vocab[f"<t{eos_id}>"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", required=True)
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--reference", default="frozen_copy", choices=("frozen_copy", "precomputed"))
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="TrainingArguments.torch_compile")
    ap.add_argument("--base-dtype", default="fp32", choices=("fp32", "bf16"), help="dtype the model is loaded in")
    ap.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA DPO through PEFT (a LoraConfig)")
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--lr", type=float, default=None, help="default 1e-5 (full), 1e-4 (LoRA)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = Path(args.assets)
    config = read_model_config(assets / "model")
    workload = read_workload(assets / "pairs.json")
    pairs, meta = workload["pairs"], workload["meta"]
    total_steps = args.warmup_steps + args.steps
    used = pairs[: total_steps * args.batch_size]
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in used])
    device = "cuda" if torch.cuda.is_available() else "cpu"

    base_dtype = torch.bfloat16 if args.base_dtype == "bf16" else torch.float32
    lora = args.lora_rank > 0
    targets = [t for t in args.lora_targets.split(",") if t]

    def load():
        return AutoModelForCausalLM.from_pretrained(assets / "model", attn_implementation="sdpa", dtype=base_dtype)

    model = load()
    # PEFT: the reference is the policy with its adapter disabled (TRL's own choice without ref_model).
    ref_model = None if args.reference == "precomputed" or lora else load()
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
    with tempfile.TemporaryDirectory() as out:
        training_args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=total_steps,
            learning_rate=args.lr or (1e-4 if lora else 1e-5),
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=0.0,
            beta=0.1,
            loss_type=["sigmoid"],
            bf16=args.dtype == "bf16",
            max_length=None,
            gradient_checkpointing=args.gradient_checkpointing,
            torch_compile=args.compile,
            precompute_ref_log_probs=args.reference == "precomputed",
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            dataloader_num_workers=0,
            use_cpu=device == "cpu",
            seed=0,
            disable_dropout=True,
            optim="adamw_torch_fused",  # TRL's default with torch >= 2.8
        )
        times = StepTimes()
        started = time.perf_counter()
        trainer = PretokenizedDPOTrainer(
            model=model,
            ref_model=ref_model,
            peft_config=peft_config,
            args=training_args,
            train_dataset=dataset,
            processing_class=id_tokenizer(meta["pad_id"], meta["eos_id"], config["vocab_size"]),
            callbacks=[times],
        )
        setup_seconds = time.perf_counter() - started  # includes the precompute pass when enabled
        trained = [p for p in trainer.model.parameters() if p.requires_grad]
        adapter_params = sum(p.numel() for p in trained) if lora else None
        adapter_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trained})
        trainer.train()
    timed = times.seconds[args.warmup_steps :]
    step_logs = [log for log in times.logs if "loss" in log]
    emit(
        throughput_result(
            name=args.name
            or f"TRL{'+PEFT' if lora else ''} {args.dtype}"
            + (" precomputed-ref" if args.reference == "precomputed" else ""),
            framework="trl",
            config=config,
            pairs=used[args.warmup_steps * args.batch_size :],
            seconds=sum(timed),
            steps=len(timed),
            device=device,
            reference_forward=args.reference != "precomputed",
            losses=[log["loss"] for log in step_logs],
            lora_adapter_params=adapter_params,
            lora_rank=args.lora_rank or None,
            lora_alpha=args.lora_alpha if lora else None,
            lora_targets=targets if lora else None,
            base_dtype=args.base_dtype,
            trainable_dtypes=adapter_dtypes,
            peft_version=__import__("peft").__version__ if lora else None,
            dtype=args.dtype,
            reference="adapter_off" if lora and args.reference != "precomputed" else args.reference,
            compile=args.compile,
            gradient_checkpointing=args.gradient_checkpointing,
            batch_size=args.batch_size,
            first_mean_chosen_logp=step_logs[0].get("logps/chosen") if step_logs else None,
            setup_seconds=setup_seconds,
            version=trl.__version__,
            transformers_version=transformers.__version__,
            torch_version=torch.__version__,
            threads=torch.get_num_threads(),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
