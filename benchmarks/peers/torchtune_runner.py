"""torchtune's DPO on the benchmark workload: its Llama 3 model builder, its `padded_collate_dpo`,
`rlhf.get_batch_log_probs` and `DPOLoss`, in the step of its `full_dpo_distributed` recipe
(`concatenated_forward` of the policy, the same under no_grad for a frozen reference copy, loss,
backward, AdamW). Run with the torchtune venv's python (setup_torchtune.sh); no dpokit import.

Settings: --dtype bf16 puts the weights in bf16 (torchtune's `dtype: bf16`, its recommended
setting; torchtune has no autocast mode), fp32 keeps them in fp32. --compile compiles each layer
(torchtune's `compile: True`, via `training.compile_model`). Weights come from the HF checkpoint
through torchtune's own `convert_weights.hf_to_tune` (which permutes q/k to its RoPE layout).

LoRA (--lora-rank > 0, benchmarks/lora_plan.py): the step of torchtune's `lora_dpo_single_device`
recipe: its `lora_llama3_2` builder (tied embeddings as the config says; `scale_factor=1` makes
its scaled RoPE the plain RoPE of the checkpoint), the model built under
`training.set_default_dtype(dtype)` as the recipe does (so the adapters are in that dtype too),
`set_trainable_params(model, get_adapter_params(model))`, policy `concatenated_forward` then the
reference as the same forward under `torch.no_grad()` + `disable_adapter(model)`, `DPOLoss`,
backward, AdamW over the adapters.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safetensors.torch import load_file  # noqa: E402
from shared_io import Stopwatch, emit, read_model_config, read_workload, step_slices, throughput_result  # noqa: E402
from torchtune import rlhf, training  # noqa: E402
from torchtune.data import padded_collate_dpo  # noqa: E402
from torchtune.models.convert_weights import hf_to_tune  # noqa: E402
from torchtune.models.llama3 import llama3  # noqa: E402
from torchtune.rlhf.loss import DPOLoss  # noqa: E402

IGNORE = -100


def build_model(model_dir: Path, config: dict, dtype: torch.dtype, device: str):
    model = llama3(
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        embed_dim=config["hidden_size"],
        max_seq_len=config["max_position_embeddings"],
        intermediate_dim=config["intermediate_size"],
        rope_base=int(config["rope_theta"]),
        norm_eps=config["rms_norm_eps"],
    )
    state = hf_to_tune(
        load_file(str(model_dir / "model.safetensors")),
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        dim=config["hidden_size"],
        head_dim=config.get("head_dim"),
    )
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype)


# dpokit / HF projection names -> torchtune's (lora_attn_modules, and the MLP as one switch).
TUNE_ATTENTION = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}


def build_lora_model(model_dir: Path, config: dict, dtype: torch.dtype, device: str, args):
    from torchtune.models.llama3_2 import lora_llama3_2
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    targets = set(t for t in args.lora_targets.split(",") if t)
    if targets & MLP and not MLP <= targets:
        raise SystemExit("torchtune applies LoRA to the whole MLP or none of it: target all of gate/up/down_proj")
    with training.set_default_dtype(dtype), torch.device(device):
        model = lora_llama3_2(
            lora_attn_modules=[TUNE_ATTENTION[t] for t in TUNE_ATTENTION if t in targets],
            apply_lora_to_mlp=MLP <= targets,
            apply_lora_to_output=False,
            vocab_size=config["vocab_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config["num_key_value_heads"],
            embed_dim=config["hidden_size"],
            max_seq_len=config["max_position_embeddings"],
            intermediate_dim=config["intermediate_size"],
            norm_eps=config["rms_norm_eps"],
            rope_base=int(config["rope_theta"]),
            scale_factor=1,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            tie_word_embeddings=bool(config.get("tie_word_embeddings")),
        )
    adapters = get_adapter_params(model)
    set_trainable_params(model, adapters)
    state = hf_to_tune(
        load_file(str(model_dir / "model.safetensors")),
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        dim=config["hidden_size"],
        head_dim=config.get("head_dim"),
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if "lora" not in k] + list(unexpected)
    if wrong:
        raise SystemExit(f"base weights do not fit the LoRA model: {wrong[:5]}")
    del state
    return model, adapters


def example(pair: dict) -> dict:
    """torchtune's DPO example layout: labels aligned with input ids, prompt positions ignored."""
    p = pair["prompt_ids"]
    out = {}
    for side in ("chosen", "rejected"):
        response = pair[f"{side}_ids"]
        out[f"{side}_input_ids"] = p + response
        out[f"{side}_labels"] = [IGNORE] * len(p) + response
    return out


def concatenated_forward(model, input_ids, labels):
    """As torchtune's full_dpo_distributed recipe: one forward of chosen+rejected rows."""
    half = input_ids.shape[0] // 2
    logits = model(input_ids)
    chosen = rlhf.get_batch_log_probs(logits[:half], labels[:half], return_average_logprobs=False)
    rejected = rlhf.get_batch_log_probs(logits[half:], labels[half:], return_average_logprobs=False)
    return chosen, rejected


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", required=True)
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--lora-rank", type=int, default=0, help="> 0: the lora_dpo_single_device step")
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--lr", type=float, default=None, help="default 1e-5 (full), 1e-4 (LoRA)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    assets = Path(args.assets)
    config = read_model_config(assets / "model")
    workload = read_workload(assets / "pairs.json")
    pairs, pad_id = workload["pairs"], workload["meta"]["pad_id"]
    warm_pairs, timed_pairs = args.warmup_steps * args.batch_size, args.steps * args.batch_size
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = args.device

    lora = args.lora_rank > 0
    if lora:
        from torchtune.modules.peft import disable_adapter

        model, adapters = build_lora_model(assets / "model", config, dtype, device, args)
        ref_model = None  # the policy with its adapters disabled
        trained = list(adapters.values())
    else:
        model = build_model(assets / "model", config, dtype, device)
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        trained = list(model.parameters())
    if args.compile:
        training.compile_model(model)
        if ref_model is not None:
            training.compile_model(ref_model)
    loss_fn = DPOLoss(beta=0.1)
    lr = args.lr or (1e-4 if lora else 1e-5)
    optimizer = torch.optim.AdamW(trained, lr=lr, fused=True)  # as torchtune's configs
    losses, first = [], None

    def step(indices) -> None:
        nonlocal first
        input_ids, labels = padded_collate_dpo(
            [example(pairs[i]) for i in indices], padding_idx=pad_id, ignore_idx=IGNORE
        )
        input_ids, labels = input_ids.to(device), labels.to(device)
        policy_chosen, policy_rejected = concatenated_forward(model, input_ids, labels)
        with torch.no_grad(), disable_adapter(model) if lora else contextlib.nullcontext():
            ref_chosen, ref_rejected = concatenated_forward(ref_model or model, input_ids, labels)
        loss, _, _ = loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        loss = loss.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if first is None:
            first = {int(i): float(v) for i, v in zip(indices, policy_chosen.detach())}

    for batch in step_slices(warm_pairs, args.batch_size):
        step(list(batch))
    watch = Stopwatch(device)
    for batch in step_slices(timed_pairs, args.batch_size):
        with watch:
            step([warm_pairs + i for i in batch])
    import torchtune

    emit(
        throughput_result(
            name=args.name or f"torchtune{' LoRA' if lora else ''} {args.dtype}{' compile' if args.compile else ''}",
            framework="torchtune",
            config=config,
            pairs=pairs[warm_pairs : warm_pairs + timed_pairs],
            seconds=watch.seconds,
            steps=watch.steps,
            device=device,
            losses=losses,
            lora_adapter_params=sum(p.numel() for p in trained) if lora else None,
            lora_rank=args.lora_rank or None,
            lora_alpha=args.lora_alpha if lora else None,
            trainable_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in trained}),
            dtype=args.dtype,
            compile=args.compile,
            batch_size=args.batch_size,
            first_chosen_logps=first,
            version=torchtune.__version__,
            torch_version=torch.__version__,
            threads=torch.get_num_threads(),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
