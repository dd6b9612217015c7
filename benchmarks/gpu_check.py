"""The GPU check: one command, at most 8 minutes on one H200, a PASS / FAIL line per check and a
non-zero exit status on any failure (issue 17, item 4).

    bash benchmarks/gpu_check.sh                        # on the GPU machine (installs the carried wheels)
    python benchmarks/gpu_check.py                      # the same, once the wheels are importable
    python benchmarks/gpu_check.py --device cpu --dry-run   # every part at tiny shapes on CPU (< 1 min)

Parts (each with its own time limit; elapsed seconds are printed per part):

  flex        FlexAttention (`build_attention_mask(..., "flex")`) against the per-document SDPA path
              ("segments") and the dense-mask SDPA path ("sdpa") through `packed_policy_logps`, on
              packed and prefix-shared batches, for a plain, a sliding-window and a soft-capped
              (Gemma 2 style: attention and logit soft-capping, sliding + full layers) decoder:
              the chosen / rejected log-probs and the gradient of a DPO loss w.r.t. every parameter,
              in fp32 and in bf16 weights. On CPU FlexAttention has no backward (torch 2.13): the
              forward is compared and the gradients are skipped with the reason printed.
  compile     `prepare_blocks(model, compile_blocks=True)` against the same weights eager: the full
              logits and log-probs of a padded batch, the log-probs of a packed batch (FlexAttention
              on CUDA), and the DPO-loss gradients of both.
  chunked     `benchmarks/chunked_logprobs.py` (one fresh process per path): the peak memory of the
              output head + log-probs forward and backward, `chunked_token_logps` vs the materialised
              logits + log_softmax, at vocabulary 128,256 (CUDA: torch.cuda.max_memory_allocated).
  offload     activation offloading (`prepare_blocks(activation_offloading=True)`, issue 17 item 3) and
              activation checkpointing, alone and together, against the plain model: the DPO-loss
              gradients of a padded bf16 batch (equal within the fp32 tolerance: the offloaded
              tensors come back bit for bit, only kernel order may differ), and on CUDA the peak
              memory (`max_memory_allocated`, must fall: offloading < plain, checkpointing +
              offloading < checkpointing) and the step time of each, printed as ratios to plain.
              On CPU offloading changes nothing (CPU tensors stay); the memory checks are SKIPPED.
  throughput  `run_all.py`'s machinery for the `gpu-100m` model: dpokit padded / FFD / prefix+FFD /
              prefix+FFD with a precomputed reference (bf16 weights + fp32 master weights) and TRL
              bf16, useful tokens/s, peak memory and MFU against the matmul peak measured here. TRL
              missing -> its row is SKIPPED with the reason (not a failure).

Tolerances (norm-relative error ||a - b|| / ||b||, in float64, per log-prob vector and per gradient
tensor; the worst is printed):

  fp32: logits and log-probs <= 1e-5, gradients <= 1e-4. Both paths do the same math in fp32 (TF32 is switched
        off here for matmuls and cuDNN); they differ only in accumulation order (an online softmax
        over 128-key blocks vs SDPA's kernel, fused vs separate elementwise ops). fp32 rounding is
        6e-8, and an order change over a few thousand terms moves a sum by ~sqrt(n) * 6e-8 ~ 4e-6
        relative at worst; the gradients pass through the softmax backward (a difference of close
        numbers), so they get 10x more room. A wrong mask, scale or soft-cap moves them by 1e-2 or more.
  bf16: the fp32 computation of the same (bf16-rounded) weights is the reference, and FlexAttention
        (or the compiled model) must be as accurate as the SDPA (or eager) path against it:
        err(candidate) <= 2 * err(SDPA or eager) + 2^-8 (one bf16 rounding step). Both round to
        bf16 at the same points; the factor 2 and the one rounding step allow a different
        accumulation order, not a different computation.

--perturb PARTS (or DPOKIT_GPU_CHECK_PERTURB=PARTS, comma-separated) deliberately corrupts one side of a part's
comparison (FlexAttention's log-probs and gradients x 1.1; the compiled logits, log-probs and
gradients x 1.1; the chunked peak + the materialised peak; the offloaded gradients x 1.1), so those checks must FAIL: the test
suite runs it to show the assertions can fail.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# This checkout's dpokit, whatever is installed; the runners started below inherit it too.
sys.path[:0] = [str(REPO), str(HERE)]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import make_assets  # noqa: E402
import matmul_peak  # noqa: E402
import run_all  # noqa: E402
import torch  # noqa: E402

from dpokit.data import collate_packed, collate_preference_pairs, first_fit_decreasing, pair_length  # noqa: E402
from dpokit.losses import dpo_loss  # noqa: E402
from dpokit.models import llama, prepare_blocks  # noqa: E402
from dpokit.models.blocks import ActivationOffload, enable_activation_offloading, transformer_blocks  # noqa: E402
from dpokit.training.forward import policy_logps  # noqa: E402
from dpokit.training.packed_forward import packed_policy_logps  # noqa: E402

PARTS = ("flex", "compile", "chunked", "offload", "throughput")
PERTURBABLE = ("flex", "compile", "chunked", "offload")
BUDGET_S = 480.0  # the whole command: 8 minutes
# Seconds per part on the GPU; a part that runs over is a FAIL (and the rest still runs).
PART_LIMITS_S = {"flex": 110.0, "compile": 110.0, "chunked": 45.0, "offload": 40.0, "throughput": 170.0}
FP32_TOL = {"logps": 1e-5, "grads": 1e-4}
BF16_FLOOR = 2.0**-8
PERTURB = 1.1

# The decoder variants (tests/training/test_packing_logps.py VARIANTS, those that change attention).
VARIANTS = {
    "plain": {},
    "sliding_window": dict(sliding_window=6),
    "softcapped": dict(
        norm_placement="sandwich",
        unit_offset_norm=True,
        activation="gelu_tanh",
        embedding_scale=True,
        attn_scale=0.3,
        attn_softcap=2.0,
        logit_softcap=3.0,
        sliding_window=5,
        layer_types=("sliding_attention", "full_attention"),
    ),
}
# The run_all.py variants of the throughput table (their flags come from run_all.py).
THROUGHPUT_DPOKIT = (
    "dpokit padded bf16-master",
    "dpokit ffd bf16-master",
    "dpokit prefix+ffd bf16-master",
    "dpokit prefix+ffd bf16-master ref=precomputed",
)
THROUGHPUT_PEER = "TRL bf16"
# what the TRL runner imports, directly or through datasets (the GPU image has all but trl, datasets, dill, multiprocess)
PEER_MODULES = ("trl", "transformers", "accelerate", "datasets", "dill", "multiprocess", "pandas", "pyarrow", "xxhash")


@dataclass(frozen=True)
class Shapes:
    """Sizes of one mode (GPU or --dry-run)."""

    vocab: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    pack_size: int  # tokens per row of the packed batches (2 rows)
    prompt: tuple[int, int]  # token-count ranges of the random pairs
    response: tuple[int, int]
    window: int  # the sliding window of the sliding-window variant (softcapped: window - 1)
    chunked: dict  # chunked_logprobs.py flags
    offload: dict  # the offload part's model (llama kwargs) and padded batch (pairs, tokens per sequence)
    model: str  # make_assets.py preset of the throughput table
    max_length: int
    batch_size: int
    steps: int
    warmup_steps: int
    matmul_n: int


GPU = Shapes(
    vocab=2048,
    dim=256,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    hidden_dim=512,
    pack_size=2048,
    prompt=(20, 300),
    response=(5, 150),
    window=96,
    chunked=dict(tokens=8192, hidden=2048, vocab=128_256, chunk_size=1024, repeats=1),
    offload=dict(
        model=dict(vocab_size=32000, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, hidden_dim=2816),
        pairs=8,
        tokens=1024,
    ),
    model="gpu-100m",
    max_length=1024,
    batch_size=16,
    steps=8,
    warmup_steps=3,
    matmul_n=8192,
)
DRY = Shapes(
    vocab=64,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    hidden_dim=64,
    pack_size=64,
    prompt=(1, 14),
    response=(1, 10),
    window=6,
    chunked=dict(tokens=2048, hidden=64, vocab=8192, chunk_size=256, repeats=0),
    offload=dict(
        model=dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64), pairs=2, tokens=24
    ),
    model="tiny",
    max_length=64,
    batch_size=2,
    steps=1,
    warmup_steps=1,
    matmul_n=256,
)


class PartTimeout(Exception):
    pass


class Report:
    """PASS / FAIL / SKIP lines, counted."""

    def __init__(self):
        self.failed, self.passed, self.skipped = [], 0, 0

    def check(self, name: str, ok: bool, detail: str) -> bool:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed.append(name)
        return ok

    def skip(self, name: str, reason: str) -> None:
        print(f"SKIP {name}: {reason}", flush=True)
        self.skipped += 1


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in this (main) thread once `seconds` have passed."""

    def expire(signum, frame):
        raise PartTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- comparisons


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    norm = b.norm().item()
    diff = (a - b).norm().item()
    return diff / norm if norm > 0 else diff


def worst(errors: dict[str, float]) -> tuple[str, float]:
    name = max(errors, key=errors.get)
    return name, errors[name]


def compare_fp32(got: dict, want: dict, label: str = "logps") -> tuple[bool, str]:
    """got / want: {"logps": tensor, "grads": {name: tensor}} (grads may be absent)."""
    ok, parts = True, []
    e = rel_err(got["logps"], want["logps"])
    ok &= e <= FP32_TOL["logps"]
    parts.append(f"{label} err {e:.1e} (tol {FP32_TOL['logps']:.0e})")
    if "grads" in got:
        name, e = worst({n: rel_err(g, want["grads"][n]) for n, g in got["grads"].items()})
        ok &= e <= FP32_TOL["grads"]
        parts.append(f"grads worst err {e:.1e} at {name} (tol {FP32_TOL['grads']:.0e})")
    return bool(ok), ", ".join(parts)


def compare_bf16(got: dict, baseline: dict, exact: dict, label: str = "logps") -> tuple[bool, str]:
    """got (candidate, bf16) and baseline (SDPA / eager, bf16) against exact (fp32 of the same weights)."""
    ok, parts = True, []
    keys = ["logps"] + (["grads"] if "grads" in got else [])
    for key in keys:
        if key == "logps":
            e_got, e_base = rel_err(got[key], exact[key]), rel_err(baseline[key], exact[key])
            where = ""
        else:
            errs = {
                n: (rel_err(g, exact[key][n]), rel_err(baseline[key][n], exact[key][n])) for n, g in got[key].items()
            }
            # the parameter where the candidate is furthest past its allowance
            where = max(errs, key=lambda n: errs[n][0] - 2 * errs[n][1])
            e_got, e_base = errs[where]
            where = f" at {where}"
        within = e_got <= 2 * e_base + BF16_FLOOR
        ok &= within
        parts.append(
            f"{label if key == 'logps' else key} err vs fp32 {e_got:.1e} {'<=' if within else '>'} 2 x {e_base:.1e} + 2^-8{where}"
        )
    return bool(ok), ", ".join(parts)


def perturbed(result: dict) -> dict:
    out = {"logps": result["logps"] * PERTURB}
    if "grads" in result:
        out["grads"] = {n: g * PERTURB for n, g in result["grads"].items()}
    return out


# ----------------------------------------------------------------------------- models and batches


def build_model(shapes: Shapes, variant: str, seed: int = 0) -> torch.nn.Module:
    arch = dict(VARIANTS[variant])
    if "sliding_window" in arch:
        arch["sliding_window"] = shapes.window - (variant == "softcapped")
    torch.manual_seed(seed)
    model = llama(
        vocab_size=shapes.vocab,
        dim=shapes.dim,
        n_layers=shapes.n_layers,
        n_heads=shapes.n_heads,
        n_kv_heads=shapes.n_kv_heads,
        hidden_dim=shapes.hidden_dim,
        max_seq_len=2 * shapes.pack_size,
        rope_theta=10_000.0,
        **arch,
    )
    with torch.no_grad():  # norms that are not the identity, as in tests/training/test_packing_logps.py
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if arch.get("unit_offset_norm") else p.uniform_(0.5, 1.5)
    return model


def random_pairs(shapes: Shapes, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(1, shapes.vocab) for _ in range(rng.randint(lo, hi))]

    return [
        {"prompt_ids": ids(*shapes.prompt), "chosen_ids": ids(*shapes.response), "rejected_ids": ids(*shapes.response)}
        for _ in range(n)
    ]


def two_packs(shapes: Shapes, seed: int) -> list[list[dict]]:
    """Pairs filling two rows of pack_size tokens unshared (first-fit decreasing), so the packed and
    the prefix-shared batch of the same pairs both have shape [2, pack_size]."""
    pairs = random_pairs(shapes, 4 * shapes.pack_size // sum(shapes.prompt + shapes.response) + 8, seed)
    packs = first_fit_decreasing([pair_length(p) for p in pairs], shapes.pack_size)
    assert len(packs) >= 2 and all(len(p) > 1 for p in packs[:2]), "too few pairs to fill two packs"
    return [[pairs[i] for i in pack] for pack in packs[:2]]


def packed_batch(shapes: Shapes, packs: list[list[dict]], prefix_sharing: bool, device: str):
    return collate_packed(packs, pad_id=0, pack_size=shapes.pack_size, prefix_sharing=prefix_sharing).to(device)


def reference_logps(model, forward) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed DPO reference log-probs: the model's own, each moved by N(0, 1), so the margins are not 0."""
    with torch.no_grad():
        out = forward(model)
    g = torch.Generator().manual_seed(1)
    return tuple(x.float() + torch.randn(x.shape, generator=g).to(x.device) for x in out)


def dpo_result(model, forward, want_grads: bool, ref: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """{"logps": chosen ++ rejected (fp32), "grads": d DPO loss / d parameter} for one forward."""
    model.zero_grad(set_to_none=True)
    with contextlib.nullcontext() if want_grads else torch.no_grad():
        out = forward(model)
    logps = torch.cat([out.chosen, out.rejected]).float()
    result = {"logps": logps.detach()}
    if want_grads:
        loss = dpo_loss(out.chosen.float(), out.rejected.float(), ref[0], ref[1], beta=0.1).losses.mean()
        loss.backward()
        result["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return result


# ----------------------------------------------------------------------------- part 1: FlexAttention


def part_flex(args, shapes: Shapes, report: Report) -> None:
    device = args.device
    grads = device != "cpu"
    if not grads:
        report.skip(
            "flex gradients",
            f"torch {torch.__version__} has no FlexAttention backward on CPU; forward compared only",
        )
    packs = two_packs(shapes, seed=2)
    for variant in VARIANTS:
        fp32 = build_model(shapes, variant).to(device)
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        # fp32 copy of the bf16-rounded weights: the exact computation bf16 paths approximate
        exact_model = copy.deepcopy(bf16).float()
        for prefix_sharing in (False, True):
            layout = "prefix-shared" if prefix_sharing else "packed"
            batch = packed_batch(shapes, packs, prefix_sharing, device)

            def run(model, backend, ref=None):
                return dpo_result(
                    model, lambda m: packed_policy_logps(m, batch, attention_backend=backend), grads, ref=ref
                )

            # one fixed pair of DPO reference log-probs for every backend and precision
            ref = reference_logps(fp32, lambda m: packed_policy_logps(m, batch, attention_backend="segments"))
            results = {"segments": run(fp32, "segments", ref), "sdpa": run(fp32, "sdpa", ref)}
            flex32 = run(fp32, "flex", ref)
            if "flex" in args.perturb:
                flex32 = perturbed(flex32)
            for backend in ("segments", "sdpa"):
                ok, detail = compare_fp32(flex32, results[backend])
                report.check(f"flex fp32 {variant} {layout} == {backend}", ok, detail)

            exact = run(exact_model, "segments", ref)
            seg16, flex16 = run(bf16, "segments", ref), run(bf16, "flex", ref)
            if "flex" in args.perturb:
                flex16 = perturbed(flex16)
            ok, detail = compare_bf16(flex16, seg16, exact)
            report.check(f"flex bf16 {variant} {layout} ~ segments", ok, detail)


# ----------------------------------------------------------------------------- part 2: compiled blocks


@contextlib.contextmanager
def compile_backend(backend: str):
    """`prepare_blocks` calls `block.compile()` with torch's defaults (inductor); for the CPU dry run
    the backend can be swapped here (it takes no backend argument)."""
    if backend == "inductor":
        yield
        return
    original = torch.nn.Module.compile

    def patched(self, *a, **kw):
        kw.setdefault("backend", backend)
        return original(self, *a, **kw)

    torch.nn.Module.compile = patched
    try:
        yield
    finally:
        torch.nn.Module.compile = original


def part_compile(args, shapes: Shapes, report: Report) -> None:
    device = args.device
    torch._dynamo.reset()
    pairs = random_pairs(shapes, 6, seed=3)
    padded = collate_preference_pairs(pairs, pad_id=0, pad_to_multiple_of=8).to(device)
    packs = two_packs(shapes, seed=4)
    cases = [("plain", torch.float32), ("softcapped", torch.float32), ("plain", torch.bfloat16)]
    for variant, dtype in cases:
        eager = build_model(shapes, variant, seed=5).to(device)
        if dtype == torch.bfloat16:
            eager = eager.to(dtype)
        compiled = copy.deepcopy(eager)
        with compile_backend(args.compile_backend):
            prepare_blocks(compiled, compile_blocks=True)
        exact = copy.deepcopy(eager).float() if dtype == torch.bfloat16 else None
        precision = "fp32" if dtype == torch.float32 else "bf16"

        def check(what: str, got: dict, want: dict, exact_result: dict | None) -> None:
            if "compile" in args.perturb:
                got = perturbed(got)
            label = "logits" if what.endswith("logits") else "logps"
            if exact_result is None:
                ok, detail = compare_fp32(got, want, label)
            else:
                ok, detail = compare_bf16(got, want, exact_result, label)
            report.check(f"compile {precision} {variant} {what}", ok, detail)

        # full logits of the padded batch (the forward every recipe's model(...) call makes)
        with torch.no_grad():
            logits = {"eager": eager(padded.input_ids), "compiled": compiled(padded.input_ids)}
            logits_exact = exact(padded.input_ids) if exact is not None else None
        check(
            "padded logits",
            {"logps": logits["compiled"]},
            {"logps": logits["eager"]},
            None if exact is None else {"logps": logits_exact},
        )
        padded_fwd = lambda m: policy_logps(m, padded)  # noqa: E731
        packed = packed_batch(shapes, packs, False, device)
        for what, fwd in (
            ("padded logps+grads", padded_fwd),
            ("packed logps+grads", lambda m: packed_policy_logps(m, packed)),
        ):
            ref = reference_logps(eager if exact is None else exact, fwd)
            want = dpo_result(eager, fwd, True, ref)
            got = dpo_result(compiled, fwd, True, ref)
            check(what, got, want, None if exact is None else dpo_result(exact, fwd, True, ref))


# ----------------------------------------------------------------------------- part 3: chunked memory


def part_chunked(args, shapes: Shapes, report: Report, limit_s: float) -> None:
    flags = shapes.chunked
    common = [
        "--device",
        args.device,
        "--tokens",
        str(flags["tokens"]),
        "--hidden",
        str(flags["hidden"]),
        "--vocab",
        str(flags["vocab"]),
        "--chunk-size",
        str(flags["chunk_size"]),
        "--repeats",
        str(flags["repeats"]),
        "--dtype",
        "fp32",
    ]
    started = time.perf_counter()
    results = {}
    for path in ("materialised", "chunked"):
        left = limit_s - (time.perf_counter() - started)
        cmd = [sys.executable, str(HERE / "chunked_logprobs.py"), "--path", path, *common]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, left), cwd=REPO)
        if proc.returncode:
            report.check(f"chunked {path} run", False, (proc.stderr.strip().splitlines() or ["no output"])[-1][:300])
            return
        results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    m, c = results["materialised"]["peak_bytes"], results["chunked"]["peak_bytes"]
    if "chunked" in args.perturb:
        c += m
    method = "cuda max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM) delta"
    print(
        f"  {flags['tokens']} tokens, hidden {flags['hidden']}, vocab {flags['vocab']:,}, fp32, chunk "
        f"{flags['chunk_size']}, {method}: materialised {m / 2**30:.3f} GiB "
        f"({results['materialised']['seconds']:.3f} s), chunked {c / 2**30:.3f} GiB "
        f"({results['chunked']['seconds']:.3f} s)",
        flush=True,
    )
    report.check(
        "chunked log-probs peak memory < materialised",
        0 < c < m,
        f"chunked / materialised = {c / m:.3f} ({c / 2**30:.3f} / {m / 2**30:.3f} GiB)",
    )


# ----------------------------------------------------------------------------- part 4: offloading


def part_offload(args, shapes: Shapes, report: Report) -> None:
    device, cuda = args.device, args.device.startswith("cuda")
    spec = shapes.offload
    g = random.Random(7)
    half = spec["tokens"] // 2
    pairs = [
        {
            "prompt_ids": [g.randrange(1, spec["model"]["vocab_size"]) for _ in range(half)],
            "chosen_ids": [g.randrange(1, spec["model"]["vocab_size"]) for _ in range(half)],
            "rejected_ids": [g.randrange(1, spec["model"]["vocab_size"]) for _ in range(half)],
        }
        for _ in range(spec["pairs"])
    ]
    batch = collate_preference_pairs(pairs, pad_id=0).to(device)
    forward = lambda m: policy_logps(m, batch)  # noqa: E731
    torch.manual_seed(11)
    base = llama(**spec["model"], max_seq_len=spec["tokens"], rope_theta=10_000.0).to(device, torch.bfloat16)
    ref = reference_logps(base, forward)
    settings = {
        "plain": {},
        "checkpointing": dict(activation_checkpointing=True),
        "offloading": dict(activation_offloading=True),
        "checkpointing+offloading": dict(activation_checkpointing=True, activation_offloading=True),
    }
    results, peaks, seconds, offloaded = {}, {}, {}, {}
    for name, knobs in settings.items():
        model = copy.deepcopy(base)
        # prepare_blocks' order (checkpointing inside offloading), with an offload whose bytes we read
        prepare_blocks(model, activation_checkpointing=knobs.get("activation_checkpointing", False))
        offload = ActivationOffload() if knobs.get("activation_offloading") else None
        for block in transformer_blocks(model) if offload else ():
            enable_activation_offloading(block, offload)
        dpo_result(model, forward, True, ref)  # warm-up: kernels, the pinned-memory pool
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = offload.offloaded_bytes if offload else 0
        t0 = time.perf_counter()
        results[name] = dpo_result(model, forward, True, ref)
        if cuda:
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated()
        seconds[name] = time.perf_counter() - t0
        offloaded[name] = (offload.offloaded_bytes - before) if offload else 0
        del model
    # Offloading moves tensors, it does not change the math: the same as the run without it up to
    # the run-to-run noise of the GPU's kernels (atomics in attention backward), measured here.
    again = dpo_result(copy.deepcopy(base), forward, True, ref)
    noise = max(rel_err(g, results["plain"]["grads"][n]) for n, g in again["grads"].items())
    tol = max(FP32_TOL["grads"], 2 * noise)
    for name in ("offloading", "checkpointing+offloading"):
        got = perturbed(results[name]) if "offload" in args.perturb else results[name]
        than = "checkpointing" if name.startswith("checkpointing") else "plain"
        errors = {"logps": rel_err(got["logps"], results[than]["logps"])}
        errors.update({n: rel_err(g, results[than]["grads"][n]) for n, g in got["grads"].items()})
        where, err = worst(errors)
        report.check(
            f"offload {name} logps+grads == {than}",
            err <= tol,
            f"worst err {err:.1e} at {where} (tol {tol:.0e}: max(1e-4, 2 x run-to-run {noise:.1e}))",
        )
    print(
        "  step time / plain: "
        + ", ".join(f"{n} {seconds[n] / seconds['plain']:.2f}x ({seconds[n]:.3f} s)" for n in settings),
        flush=True,
    )
    if not cuda:
        report.skip("offload peak memory", "CPU tensors are not offloaded (CUDA only)")
        return
    print(
        "  copied to the host per step: "
        + ", ".join(f"{n} {offloaded[n] / 2**30:.2f} GiB" for n in settings if offloaded[n])
        + f" (the bf16 weights: {sum(p.numel() * p.element_size() for p in base.parameters()) / 2**30:.2f} GiB)",
        flush=True,
    )
    print(
        "  peak memory / plain (max_memory_allocated): "
        + ", ".join(f"{n} {peaks[n] / peaks['plain']:.2f}x ({peaks[n] / 2**30:.2f} GiB)" for n in settings),
        flush=True,
    )
    for name, than in (("offloading", "plain"), ("checkpointing+offloading", "checkpointing")):
        report.check(
            f"offload {name} peak memory < {than}",
            peaks[name] < peaks[than],
            f"{peaks[name] / 2**30:.2f} GiB vs {peaks[than] / 2**30:.2f} GiB ({peaks[name] / peaks[than]:.2f}x)",
        )


# ----------------------------------------------------------------------------- part 5: throughput


def missing_modules(python: str) -> list[str]:
    code = "import importlib.util as u; print(','.join(m for m in %r if u.find_spec(m) is None))" % (PEER_MODULES,)
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    if proc.returncode:
        return [f"({python} failed: {proc.stderr.strip()[-200:]})"]
    return [m for m in proc.stdout.strip().split(",") if m]


def part_throughput(args, shapes: Shapes, report: Report, limit_s: float) -> None:
    started = time.perf_counter()
    work = Path(args.workdir)
    assets = work / f"assets-{shapes.model}-{shapes.max_length}"
    if not (assets / "pairs.json").is_file():
        config = make_assets.write_model(assets / "model", shapes.model, shapes.max_length, seed=0)
        make_assets.write_pairs(
            assets / "pairs.json",
            vocab_size=config["vocab_size"],
            max_length=shapes.max_length,
            seed=0,
            synthetic=args.dry_run or args.synthetic,
        )
    meta = json.loads((assets / "pairs.json").read_text())["meta"]
    peak = {
        name: matmul_peak.matmul_flops_per_s(shapes.matmul_n, dtype, args.device, 3, 20 if args.device != "cpu" else 2)
        for name, dtype in matmul_peak.DTYPES.items()
    }
    print(
        f"  workload: {meta['pairs']} pairs, {meta['source']}, max length {meta['max_length']}; model "
        f"{shapes.model}; {shapes.batch_size} pairs x {shapes.steps} timed steps (+{shapes.warmup_steps} "
        f"warmup); matmul peak fp32 {peak['fp32'] / 1e12:.3f}, bf16 {peak['bf16'] / 1e12:.3f} TFLOP/s",
        flush=True,
    )
    common = [
        "--assets",
        str(assets),
        "--batch-size",
        str(shapes.batch_size),
        "--steps",
        str(shapes.steps),
        "--warmup-steps",
        str(shapes.warmup_steps),
    ]
    flags = dict(run_all.dpokit_variants(quick=True))
    plan = [
        (
            name,
            [
                sys.executable,
                str(HERE / "dpokit_runner.py"),
                *flags[name],
                *common,
                "--device",
                args.device,
                "--name",
                name,
            ],
        )
        for name in THROUGHPUT_DPOKIT
    ]
    peer = {name: (venv, f) for name, venv, f in run_all.peer_variants()}[THROUGHPUT_PEER]
    python = args.trl_python or str(run_all.VENVS / peer[0] / "bin" / "python")
    if not args.trl_python and not Path(python).is_file():
        python = sys.executable
    missing = missing_modules(python)
    if missing:
        report.skip(f"throughput {THROUGHPUT_PEER}", f"{python} lacks {', '.join(missing)} (see docs/benchmarks.md)")
    else:
        plan.append(
            (
                THROUGHPUT_PEER,
                [python, str(HERE / "peers" / f"{peer[0]}_runner.py"), *peer[1], *common, "--name", THROUGHPUT_PEER],
            )
        )
    results = []
    with open(work / "throughput.log", "w") as log:
        for name, cmd in plan:
            left = limit_s - (time.perf_counter() - started)
            if left < 5:
                report.check(f"throughput {name}", False, "no time left in the part's limit")
                continue
            t0 = time.perf_counter()
            result = run_all.run(cmd, left, log)
            ok = result is not None
            detail = (
                f"{result['tokens_per_s']:.1f} useful tok/s, {run_all.gib(result['peak_memory_bytes'])} GiB, "
                f"{time.perf_counter() - t0:.1f} s"
                if ok
                else f"no result (see {work / 'throughput.log'})"
            )
            report.check(f"throughput {name} ran", ok, detail)
            if ok:
                results.append(result)
    print("\n".join(["", *run_all.throughput_table(results, peak), ""]), flush=True)
    # The same model on the same pairs: every run's step-1 mean log-prob of the chosen responses
    # (at the initial weights, bf16) agrees with the padded run's to 1% (bf16 rounding; a wrong
    # mask or layout is off by far more).
    base = next((r for r in results if r["name"] == THROUGHPUT_DPOKIT[0]), None)
    for r in results:
        if base is None or r is base:
            continue
        a, b = run_all.mean_first_logp(r), run_all.mean_first_logp(base)
        if a is None or b is None:
            report.check(f"throughput {r['name']} step-1 logp", False, "no step-1 log-prob reported")
            continue
        report.check(
            f"throughput {r['name']} step-1 logp == padded",
            abs(a - b) <= 0.01 * abs(b),
            f"{a:.3f} vs {b:.3f} (tol 1%)",
        )


# ----------------------------------------------------------------------------- main


def versions() -> str:
    names = ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "omegaconf", "torchao", "safetensors")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes (runs on CPU in well under a minute)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument(
        "--perturb",
        default=os.environ.get("DPOKIT_GPU_CHECK_PERTURB", ""),
        help="comma-separated parts among flex,compile,chunked,offload: corrupt one side of their comparisons "
        "(their checks must FAIL)",
    )
    ap.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend of the compile part (default inductor; aot_eager for a CPU dry run)",
    )
    ap.add_argument(
        "--trl-python", default=None, help="python with TRL (default: benchmarks/.venvs/trl, else this one)"
    )
    ap.add_argument("--synthetic", action="store_true", help="synthetic pairs even if HH-RLHF is present")
    ap.add_argument("--workdir", default=str(HERE / ".gpu_check"), help="assets and the runners' log")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    args.perturb = {p for p in args.perturb.split(",") if p}
    if args.perturb - set(PERTURBABLE):
        ap.error(f"--perturb takes parts among {PERTURBABLE}, got {sorted(args.perturb)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("FAIL cuda: torch.cuda.is_available() is False", flush=True)
        return 1
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.device == "cpu" and args.dry_run else "inductor"
    shapes = DRY if args.dry_run else GPU
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the tolerances assume it)
    torch.backends.cudnn.allow_tf32 = False
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)  # a fallback to eager after 8 shapes would hide the kernel

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"gpu_check: device {args.device} ({device_name}), {'dry run' if args.dry_run else 'full'} shapes, "
        f"parts {','.join(parts)}, compile backend {args.compile_backend}"
        + (f", PERTURBED: {','.join(sorted(args.perturb))}" if args.perturb else ""),
        flush=True,
    )
    print(f"  {versions()}; {torch.get_num_threads()} threads; load {os.getloadavg()[0]:.1f}", flush=True)
    report = Report()
    started = time.perf_counter()
    timings = {}
    for part in parts:
        limit_s = PART_LIMITS_S[part] * (3 if args.dry_run else 1)  # a loaded 2-core CPU is slow
        print(f"== {part} (limit {limit_s:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            with time_limit(limit_s):
                if part == "flex":
                    part_flex(args, shapes, report)
                elif part == "compile":
                    part_compile(args, shapes, report)
                elif part == "chunked":
                    part_chunked(args, shapes, report, limit_s)
                elif part == "offload":
                    part_offload(args, shapes, report)
                else:
                    part_throughput(args, shapes, report, limit_s)
        except (PartTimeout, subprocess.TimeoutExpired) as e:
            report.check(f"{part} time limit", False, str(e))
        except Exception as e:  # a crash is a failure of this part, the others still run
            report.check(f"{part} ran", False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        timings[part] = time.perf_counter() - t0
        print(f"== {part}: {timings[part]:.1f} s", flush=True)
    total = time.perf_counter() - started
    report.check("total time", total <= args.budget, f"{total:.1f} s (budget {args.budget:.0f} s)")
    print(
        "elapsed per part: " + ", ".join(f"{p} {s:.1f} s" for p, s in timings.items()) + f"; total {total:.1f} s",
        flush=True,
    )
    verdict = "FAILED" if report.failed else "PASSED"
    print(
        f"gpu_check {verdict}: {report.passed} passed, {len(report.failed)} failed, {report.skipped} skipped"
        + (f" ({', '.join(report.failed)})" if report.failed else ""),
        flush=True,
    )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
