"""Peak memory and time of one forward+backward of the output layer + per-token log-probs:
chunked (`dpokit.logprobs.chunked_token_logps`) vs materialised (full logits, then
`dpokit.losses.token_logps`, the path the recipes used before), side by side in one run.

    python benchmarks/chunked_logprobs.py                       # hidden 2048, V 128,256, 4,096 tokens
    python benchmarks/chunked_logprobs.py --frozen-weight       # LoRA case: the output head is frozen
    python benchmarks/chunked_logprobs.py --tokens 1024 --vocab 32000   # quicker

Every measurement runs in a fresh subprocess so one path's allocations cannot hide the other's.
Memory, on CUDA: torch.cuda.max_memory_allocated() during the step minus the allocation before it.
On CPU (torch has no allocator statistics there): the process's peak resident set (VmHWM from
/proc/self/status) during the first step minus its resident set just before it (inputs, weight and
labels already built and touched). Both count what the step adds: logits, temporaries and the
gradients of the hidden states and (unless --frozen-weight) of the weight. Time: the median wall
time of --repeats further steps after that first one (CUDA synchronised), or with --repeats 0 the
time of that first step (it then includes first-touch page faults, for both paths alike).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> dict:
    import torch

    from dpokit.logprobs import chunked_token_logps, token_logps

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    hidden = (torch.randn(args.tokens, args.hidden, device=device)).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=device) / args.hidden**0.5).to(dtype)
    weight.requires_grad_(not args.frozen_weight)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
    upstream = torch.randn(args.tokens, device=device)  # a per-token downstream gradient, as DPO's

    def step():
        if args.path == "chunked":
            logps = chunked_token_logps(hidden, weight, labels, chunk_size=args.chunk_size)
        else:
            logps = token_logps(hidden @ weight.t(), labels)
        (logps * upstream).sum().backward()
        hidden.grad = weight.grad = None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_kib("VmRSS") * 1024
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        peak = _rss_kib("VmHWM") * 1024 - before
    times = [] if args.repeats else [first]
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {
        "path": args.path,
        "peak_bytes": peak,
        "seconds": statistics.median(times),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--frozen-weight", action="store_true", help="no gradient for the output weight (LoRA)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed steps after the memory step (0: time the memory step itself)"
    )
    parser.add_argument("--path", choices=["chunked", "materialised"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.path:  # we are the child
        print(json.dumps(child(args)))
        return

    results = {}
    for path in ("materialised", "chunked"):
        cmd = (
            [sys.executable, __file__, "--path", path]
            + [a for a in sys.argv[1:] if a != "--path"]
            + ["--device", args.device]
        )
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{path} run failed:\n{out.stderr}")
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])

    m, c = results["materialised"], results["chunked"]
    weight = "frozen" if args.frozen_weight else "trainable"
    print(
        f"output layer + log-probs, forward+backward: {args.tokens} tokens, hidden {args.hidden}, "
        f"vocab {args.vocab:,}, {args.dtype}, weight {weight}, chunk {args.chunk_size}, device {args.device} "
        f"({m['threads']} threads); memory = {'cuda max_memory_allocated' if args.device.startswith('cuda') else 'peak RSS (VmHWM) delta'}"
    )
    print(f"{'path':<14}{'peak extra memory':>20}{'time (median)':>16}")
    for name, r in (("materialised", m), ("chunked", c)):
        print(f"{name:<14}{r['peak_bytes'] / 2**30:>16.2f} GiB{r['seconds']:>14.3f} s")
    print(
        f"{'ratio':<14}{c['peak_bytes'] / m['peak_bytes']:>19.3f}x{c['seconds'] / m['seconds']:>15.3f}x"
        f"   (goal: memory <= 0.35x at time <= 1.15x)"
    )


if __name__ == "__main__":
    main()
