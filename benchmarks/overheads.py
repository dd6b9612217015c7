"""Where a step's time goes, before and after: this checkout against an earlier one, in one run.

Runs the same dpokit steps (the full-parameter runner in the FFD and prefix-shared layouts, bf16
weights with fp32 master weights, a precomputed reference, eager and with compiled blocks; and the LoRA runner's prefix-shared
step with the adapter-off reference) from two source trees, alternating, each in a fresh
process, under torch.profiler. The profiler's self CPU time is grouped by the runner's op groups
(matmul, attention, casts, elementwise, ...); the "non-matmul share" is what is neither matmul
nor attention, the "all-but-matmul share" everything but the matmuls (attention included). A
second, unprofiled run of each gives tokens/s and MFU against the bf16 matmul peak measured at the
start and the end of the run. A third run times every op of the timed steps by hand
(`op_timing.py`: no profiler, whose page faults inflate the memory-bound ops on these VMs) and gives
the non-matmul share of the wall-clock step: 1 - (matmul + attention seconds) / step seconds, Python
and dispatch between the ops included.

    git worktree add ../dpokit-before <commit>           # the tree to compare against
    python benchmarks/overheads.py --before ../dpokit-before --markdown benchmarks/overheads.md

--before may be omitted (this tree alone). Both trees read this tree's assets (make_assets.py).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from op_groups import ATTENTION, MATMUL  # noqa: E402
from op_timing import RESULT_PREFIX as OP_TIMING_PREFIX  # noqa: E402
from shared_io import parse_result  # noqa: E402

GROUP_LINE = re.compile(r"^\s+([0-9.]+) s\s+[0-9.]+%\s+(.+)$")
BETWEEN_OPS = "between ops (Python, dispatch)"

# The full-parameter steps: (case name, runner flags), each run eager and with compiled blocks.
FULL_STEPS = (
    ("full ffd bf16-master ref=precomputed", ["--layout", "ffd", "--dtype", "bf16m", "--reference", "precomputed"]),
    (
        "full prefix+ffd bf16-master ref=precomputed",
        ["--layout", "prefix", "--dtype", "bf16m", "--reference", "precomputed"],
    ),
)
# Compiled blocks recompile for the first new batch shape and for the first gradient-mode change
# (dynamic shapes, no_grad probes): five warmup steps keep those compiles out of the timed steps.
COMPILED = ["--compile", "--warmup-steps", "5"]
CASES = (
    *((name, "dpokit_runner.py", "assets", flags) for name, flags in FULL_STEPS),
    ("LoRA prefix+ffd bf16 ref=adapter_off", "dpokit_lora_runner.py", "lora_assets", ["--layout", "prefix"]),
    *((f"{name} compile", "dpokit_runner.py", "assets", flags + COMPILED) for name, flags in FULL_STEPS),
)


def profile_groups(stderr: str) -> dict[str, float]:
    """{op group: self CPU seconds} from a runner's --profile output."""
    groups = {}
    in_profile = False
    for line in stderr.splitlines():
        if line.startswith("profile:"):
            in_profile = True
            continue
        match = GROUP_LINE.match(line) if in_profile else None
        if match:
            groups[match.group(2).strip()] = float(match.group(1))
        elif in_profile and groups:
            break
    return groups


def op_timing(stdout: str) -> dict | None:
    """op_timing.py's report: {"seconds", "steps", "ops", "groups": {op group: seconds}}."""
    lines = [line for line in stdout.splitlines() if line.startswith(OP_TIMING_PREFIX)]
    return json.loads(lines[-1][len(OP_TIMING_PREFIX) :]) if lines else None


def run_case(tree: Path, runner: str, flags: list[str], *, mode: str, timeout: float) -> dict | None:
    """One run of a case in `mode`: "plain", "profiled" (the runner's --profile) or "op-timed"
    (this checkout's op_timing.py around `tree`'s runner)."""
    if mode == "op-timed":
        cmd = [sys.executable, str(HERE / "op_timing.py"), "--tree", str(tree), runner, *flags]
    else:
        cmd = [sys.executable, str(tree / "benchmarks" / runner), *flags] + (
            ["--profile"] if mode == "profiled" else []
        )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tree)
    result = parse_result(proc.stdout)
    timed = op_timing(proc.stdout) if mode == "op-timed" else None
    if result is None or (mode == "op-timed" and timed is None):
        print(f"  failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    if mode == "profiled":
        result["profile"] = profile_groups(proc.stderr)
    if timed is not None:
        result["op_timing"] = timed
    return result


def matmul_peak(timeout: float) -> float:
    proc = subprocess.run(
        [sys.executable, str(HERE / "matmul_peak.py")], capture_output=True, text=True, timeout=timeout
    )
    result = parse_result(proc.stdout)
    if result is None:
        raise SystemExit(f"matmul_peak.py gave no result ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return result["bf16"]


def shares(groups: dict[str, float]) -> dict[str, float]:
    total = sum(groups.values()) or 1.0
    out = {g: t / total for g, t in groups.items()}
    out["non-matmul"] = 1.0 - out.get(MATMUL, 0.0) - out.get(ATTENTION, 0.0)
    out["all but matmul"] = 1.0 - out.get(MATMUL, 0.0)
    return out


def untimed_wall(report: dict) -> float:
    """The op-timed run's wall seconds less what the timer added (ops x its cost per op)."""
    return report["seconds"] - report["ops"] * report.get("timer_seconds_per_op", 0.0)


def timed_shares(report: dict) -> dict[str, float]:
    """Each op group's share of the wall-clock step (the timer's own cost taken out), the time
    between ops, and the non-matmul share: 1 - (matmul + attention) / step."""
    wall = untimed_wall(report) or 1.0
    out = {g: t / wall for g, t in report["groups"].items()}
    out[BETWEEN_OPS] = 1.0 - sum(out.values())
    out["non-matmul"] = 1.0 - out.get(MATMUL, 0.0) - out.get(ATTENTION, 0.0)
    return out


def timed_table(rows: list[dict]) -> list[str]:
    """Shares of the wall-clock step from the op-timed runs."""
    groups = sorted(
        {g for r in rows for g in r["op_timing"]["groups"]}, key=lambda g: (g not in (MATMUL, ATTENTION), g)
    )
    head = [
        "case",
        "tree",
        "step s (timer's cost out)",
        "timer's cost",
        "ops per step",
        *groups,
        BETWEEN_OPS,
        "non-matmul share of the step",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        report = r["op_timing"]
        s = timed_shares(report)
        steps = report["steps"] or 1
        cells = [
            r["case"],
            r["tree"],
            f"{untimed_wall(report) / steps:.2f}",
            f"{1 - untimed_wall(report) / (report['seconds'] or 1.0):.1%}",
            f"{report['ops'] / steps:.0f}",
            *(f"{s.get(g, 0.0):.1%}" for g in groups),
            f"{s[BETWEEN_OPS]:.1%}",
            f"**{s['non-matmul']:.1%}**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table(rows: list[dict], peak: float) -> list[str]:
    groups = sorted({g for r in rows for g in r["profile"]}, key=lambda g: (g not in (MATMUL, ATTENTION), g))
    head = ["case", "tree", "tok/s", "MFU", "step s (profiled)", *groups, "non-matmul share", "all-but-matmul share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = shares(r["profile"])
        cells = [
            r["case"],
            r["tree"],
            f"{r['tokens_per_s']:.0f}",
            f"{r['model_flops_per_s'] / peak:.1%}",
            f"{r['profiled_step']:.2f}",
            *(f"{s.get(g, 0.0):.1%}" for g in groups),
            f"**{s['non-matmul']:.1%}**",
            f"{s['all but matmul']:.1%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", help="an earlier dpokit source tree (e.g. a git worktree)")
    ap.add_argument("--assets", default=str(HERE / ".assets"), help="make_assets.py --model cpu-50m output")
    ap.add_argument(
        "--lora-assets", default=str(HERE / ".assets-lora"), help="make_assets.py --model smollm2-135m output"
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="each (case, tree) keeps its fastest round")
    ap.add_argument("--only", help="regex over case names")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--json", default=str(HERE / "overheads.json"))
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)

    trees = [("after", HERE.parent)] + ([("before", Path(args.before).resolve())] if args.before else [])
    paths = {"assets": str(Path(args.assets).resolve()), "lora_assets": str(Path(args.lora_assets).resolve())}
    common = [
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup-steps",
        str(args.warmup_steps),
    ]
    cases = [c for c in CASES if not args.only or re.search(args.only, c[0])]
    peaks = [matmul_peak(args.timeout)]
    plain_best: dict[tuple[str, str], dict] = {}  # the fastest plain round: tokens/s, MFU
    profiled_best: dict[tuple[str, str], dict] = {}  # the fastest profiled round: the op groups
    timed_best: dict[tuple[str, str], dict] = {}  # the fastest op-timed round: the op groups' seconds
    for round_index in range(args.rounds):
        for case, runner, assets_key, flags in cases:
            for tree_name, tree in trees if round_index % 2 == 0 else trees[::-1]:
                argv_case = ["--assets", paths[assets_key], *common, *flags]  # a case's own flags win
                print(f"round {round_index + 1}: {case} [{tree_name}]", file=sys.stderr, flush=True)
                compiled = "--compile" in flags  # op_timing.py times eager steps only
                plain = run_case(tree, runner, argv_case, mode="plain", timeout=args.timeout)
                profiled = run_case(tree, runner, argv_case, mode="profiled", timeout=args.timeout)
                timed = None if compiled else run_case(tree, runner, argv_case, mode="op-timed", timeout=args.timeout)
                if plain is None or profiled is None:
                    continue
                key = (case, tree_name)
                if key not in plain_best or plain["tokens_per_s"] > plain_best[key]["tokens_per_s"]:
                    plain_best[key] = dict(plain, case=case, tree=tree_name)
                step = profiled["seconds"] / profiled["steps"]
                if key not in profiled_best or step < profiled_best[key]["profiled_step"]:
                    profiled_best[key] = {"profile": profiled["profile"], "profiled_step": step}
                report = timed["op_timing"] if timed else None
                if report and (key not in timed_best or report["seconds"] < timed_best[key]["op_timing"]["seconds"]):
                    timed_best[key] = {"op_timing": report}
    peaks.append(matmul_peak(args.timeout))
    best = {key: dict(row, **profiled_best[key], **timed_best.get(key, {})) for key, row in plain_best.items()}
    peak = max(peaks)
    rows = [best[(c[0], t)] for c in cases for t, _ in trees if (c[0], t) in best]
    lines = [
        f"bf16 matmul peak (best of start/end): {peak / 1e12:.3f} TFLOP/s",
        "",
        "torch.profiler, shares of the ops' self CPU time:",
        "",
        *table(rows, peak),
        "",
        "Op-timed (op_timing.py), shares of the wall-clock step (Python between ops included, the timer's own"
        " cost taken out):",
        "",
        *timed_table([r for r in rows if "op_timing" in r]),
        "",
    ]
    for case, *_ in cases:
        if (case, "after") in best and (case, "before") in best:
            a, b = best[(case, "after")], best[(case, "before")]
            share_a, share_b = shares(a["profile"]), shares(b["profile"])
            timed = "op_timing" in a and "op_timing" in b
            timed_a, timed_b = (timed_shares(a["op_timing"]), timed_shares(b["op_timing"])) if timed else ({}, {})
            lines.append(
                f"- {case}: tokens/s after / before = **{a['tokens_per_s'] / b['tokens_per_s']:.2f}x**; "
                f"MFU {b['model_flops_per_s'] / peak:.1%} -> {a['model_flops_per_s'] / peak:.1%}; "
                f"non-matmul share of the profiled ops' time {share_b['non-matmul']:.1%} -> {share_a['non-matmul']:.1%} "
                f"(**{share_b['non-matmul'] / share_a['non-matmul']:.2f}x** smaller); "
                f"all-but-matmul share {share_b['all but matmul']:.1%} -> {share_a['all but matmul']:.1%} "
                f"({share_b['all but matmul'] / share_a['all but matmul']:.2f}x smaller); "
                + (
                    f"op-timed non-matmul share of the wall-clock step {timed_b['non-matmul']:.1%} -> "
                    f"{timed_a['non-matmul']:.1%} "
                    f"(**{timed_b['non-matmul'] / timed_a['non-matmul']:.2f}x** smaller); "
                    if timed
                    else ""
                )
                + f"peak memory after / before {a['peak_memory_bytes'] / b['peak_memory_bytes']:.2f}x"
            )
    print("\n".join(lines))
    Path(args.json).write_text(json.dumps({"peak_bf16": peak, "rows": rows}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
