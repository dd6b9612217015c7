"""The machine's measured matmul peak, the denominator of model-FLOP efficiency.

Times `a @ b` for square n x n matrices in each dtype (best of --repeats after a warmup), on the
same device and thread count as the runners, and prints one `BENCH_RESULT` line:
{"fp32": FLOP/s, "bf16": FLOP/s, ...}. A matmul of two n x n matrices is 2 n^3 FLOPs.

    python benchmarks/matmul_peak.py --n 2048
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_io import emit  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_flops_per_s(n: int, dtype: torch.dtype, device: str, repeats: int, inner: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # Warm up for a second: kernel selection, and CPU clocks / caches settling after the last job.
    started = time.perf_counter()
    while time.perf_counter() - started < 1.0:
        torch.matmul(a, b, out=out)
        sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n**3 / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="matrix size (default 2048 on CPU, 8192 on CUDA)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n or (8192 if args.device.startswith("cuda") else 2048)
    inner = 20 if args.device.startswith("cuda") else 3
    result = {name: matmul_flops_per_s(n, dtype, args.device, args.repeats, inner) for name, dtype in DTYPES.items()}
    emit({**result, "n": n, "device": args.device, "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
