"""The LoRA DPO plan: dpokit's single-device LoRA step against TRL+PEFT and torchtune's
lora_dpo_single_device, side by side in one run, printed as one table (issue 17, item 1).

    python benchmarks/lora_plan.py            # the full plan (peers need benchmarks/peers/setup_*.sh)
    python benchmarks/lora_plan.py --quick    # a smoke run: 3 runs, 2 pairs of <= 128 tokens, 1 step

The same machinery as run_all.py (its `run`, `ensure_assets` and table): every measurement runs in
a fresh subprocess, one after another, on the same pairs (HH-RLHF when ../shared/data has it, else
make_assets' synthetic HH-shaped pairs), the same random weights of the SmolLM2-135M architecture
(make_assets.py --model smollm2-135m: 30 layers, hidden 576, 9 / 3 heads, FFN 1536, vocabulary
49,152, tied embeddings), the same LoRA rank / alpha / targets (default 16 / 32 / every
projection of attention and MLP, as recipes/configs/dpo_lora_single_device/smollm2_135m.yaml),
the same learning rate (1e-4, fused AdamW, no clipping) and the same batch. Runners:
dpokit_lora_runner.py (this interpreter), peers/trl_runner.py --lora-rank and
peers/torchtune_runner.py --lora-rank (each peer's venv under benchmarks/.venvs/). The matmul peak
is measured at the start and the end of the run (the larger is the MFU denominator). MFU is
LoRA-aware: shared_io.lora_step_model_flops.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run_all import VENVS, ensure_assets, gib, run, throughput_table  # noqa: E402

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def dpokit_variants(quick: bool) -> list[tuple[str, list[str]]]:
    """(name, dpokit_lora_runner.py flags); bf16 = bf16 base, fp32 adapters (cast_base)."""
    if quick:
        return [("dpokit LoRA prefix+ffd bf16", ["--layout", "prefix", "--dtype", "bf16"])]
    return [
        ("dpokit LoRA padded bf16", ["--layout", "padded", "--dtype", "bf16"]),
        ("dpokit LoRA ffd bf16", ["--layout", "ffd", "--dtype", "bf16"]),
        ("dpokit LoRA prefix+ffd bf16", ["--layout", "prefix", "--dtype", "bf16"]),
        (
            "dpokit LoRA prefix+ffd bf16 ref=precomputed",
            ["--layout", "prefix", "--dtype", "bf16", "--reference", "precomputed"],
        ),
    ]


def peer_variants(quick: bool) -> list[tuple[str, str, list[str]]]:
    """(name, venv, runner flags). TRL: bf16=True autocast over a bf16 base, PEFT's fp32 adapters
    (faster than autocast over an fp32 base, which `--extra-peers` adds); torchtune: dtype bf16."""
    trl_base = ["--lora-rank", "{rank}", "--dtype", "bf16", "--base-dtype", "bf16"]
    runs = [
        ("TRL+PEFT bf16", "trl", trl_base),
        ("torchtune LoRA bf16", "torchtune", ["--lora-rank", "{rank}", "--dtype", "bf16"]),
    ]
    if not quick:
        runs.insert(1, ("TRL+PEFT bf16 ref=precomputed", "trl", [*trl_base, "--reference", "precomputed"]))
    return runs


def extra_peer_variants() -> list[tuple[str, str, list[str]]]:
    return [("TRL+PEFT bf16 autocast fp32 base", "trl", ["--lora-rank", "{rank}", "--dtype", "bf16"])]


def headline(results: list[dict]) -> list[str]:
    """Best dpokit run against the best run of each peer, and the same with the reference forward
    in every step (adapter off) on both sides; the goals of issue 17 item 1."""
    lines = []

    def best(framework: str, every_step: bool = False) -> dict | None:
        runs = [r for r in results if r["framework"] == framework]
        if every_step:
            runs = [r for r in runs if r.get("reference") != "precomputed"]
        return max(runs, key=lambda r: r["tokens_per_s"], default=None)

    for every_step in (False, True):
        ours = best("dpokit", every_step)
        for peer in ("trl", "torchtune"):
            theirs = best(peer, every_step)
            if not (ours and theirs):
                continue
            speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
            memory = ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]
            scope = "reference forward every step" if every_step else "best"
            lines.append(
                f"- {scope}: {ours['name']} ({ours['tokens_per_s']:.1f} tok/s, {gib(ours['peak_memory_bytes'])} GiB) / "
                f"{theirs['name']} ({theirs['tokens_per_s']:.1f} tok/s, {gib(theirs['peak_memory_bytes'])} GiB) = "
                f"**{speed:.2f}x** tokens/s (goal >= 3x: {'met' if speed >= 3 else 'missed'}), "
                f"**{memory:.2f}x** peak memory (goal <= 0.5x: {'met' if memory <= 0.5 else 'missed'})"
            )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", default=None, help="default benchmarks/.assets-lora (-quick with --quick)")
    ap.add_argument("--model", default="smollm2-135m", help="make_assets.py preset")
    ap.add_argument("--max-length", type=int, default=None, help="max tokens of prompt + one response (512; 128 quick)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic pairs even when HH-RLHF is present")
    ap.add_argument("--batch-size", type=int, default=None, help="pairs per step, every framework (8; 2 quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (2; 1 quick)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (1; 0 quick)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-targets", default=TARGETS, help="HF projection names (torchtune: the MLP all or none)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every runner")
    ap.add_argument("--quick", action="store_true", help="smoke run: one dpokit layout, TRL+PEFT, torchtune")
    ap.add_argument("--extra-peers", action="store_true", help="also TRL+PEFT with autocast over an fp32 base")
    ap.add_argument("--only", default=None, help="regex: run only the variants it matches")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the plan round-robin; each run keeps its best")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    ap.add_argument("--json", default=str(HERE / "results-lora.json"))
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--log", default=str(HERE / "lora_plan.log"), help="every runner's full output")
    args = ap.parse_args(argv)
    quick = args.quick
    args.assets = args.assets or str(HERE / (".assets-lora-quick" if quick else ".assets-lora"))
    args.max_length = args.max_length or (128 if quick else 512)
    args.batch_size = args.batch_size or (2 if quick else 8)
    args.steps = args.steps or (1 if quick else 2)
    args.warmup_steps = (0 if quick else 1) if args.warmup_steps is None else args.warmup_steps

    meta = ensure_assets(args)
    print(
        f"workload: {meta['pairs']} pairs from {meta['source']}, max length {meta['max_length']}; "
        f"model {args.model}; LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g}, targets {args.lora_targets}; "
        f"batch {args.batch_size} pairs x {args.steps} timed steps (+{args.warmup_steps} warmup)",
        flush=True,
    )
    threads = ["--threads", str(args.threads)] if args.threads else []
    common = [
        "--assets",
        args.assets,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup-steps",
        str(args.warmup_steps),
        *threads,
    ]
    lora = ["--lora-alpha", str(args.lora_alpha), "--lora-targets", args.lora_targets]
    plan = [
        (name, [sys.executable, str(HERE / "dpokit_lora_runner.py"), *flags, "--lora-rank", str(args.lora_rank)])
        for name, flags in dpokit_variants(quick)
    ]
    if not args.skip_peers:
        peers = peer_variants(quick) + (extra_peer_variants() if args.extra_peers else [])
        for name, venv, flags in peers:
            python = VENVS / venv / "bin" / "python"
            if not python.is_file():
                print(f"{name}: skipped, no {python} (run benchmarks/peers/setup_{venv}.sh)", flush=True)
                continue
            flags = [f.format(rank=args.lora_rank) for f in flags]
            plan.append((name, [str(python), str(HERE / "peers" / f"{venv}_runner.py"), *flags]))
    plan = [(name, [*cmd, *lora, *common, "--name", name]) for name, cmd in plan]
    if args.only:
        plan = [(n, c) for n, c in plan if re.search(args.only, n)]

    with open(args.log, "w") as log:
        peaks = [run([sys.executable, str(HERE / "matmul_peak.py"), *threads], args.timeout, log)]
        best: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for name, cmd in plan:
                print(f"running {name}{f' (round {round_ + 1})' if args.rounds > 1 else ''} ...", flush=True)
                result = run(cmd, args.timeout, log)
                if result:
                    print(
                        f"  {result['tokens_per_s']:.1f} useful tok/s, {gib(result['peak_memory_bytes'])} GiB",
                        flush=True,
                    )
                    if result["tokens_per_s"] > best.get(name, {}).get("tokens_per_s", 0):
                        best[name] = result
        peaks.append(run([sys.executable, str(HERE / "matmul_peak.py"), *threads], args.timeout, log))
    results = [best[name] for name, _ in plan if name in best]
    peaks = [p for p in peaks if p]
    peak = {d: max(p[d] for p in peaks) for d in ("fp32", "bf16")} if peaks else {}

    lines = [
        f"Matmul peak (best of start/end of run): fp32 {peak.get('fp32', 0) / 1e12:.3f} TFLOP/s, "
        f"bf16 {peak.get('bf16', 0) / 1e12:.3f} TFLOP/s",
        "",
    ]
    lines += throughput_table(results, peak)
    lines += ["", *headline(results)]
    print("\n" + "\n".join(lines))
    Path(args.json).write_text(
        json.dumps({"workload": meta, "args": vars(args), "matmul_peak": peaks, "throughput": results}, indent=1)
    )
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
