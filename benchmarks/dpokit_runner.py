"""One dpokit throughput measurement: full-parameter DPO steps over the benchmark pairs.

A step = reference log-probs (no grad) + policy forward + DPO loss + backward + AdamW step, over
`--batch-size` pairs (padded) or over the packs that hold about that many pairs (packed layouts:
the timed pool is packed once with dpokit's packer, and consecutive packs form a step so the
average pairs per step equals the batch size). Every variant processes exactly the same pairs.

Layouts: padded (one row per sequence, chosen rows then rejected), ffd / ffs (pairs packed into
rows of --pack-size tokens, first-fit decreasing / shuffle), prefix (prefix-shared + FFD: the
prompt computed once per pair). Reference strategies (dpokit.training.reference): frozen_copy (a
second model), swap (the reference weights swapped into the policy model), precomputed (log-probs
computed before the timed steps; that pass is reported as `precompute_seconds`).

Prints one `BENCH_RESULT {json}` line (shared_io.emit).

    python benchmarks/dpokit_runner.py --assets benchmarks/.assets --layout prefix --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # torchao's noisy CUDA .so probing

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# This checkout's dpokit, not an installed one (an editable install may point at another tree).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from master_weights import MasterWeights  # noqa: E402
from op_groups import op_group  # noqa: E402
from shared_io import Stopwatch, emit, read_model_config, read_workload, throughput_result  # noqa: E402

from dpokit.data import PackedBatch, collate_packed, collate_preference_pairs, pack_preference_dataset  # noqa: E402
from dpokit.losses import dpo_loss  # noqa: E402
from dpokit.models import load_hf_checkpoint  # noqa: E402
from dpokit.training.forward import policy_logps  # noqa: E402
from dpokit.training.host_memory import retain_freed_cpu_memory  # noqa: E402
from dpokit.training.packed_forward import packed_policy_logps  # noqa: E402
from dpokit.training.reference import StateDictSwapReference  # noqa: E402
from dpokit.training.scoring import PolicyLogps  # noqa: E402

LAYOUTS = ("padded", "ffd", "ffs", "prefix")
REFERENCES = ("frozen_copy", "swap", "precomputed")
ATTENTION = "auto"  # packed layouts: FlexAttention on CUDA, per-document SDPA on CPU (--attention)


def make_steps(
    pairs: list[dict], start: int, count: int, *, layout: str, batch_size: int, pack_size: int, pad_id: int, seed: int
) -> list[dict]:
    """Batches covering pairs[start:start+count], each with `pair_index` (positions in `pairs`)."""
    index = list(range(start, start + count))
    if layout == "padded":
        steps = []
        for s in range(0, count, batch_size):
            chunk = index[s : s + batch_size]
            batch = collate_preference_pairs([pairs[i] for i in chunk], pad_id=pad_id, pad_to_multiple_of=8)
            batch.pair_index = torch.tensor(chunk)
            steps.append(batch)
        return steps
    items = [dict(pairs[i], pair_index=i) for i in index]
    packed = pack_preference_dataset(
        items,
        pack_size=pack_size,
        algorithm="ffs" if layout == "ffs" else "ffd",
        prefix_sharing=layout == "prefix",
        seed=seed,
    )
    packs = [packed[k] for k in range(len(packed))]
    per_step = max(1, round(batch_size * len(packs) / count))
    steps = []
    for s in range(0, len(packs), per_step):
        group = packs[s : s + per_step]
        batch = collate_packed(group, pad_id=pad_id, pack_size=pack_size, prefix_sharing=layout == "prefix")
        batch.pair_index = torch.tensor([item["pair_index"] for pack in group for item in pack])
        steps.append(batch)
    return steps


def forward_logps(model, batch, *, chunked: bool) -> PolicyLogps:
    if isinstance(batch, PackedBatch):
        return packed_policy_logps(model, batch, attention_backend=ATTENTION)
    return policy_logps(model, batch, materialize_logits=not chunked)


def print_profile(profiler, seconds: float) -> None:
    """Self CPU time per op group and the top ops, to stderr (stdout carries the result line)."""
    averages = profiler.key_averages()
    groups: dict[str, float] = {}
    for event in averages:
        name = event.key
        group = op_group(name)
        groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e6
    total = sum(groups.values())
    print(f"\nprofile: {seconds:.2f} s wall in the timed steps, {total:.2f} s self CPU time in ops", file=sys.stderr)
    for group, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {t:8.2f} s  {t / total:6.1%}  {group}", file=sys.stderr)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", required=True, help="directory written by make_assets.py")
    ap.add_argument("--layout", default="padded", choices=LAYOUTS)
    ap.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "bf16", "bf16m", "bf16w"),
        help="bf16 = autocast over fp32 weights; bf16m = bf16 weights + fp32 master weights in the "
        "optimizer (benchmarks/master_weights.py); bf16w = pure bf16 weights and optimizer "
        "(torchtune's mode; small updates are rounded away)",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    ap.add_argument("--reference", default="frozen_copy", choices=REFERENCES)
    ap.add_argument(
        "--attention",
        default="auto",
        choices=("auto", "segments", "sdpa", "flex"),
        help="packed layouts' attention backend (dpokit.models.attention); sdpa = one dense mask",
    )
    ap.add_argument("--no-chunked", action="store_true", help="padded layout: materialise the full logits")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (of --batch-size pairs)")
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
    ap.add_argument(
        "--profile", action="store_true", help="run the timed steps under torch.profiler and print where the time goes"
    )
    args = ap.parse_args(argv)
    global ATTENTION
    ATTENTION = args.attention
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
    warm_pairs = args.warmup_steps * args.batch_size
    timed_pairs = args.steps * args.batch_size
    if warm_pairs + timed_pairs > len(pairs):
        raise SystemExit(f"need {warm_pairs + timed_pairs} pairs, the workload has {len(pairs)}")
    build = dict(
        layout=args.layout, batch_size=args.batch_size, pack_size=pack_size, pad_id=meta["pad_id"], seed=args.seed
    )
    warmup = make_steps(pairs, 0, warm_pairs, **build)
    timed = make_steps(pairs, warm_pairs, timed_pairs, **build)

    device = args.device
    model = load_hf_checkpoint(
        assets / "model", device=device, dtype="bf16" if args.dtype in ("bf16m", "bf16w") else None
    )
    model.train()
    if args.compile:
        for layer in model.layers:
            layer.compile()
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        if args.dtype == "bf16"
        else contextlib.nullcontext()
    )
    chunked = not args.no_chunked

    # Cross-framework check: the policy's log-probs of the pairs of the peers' first step (the first
    # --batch-size pairs) at the initial weights, in this run's layout and precision. Packed layouts
    # reorder pairs, so their own first step holds other pairs; this probe does not.
    first_chosen_logps = {}
    with torch.no_grad(), autocast:
        for batch in make_steps(pairs, 0, args.batch_size, **build):
            out = forward_logps(model, batch.to(device), chunked=chunked)
            first_chosen_logps.update({int(i): float(v) for i, v in zip(batch.pair_index, out.chosen)})

    precompute_seconds = 0.0
    if args.reference == "frozen_copy":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

        def reference(batch):
            with torch.no_grad(), autocast:
                return forward_logps(ref_model, batch, chunked=chunked)
    elif args.reference == "swap":
        swap = StateDictSwapReference(model)

        def reference(batch):
            with swap.swapped(), torch.no_grad(), autocast:
                return forward_logps(model, batch, chunked=chunked)
    else:  # precomputed: one no-grad pass over every pair before training, timed on its own
        chosen = torch.zeros(len(pairs), device=device)
        rejected = torch.zeros(len(pairs), device=device)
        started = time.perf_counter()
        with torch.no_grad(), autocast:
            for batch in (*warmup, *timed):
                batch = batch.to(device)
                out = forward_logps(model, batch, chunked=chunked)
                chosen[batch.pair_index], rejected[batch.pair_index] = out.chosen.float(), out.rejected.float()
        precompute_seconds = time.perf_counter() - started

        def reference(batch):
            return PolicyLogps(chosen[batch.pair_index], rejected[batch.pair_index])

    master = MasterWeights(model.parameters()) if args.dtype == "bf16m" else None
    optimizer = torch.optim.AdamW(master.parameters() if master else model.parameters(), lr=1e-5, fused=True)
    losses: list[float] = []

    def step(batch: dict) -> None:
        batch = batch.to(device)
        ref = reference(batch)
        with autocast:
            policy = forward_logps(model, batch, chunked=chunked)
            out = dpo_loss(policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta=0.1)
        loss = out.losses.mean()
        loss.backward()
        if master:
            master.gradients_to_master()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master:
            master.master_to_model()
        losses.append(loss.item())

    for batch in warmup:
        step(batch)
    watch = Stopwatch(device)
    profiler = torch.profiler.profile(record_shapes=False) if args.profile else contextlib.nullcontext()
    with profiler:
        for batch in timed:
            with watch:
                step(batch)
    if args.profile:
        print_profile(profiler, watch.seconds)
    timed_pool = pairs[warm_pairs : warm_pairs + timed_pairs]
    name = args.name or f"dpokit {args.layout} {args.dtype}{' compile' if args.compile else ''} ref={args.reference}"
    emit(
        throughput_result(
            name=name,
            framework="dpokit",
            config=config,
            pairs=timed_pool,
            seconds=watch.seconds,
            steps=watch.steps,
            device=device,
            prefix_sharing=args.layout == "prefix",
            reference_forward=args.reference != "precomputed",
            losses=losses,
            layout=args.layout,
            dtype=args.dtype,
            compile=args.compile,
            reference=args.reference,
            chunked=chunked,
            batch_size=args.batch_size,
            pack_size=pack_size if args.layout != "padded" else None,
            precompute_seconds=precompute_seconds,
            first_chosen_logps=first_chosen_logps,
            padded_tokens=sum(int(b.input_ids.numel()) for b in timed),
            threads=torch.get_num_threads(),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
