"""Per-step time split of `dpo_full_distributed` for each reference strategy, side by side.

Runs the recipe's tiny config (or --config) with 2 ranks (CPU/gloo here; GPUs if present) once
per strategy and averages the per-step phases it logs in metrics.jsonl, skipping warm-up steps:

    policy     forward + backward of the policy (incl. FSDP all-gathers / reduce-scatters)
    reference  the reference forward (or the table lookup), excluding the swap copies
    swap       copying shards out/in for the state-dict swap (0 for the other strategies)
    optimizer  grad clipping + AdamW step

The precomputed strategy also pays a one-time pass over train + validation before step 1,
reported separately (with `cache` when a later run reuses the file).

    python benchmarks/reference_strategies.py [--steps 30] [--nproc 2] [--config tiny]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

STRATEGIES = ("swap", "frozen", "precomputed")
PHASES = ("policy_s", "reference_s", "swap_s", "optimizer_s", "step_s")


def run(strategy: str, args, output_dir: Path) -> tuple[dict, float | None]:
    command = [
        sys.executable,
        "-m",
        "dpokit.cli",
        "run",
        "dpo_full_distributed",
        "--config",
        args.config,
        "--nproc_per_node",
        str(args.nproc),
        f"output_dir={output_dir}",
        f"reference.strategy={strategy}",
        f"max_steps={args.steps}",
        f"eval_every={10**9}",
        "checkpoint.every=0",
        "eval_batch_size=64",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train" and r["step"] > args.warmup]
    means = {phase: sum(r[phase] for r in train) / len(train) for phase in PHASES}
    match = re.search(r"reference log-probs precomputed in ([0-9.]+)s", result.stdout)
    return means, float(match.group(1)) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the means")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--config", default="tiny")
    args = parser.parse_args()

    results, precompute = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in STRATEGIES:
            results[strategy], seconds = run(strategy, args, Path(tmp) / strategy)
            precompute = seconds if seconds is not None else precompute
    print(
        f"dpo_full_distributed --config {args.config}, {args.nproc} ranks, mean over steps "
        f"{args.warmup + 1}..{args.steps} (ms per optimizer step)"
    )
    print(f"{'phase':<12}" + "".join(f"{s:>14}" for s in STRATEGIES))
    for phase in PHASES:
        print(f"{phase[:-2]:<12}" + "".join(f"{1000 * results[s][phase]:>14.1f}" for s in STRATEGIES))
    base = results["swap"]["step_s"]
    print(f"{'step / swap':<12}" + "".join(f"{results[s]['step_s'] / base:>14.2f}" for s in STRATEGIES))
    if precompute is not None:
        steps_equiv = precompute / results["precomputed"]["step_s"]
        print(
            f"precomputed: one-time pass over train + validation {precompute:.1f} s "
            f"(= {steps_equiv:.0f} of its training steps)"
        )


if __name__ == "__main__":
    main()
