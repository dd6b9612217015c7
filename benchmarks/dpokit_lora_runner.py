"""One dpokit LoRA throughput measurement: single-device LoRA DPO steps over the benchmark pairs.

The model and step are those of `recipes/dpo_lora_single_device.py`: `load_hf_checkpoint` with
fresh LoRA adapters (`lora_targets` / `lora_rank` / `lora_alpha`, dropout 0), `cast_base` (the
frozen base in --dtype, the adapters in fp32), the reference = the same model with adapters off
(`AdapterOffReference`) or log-probs computed once before the timed steps
(`precomputed_references` keyed by `weights_fingerprint`, the recipe's `reference.strategy:
precomputed`; that pass is reported as `precompute_seconds`), and the library's
`accumulate_gradients` (reference log-probs, policy forward, DPO loss, backward) followed by a
fused AdamW step over the adapters. No gradient clipping, as in the peers' runs.

Batches are built as in dpokit_runner.py (`make_steps`): padded, or packed (FFD) / prefix-shared +
FFD packs grouped so that a step holds --batch-size pairs on average; every layout trains on the
same pairs. Prints one `BENCH_RESULT {json}` line (shared_io.emit), with LoRA-aware model FLOPs
(shared_io.lora_step_model_flops).

    python benchmarks/dpokit_lora_runner.py --assets benchmarks/.assets-lora --layout prefix --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# This checkout's dpokit, not an installed one (an editable install may point at another tree).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpokit_runner import LAYOUTS, make_steps, print_profile  # noqa: E402
from shared_io import (  # noqa: E402
    Stopwatch,
    emit,
    lora_adapter_params,
    matmul_params,
    read_model_config,
    read_workload,
    throughput_result,
)

import dpokit  # noqa: E402
from dpokit.data import collate_preference_pairs  # noqa: E402
from dpokit.losses import dpo_loss  # noqa: E402
from dpokit.models import adapter_params, cast_base, disable_adapter, load_hf_checkpoint, prepare_blocks  # noqa: E402
from dpokit.training import (  # noqa: E402
    AdapterOffReference,
    accumulate_gradients,
    precomputed_references,
    weights_fingerprint,
)
from dpokit.training.forward import policy_logps  # noqa: E402
from dpokit.training.host_memory import retain_freed_cpu_memory  # noqa: E402
from dpokit.training.throughput import flops_per_token  # noqa: E402

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", required=True, help="directory written by make_assets.py")
    ap.add_argument("--layout", default="prefix", choices=LAYOUTS)
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"), help="the frozen base's dtype (adapters fp32)")
    ap.add_argument("--reference", default="adapter_off", choices=("adapter_off", "precomputed"))
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block (prepare_blocks)")
    ap.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each block in the backward (prepare_blocks)"
    )
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-targets", default=DEFAULT_TARGETS)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--pack-size", type=int, default=None, help="tokens per pack (default 2 x max length)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None)
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc malloc as it is (the recipes call retain_freed_cpu_memory; this measures without)",
    )
    ap.add_argument("--profile", action="store_true", help="torch.profiler over the timed steps (to stderr)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if not args.default_malloc:
        retain_freed_cpu_memory()
    assets = Path(args.assets)
    config = read_model_config(assets / "model")
    workload = read_workload(assets / "pairs.json")
    pairs, meta = workload["pairs"], workload["meta"]
    pack_size = args.pack_size or 2 * meta["max_length"]
    warm_pairs, timed_pairs = args.warmup_steps * args.batch_size, args.steps * args.batch_size
    if warm_pairs + timed_pairs > len(pairs):
        raise SystemExit(f"need {warm_pairs + timed_pairs} pairs, the workload has {len(pairs)}")
    build = dict(
        layout=args.layout, batch_size=args.batch_size, pack_size=pack_size, pad_id=meta["pad_id"], seed=args.seed
    )
    warmup = make_steps(pairs, 0, warm_pairs, **build) if warm_pairs else []
    timed = make_steps(pairs, warm_pairs, timed_pairs, **build)

    device = torch.device(args.device)
    targets = [t for t in args.lora_targets.split(",") if t]
    lora = {"lora_targets": targets, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": 0.0}
    # Loaded in the base's dtype (the loader streams and casts tensor by tensor; a published SmolLM2
    # checkpoint is stored in bf16 anyway), then the recipe's cast_base: adapters back to fp32.
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = cast_base(load_hf_checkpoint(assets / "model", lora=lora, dtype=dtype, device=device), dtype)
    prepare_blocks(model, activation_checkpointing=args.activation_checkpointing, compile_blocks=args.compile)
    trainable = list(adapter_params(model).values())
    n_adapter = sum(p.numel() for p in trainable)
    expected = lora_adapter_params(config, args.lora_rank, targets)
    if n_adapter != expected:
        raise SystemExit(f"adapter parameters {n_adapter} != {expected} counted from config.json")
    model.train()

    # Cross-framework check: log-probs of the first --batch-size pairs at the initial weights (B = 0:
    # the base model) in this run's layout and precision; the peers' first step holds these pairs.
    first_chosen_logps = {}
    with torch.no_grad():
        for batch in make_steps(pairs, 0, args.batch_size, **build):
            out = policy_logps(model, batch.to(device))
            first_chosen_logps.update({int(i): float(v) for i, v in zip(batch.pair_index, out.chosen)})

    precompute_seconds, note = 0.0, None
    if args.reference == "precomputed":  # as the recipe: the base's log-probs of every used pair, once
        started = time.perf_counter()
        with disable_adapter(model):
            reference, _, note = precomputed_references(
                model,
                pairs[: warm_pairs + timed_pairs],
                {},
                partial(collate_preference_pairs, pad_id=meta["pad_id"]),
                weights=weights_fingerprint(model),
                cache_dir=None,
                batch_size=args.batch_size,
                device=device,
                dtype=args.dtype,
            )
        precompute_seconds = time.perf_counter() - started
    else:
        reference = AdapterOffReference(model)

    optimizer = torch.optim.AdamW(trainable, lr=args.lr, fused=True)
    loss_fn = partial(dpo_loss, beta=0.1)
    losses: list[float] = []

    def step(batch) -> None:
        metrics, _ = accumulate_gradients(model, reference, [batch], loss_fn, device=device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(metrics.means()["preference_loss"])

    for batch in warmup:
        step(batch)
    watch = Stopwatch(str(device))
    profiler = torch.profiler.profile(record_shapes=False) if args.profile else contextlib.nullcontext()
    with profiler:
        for batch in timed:
            with watch:
                step(batch)
    if args.profile:
        print_profile(profiler, watch.seconds)

    reference_forward = args.reference == "adapter_off"
    n = matmul_params(config)
    emit(
        throughput_result(
            name=args.name or f"dpokit LoRA {args.layout} {args.dtype} ref={args.reference}",
            framework="dpokit",
            config=config,
            pairs=pairs[warm_pairs : warm_pairs + timed_pairs],
            seconds=watch.seconds,
            steps=watch.steps,
            device=str(device),
            prefix_sharing=args.layout == "prefix",
            reference_forward=reference_forward,
            losses=losses,
            lora_adapter_params=n_adapter,
            layout=args.layout,
            dtype=args.dtype,
            reference=args.reference,
            compile=args.compile,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_targets=targets,
            batch_size=args.batch_size,
            pack_size=pack_size if args.layout != "padded" else None,
            precompute_seconds=precompute_seconds,
            precompute_note=note,
            first_chosen_logps=first_chosen_logps,
            padded_tokens=sum(int(b.input_ids.numel()) for b in timed),
            # The library's per-token count (attention left out) must equal the plan's 4N + 6n (+ 2N).
            library_flops_per_token=flops_per_token(model, reference_forward=reference_forward),
            plan_flops_per_token=(4 * n + 6 * n_adapter) + (2 * n if reference_forward else 0),
            dpokit_file=dpokit.__file__,
            threads=torch.get_num_threads(),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
