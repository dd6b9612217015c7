"""All dpokit benchmarks and the peers side by side, in one run, printed as one summary table.

    python benchmarks/run_all.py                       # everything (peers need benchmarks/peers/setup_*.sh)
    python benchmarks/run_all.py --skip-peers --skip-memory --only "prefix"   # a subset

Every measurement runs in a fresh subprocess (dpokit runners with this interpreter, peers with
their venv's python under benchmarks/.venvs/), one after another, on the same pairs, the same
random weights and the same batch size (make_assets.py writes them once into --assets). The
matmul peak is measured at the start and at the end of the run; the larger is the denominator of
model-FLOP efficiency (MFU), per dtype. Results go to --json; --markdown writes the tables too.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from shared_io import parse_result  # noqa: E402

VENVS = HERE / ".venvs"


def dpokit_variants(quick: bool) -> list[tuple[str, list[str]]]:
    """(name, dpokit_runner.py flags). The first is the padded fp32 baseline.

    Precision modes: fp32; bf16 = autocast over fp32 weights (TRL's bf16); bf16-master = bf16
    weights with fp32 master weights in the optimizer (the same update precision as autocast);
    bf16-weights = pure bf16 weights and optimizer state (torchtune's bf16)."""
    core = [
        ("dpokit padded fp32", ["--layout", "padded", "--dtype", "fp32"]),
        ("dpokit padded bf16", ["--layout", "padded", "--dtype", "bf16"]),
        ("dpokit padded bf16-master", ["--layout", "padded", "--dtype", "bf16m"]),
        ("dpokit ffd bf16-master", ["--layout", "ffd", "--dtype", "bf16m"]),
        ("dpokit ffs bf16-master", ["--layout", "ffs", "--dtype", "bf16m"]),
        ("dpokit prefix+ffd fp32", ["--layout", "prefix", "--dtype", "fp32"]),
        ("dpokit prefix+ffd bf16", ["--layout", "prefix", "--dtype", "bf16"]),
        ("dpokit prefix+ffd bf16-master", ["--layout", "prefix", "--dtype", "bf16m"]),
        ("dpokit prefix+ffd bf16-weights", ["--layout", "prefix", "--dtype", "bf16w"]),
        ("dpokit prefix+ffd bf16-master ref=swap", ["--layout", "prefix", "--dtype", "bf16m", "--reference", "swap"]),
        (
            "dpokit prefix+ffd bf16-master ref=precomputed",
            ["--layout", "prefix", "--dtype", "bf16m", "--reference", "precomputed"],
        ),
        ("dpokit prefix+ffd bf16-master compile", ["--layout", "prefix", "--dtype", "bf16m", "--compile"]),
    ]
    extra = [
        ("dpokit ffd fp32", ["--layout", "ffd", "--dtype", "fp32"]),
        ("dpokit prefix+ffd bf16-master dense-mask", ["--layout", "prefix", "--dtype", "bf16m", "--attention", "sdpa"]),
        ("dpokit padded bf16 unchunked", ["--layout", "padded", "--dtype", "bf16", "--no-chunked"]),
        ("dpokit padded bf16-master compile", ["--layout", "padded", "--dtype", "bf16m", "--compile"]),
    ]
    return core if quick else core + extra


def peer_variants() -> list[tuple[str, str, list[str]]]:
    """(name, venv, runner flags)."""
    return [
        ("TRL fp32", "trl", ["--dtype", "fp32"]),
        ("TRL bf16", "trl", ["--dtype", "bf16"]),
        ("TRL bf16 ref=precomputed", "trl", ["--dtype", "bf16", "--reference", "precomputed"]),
        ("TRL bf16 compile", "trl", ["--dtype", "bf16", "--compile"]),
        ("torchtune fp32", "torchtune", ["--dtype", "fp32"]),
        ("torchtune bf16", "torchtune", ["--dtype", "bf16"]),
        ("torchtune bf16 compile", "torchtune", ["--dtype", "bf16", "--compile"]),
    ]


def run(cmd: list[str], timeout: float, log) -> dict | None:
    """Run one measurement; its output goes to the log, its BENCH_RESULT line comes back."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, code = e.stdout or "", (e.stderr or "") + f"\nTIMEOUT after {timeout}s", "timeout"
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
    log.write(f"$ {' '.join(cmd)}\n# exit {code} after {time.perf_counter() - started:.1f}s\n{out}\n{err}\n\n")
    log.flush()
    result = parse_result(out)
    if result is None:
        tail = (err or out).strip().splitlines()[-1:] or ["no output"]
        print(f"  FAILED ({code}): {tail[0][:200]}", flush=True)
    return result


def ensure_assets(args) -> dict:
    """(Re)write the shared model + pairs unless --assets already holds them for these settings."""
    stamp = {"model": args.model, "max_length": args.max_length, "synthetic": args.synthetic}
    stamp_path = Path(args.assets) / "settings.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return json.loads((Path(args.assets) / "pairs.json").read_text())["meta"]
    cmd = [
        sys.executable,
        str(HERE / "make_assets.py"),
        "--out",
        args.assets,
        "--model",
        args.model,
        "--max-length",
        str(args.max_length),
    ] + (["--synthetic"] if args.synthetic else [])
    subprocess.run(cmd, check=True, cwd=HERE.parent, stdout=subprocess.DEVNULL)
    stamp_path.write_text(json.dumps(stamp))
    return json.loads((Path(args.assets) / "pairs.json").read_text())["meta"]


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def mean_first_logp(result: dict) -> float | None:
    if result.get("first_mean_chosen_logp") is not None:
        return result["first_mean_chosen_logp"]
    values = list((result.get("first_chosen_logps") or {}).values())
    return sum(values) / len(values) if values else None


def dtype_class(result: dict) -> str:
    """fp32, or bf16 for any bf16 mode (autocast, master weights, or pure bf16 weights)."""
    return "fp32" if result.get("dtype", "fp32") == "fp32" else "bf16"


def precision_class(result: dict) -> str:
    """How precisely the weights are updated: "fp32 updates" (fp32, autocast over fp32 weights, bf16
    with fp32 master weights: TRL's modes) or "bf16 updates" (pure bf16 weights: torchtune's bf16)."""
    pure_bf16 = result.get("dtype") == "bf16w" or (result["framework"] == "torchtune" and result.get("dtype") == "bf16")
    return "bf16 updates" if pure_bf16 else "fp32 updates"


def fastest(results: list[dict], framework: str, dtype: str) -> dict | None:
    runs = [r for r in results if r["framework"] == framework and dtype_class(r) == dtype]
    return max(runs, key=lambda r: r["tokens_per_s"]) if runs else None


def throughput_table(results: list[dict], peak: dict) -> list[str]:
    """Markdown rows: tokens/s and its ratio to the fastest TRL / torchtune run of the same dtype
    class (fp32 or any bf16 mode), MFU, memory and its ratios to those same peer runs, logp check."""
    lines = [
        "| run | useful tok/s | x TRL | x torchtune | MFU | peak mem GiB | mem / TRL | mem / torchtune "
        "| step-1 mean logp(chosen) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        dtype = dtype_class(r)
        trl, tt = fastest(results, "trl", dtype), fastest(results, "torchtune", dtype)
        cells = [r["name"], f"{r['tokens_per_s']:.1f}"]
        cells += [f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}" if p else "-" for p in (trl, tt)]
        cells.append(f"{r['model_flops_per_s'] / peak[dtype]:.1%}" if peak.get(dtype) else "-")
        cells.append(gib(r["peak_memory_bytes"]))
        cells += [f"{r['peak_memory_bytes'] / p['peak_memory_bytes']:.2f}" if p else "-" for p in (trl, tt)]
        logp = mean_first_logp(r)
        cells.append("-" if logp is None else f"{logp:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    refs = [
        f"{f} {d}: {p['name']}" for d in ("fp32", "bf16") for f in ("trl", "torchtune") if (p := fastest(results, f, d))
    ]
    if refs:
        lines += ["", "Ratios are to the fastest peer run of the same dtype class (" + "; ".join(refs) + ")."]
    return lines


def headline(results: list[dict], peak: dict) -> list[str]:
    """Best run per framework, the same-settings comparison, and the goals of issue 7."""
    best = {}
    for r in results:
        if r["tokens_per_s"] > best.get(r["framework"], {}).get("tokens_per_s", 0):
            best[r["framework"]] = r
    lines = []
    ours = best.get("dpokit")
    for peer in ("trl", "torchtune"):
        if ours and peer in best:
            ratio = ours["tokens_per_s"] / best[peer]["tokens_per_s"]
            lines.append(
                f"- best dpokit ({ours['name']}, {ours['tokens_per_s']:.1f} tok/s) / best {peer} "
                f"({best[peer]['name']}, {best[peer]['tokens_per_s']:.1f} tok/s) = **{ratio:.2f}x** "
                f"(goal >= 3x: {'met' if ratio >= 3 else 'missed'})"
            )
    for klass in ("fp32 updates", "bf16 updates"):  # like for like: the same update precision
        same = [r for r in results if precision_class(r) == klass]
        mine = max((r for r in same if r["framework"] == "dpokit"), key=lambda r: r["tokens_per_s"], default=None)
        for peer in ("trl", "torchtune"):
            theirs = max((r for r in same if r["framework"] == peer), key=lambda r: r["tokens_per_s"], default=None)
            if mine and theirs:
                lines.append(
                    f"- {klass}: {mine['name']} / {theirs['name']} = "
                    f"**{mine['tokens_per_s'] / theirs['tokens_per_s']:.2f}x** tokens/s, "
                    f"{mine['peak_memory_bytes'] / theirs['peak_memory_bytes']:.2f}x peak memory"
                )
    bf16 = [r for r in results if r["framework"] == "dpokit" and dtype_class(r) == "bf16"]
    if bf16 and peak.get("bf16"):
        top = max(bf16, key=lambda r: r["model_flops_per_s"])
        mfu = top["model_flops_per_s"] / peak["bf16"]
        lines.append(
            f"- best dpokit bf16 MFU: {top['name']}, {mfu:.1%} of the measured bf16 matmul peak "
            f"(goal >= 50%: {'met' if mfu >= 0.5 else 'missed'})"
        )
    return lines


def memory_table(points: list[dict]) -> list[str]:
    lines = [
        "| seq len | vocab | step peak GiB, chunked | step peak GiB, full logits | ratio | process peak GiB "
        "(chunked / full) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    keyed = {(p["seq_len"], p["vocab"], p["chunked"]): p for p in points}
    for seq_len, vocab in sorted({(p["seq_len"], p["vocab"]) for p in points}):
        on, off = keyed.get((seq_len, vocab, "on")), keyed.get((seq_len, vocab, "off"))
        ratio = f"{off['step_peak_bytes'] / on['step_peak_bytes']:.1f}x" if on and off else "-"
        procs = f"{gib(on and on['process_peak_bytes'])} / {gib(off and off['process_peak_bytes'])}"
        lines.append(
            f"| {seq_len} | {vocab} | {gib(on and on['step_peak_bytes'])} | "
            f"{gib(off and off['step_peak_bytes'])} | {ratio} | {procs} |"
        )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", default=str(HERE / ".assets"))
    ap.add_argument("--model", default="cpu-50m", help="make_assets.py preset (gpu-100m on a GPU)")
    ap.add_argument("--max-length", type=int, default=512, help="max tokens of prompt + one response")
    ap.add_argument("--synthetic", action="store_true", help="synthetic pairs even when HH-RLHF is present")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step, for every framework")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    # Every run warms up on the same pairs, then times the same pairs. Compiled runs see two or three
    # batch shapes before torch.compile settles on dynamic shapes: 3 warmup steps keep those
    # recompiles out of the timed steps.
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every runner")
    ap.add_argument("--quick", action="store_true", help="the core dpokit variants only")
    ap.add_argument("--only", default=None, help="regex: run only the throughput variants it matches")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-lengths", default="512,1024,2048")
    ap.add_argument("--memory-vocabs", default="32000,128256")
    ap.add_argument("--memory-batch-size", type=int, default=1, help="pairs per memory-sweep step")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole plan this many times, round-robin; each run keeps its fastest round",
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--json", default=str(HERE / "results.json"))
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    ap.add_argument("--log", default=str(HERE / "run_all.log"), help="every runner's full output")
    args = ap.parse_args(argv)

    meta = ensure_assets(args)
    print(
        f"workload: {meta['pairs']} pairs from {meta['source']}, max length {meta['max_length']}; "
        f"model {args.model}; batch {args.batch_size} pairs x {args.steps} timed steps "
        f"(+{args.warmup_steps} warmup)",
        flush=True,
    )
    common = [
        "--assets",
        args.assets,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup-steps",
        str(args.warmup_steps),
    ] + (["--threads", str(args.threads)] if args.threads else [])
    threads = ["--threads", str(args.threads)] if args.threads else []
    plan = [
        (name, [sys.executable, str(HERE / "dpokit_runner.py"), *flags, *common, "--name", name])
        for name, flags in dpokit_variants(args.quick)
    ]
    if not args.skip_peers:
        for name, venv, flags in peer_variants():
            python = VENVS / venv / "bin" / "python"
            if not python.is_file():
                print(f"{name}: skipped, no {python} (run benchmarks/peers/setup_{venv}.sh)", flush=True)
                continue
            plan.append(
                (name, [str(python), str(HERE / "peers" / f"{venv}_runner.py"), *flags, *common, "--name", name])
            )
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
        results = [best[name] for name, _ in plan if name in best]
        memory = []
        if not args.skip_memory:
            for vocab in [int(v) for v in args.memory_vocabs.split(",")]:
                for seq_len in [int(v) for v in args.memory_lengths.split(",")]:
                    for chunked in ("on", "off"):
                        print(f"memory: seq {seq_len}, vocab {vocab}, chunked {chunked} ...", flush=True)
                        point = run(
                            [
                                sys.executable,
                                str(HERE / "memory_runner.py"),
                                "--model",
                                args.model,
                                "--seq-len",
                                str(seq_len),
                                "--vocab",
                                str(vocab),
                                "--chunked",
                                chunked,
                                "--batch-size",
                                str(args.memory_batch_size),
                                *threads,
                            ],
                            args.timeout,
                            log,
                        )
                        if point:
                            memory.append(point)
        peaks.append(run([sys.executable, str(HERE / "matmul_peak.py"), *threads], args.timeout, log))
    peaks = [p for p in peaks if p]
    peak = {d: max(p[d] for p in peaks) for d in ("fp32", "bf16")} if peaks else {}

    lines = [
        f"Matmul peak (best of start/end of run): fp32 {peak.get('fp32', 0) / 1e12:.3f} TFLOP/s, "
        f"bf16 {peak.get('bf16', 0) / 1e12:.3f} TFLOP/s",
        "",
    ]
    lines += throughput_table(results, peak)
    lines += ["", *headline(results, peak)]
    if memory:
        lines += [
            "",
            f"Peak memory of one DPO step ({args.memory_batch_size} pairs, fp32, {memory[0]['method']}):",
            "",
        ] + memory_table(memory)
    print("\n" + "\n".join(lines))
    Path(args.json).write_text(
        json.dumps(
            {"workload": meta, "args": vars(args), "matmul_peak": peaks, "throughput": results, "memory": memory},
            indent=1,
        )
    )
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
