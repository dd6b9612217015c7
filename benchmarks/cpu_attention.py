"""torch's CPU flash-attention backward on bf16 inputs against the same kernel on fp32 copies, by
sequence length, and `dpokit.models.cpu_attention.flash_attention` against
`F.scaled_dot_product_attention` on one packed row of documents (forward + backward).

The lengths where the fp32 backward wins set `FP32_BACKWARD_MAX_LENGTH`; rerun this on a new
machine or torch before moving it.

    python benchmarks/cpu_attention.py [--heads 8 --kv-heads 4 --head-dim 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpokit.models.cpu_attention import FP32_BACKWARD_MAX_LENGTH, flash_attention  # noqa: E402

FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def best_ms(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls after two warmup calls, in milliseconds."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def backward_ms(length: int, heads: int, kv_heads: int, dim: int, fp32: bool, repeats: int) -> float:
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(1, heads, length, dim, generator=gen).bfloat16()
    k, v = (torch.randn(1, kv_heads, length, dim, generator=gen).bfloat16() for _ in range(2))
    grad = torch.randn(1, heads, length, dim, generator=gen).bfloat16()
    out, lse = FORWARD(q, k, v, 0.0, True)

    def call():
        if not fp32:
            return BACKWARD(grad, q, k, v, out, lse, 0.0, True)
        grads = BACKWARD(*(t.float() for t in (grad, q, k, v, out)), lse, 0.0, True)
        return [g.bfloat16() for g in grads]

    return best_ms(call, repeats)


def packed_row_ms(fn, lengths: list[int], heads: int, kv_heads: int, dim: int, repeats: int) -> float:
    """Forward + backward of one row of documents laid out as the model lays them out."""
    total = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    xq = torch.randn(1, total, heads * dim, generator=gen).bfloat16().requires_grad_()
    xk, xv = (torch.randn(1, total, kv_heads * dim, generator=gen).bfloat16().requires_grad_() for _ in range(2))
    grad = torch.randn(1, total, heads * dim, generator=gen).bfloat16()

    def call():
        q = xq.view(1, total, heads, dim).transpose(1, 2)
        k, v = (x.view(1, total, kv_heads, dim).transpose(1, 2) for x in (xk, xv))
        pieces = [fn(*qkv) for qkv in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
        torch.cat(pieces, 2).transpose(1, 2).reshape(1, total, -1).backward(grad)

    return best_ms(call, repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--lengths", default="64,128,192,256,320,384,448,512,768,1024")
    ap.add_argument("--row", default="300,250,200,150,124", help="document lengths of the packed row")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (args.heads, args.kv_heads, args.head_dim)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, heads {shape}")
    print(f"FP32_BACKWARD_MAX_LENGTH = {FP32_BACKWARD_MAX_LENGTH}")
    print("| tokens | bf16 backward ms | fp32-copies backward ms | bf16 / fp32 |")
    print("|---:|---:|---:|---:|")
    for length in (int(x) for x in args.lengths.split(",")):
        low = backward_ms(length, *shape, fp32=False, repeats=args.repeats)
        high = backward_ms(length, *shape, fp32=True, repeats=args.repeats)
        print(f"| {length} | {low:.2f} | {high:.2f} | {low / high:.2f}x |")
    row = [int(x) for x in args.row.split(",")]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    # alternate the two, twice, so a drift of the machine shows instead of favouring one
    times = {"sdpa": [], "flash_attention": []}
    for _ in range(2):
        times["sdpa"].append(packed_row_ms(sdpa, row, *shape, args.repeats))
        times["flash_attention"].append(packed_row_ms(flash_attention, row, *shape, args.repeats))
    theirs, ours = min(times["sdpa"]), min(times["flash_attention"])
    print(
        f"packed row {row}: F.scaled_dot_product_attention {theirs:.2f} ms, flash_attention {ours:.2f} ms "
        f"(forward + backward): {theirs / ours:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
