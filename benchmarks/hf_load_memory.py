"""Peak memory of loading an HF checkpoint: dpokit's meta-device loader vs the naive way
(build the model with random init, read the whole state dict, load_state_dict).

    python benchmarks/hf_load_memory.py [--dim 512 --layers 8 --vocab 32000]

Each method runs in a fresh process (Linux: the peak is reset after imports through
/proc/self/clear_refs); printed: checkpoint size, peak RSS growth of each method (after touching
every weight, so memory-mapped pages count) and its ratio to the checkpoint size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

METHODS = {
    "dpokit": "from dpokit.models import load_hf_checkpoint; m = load_hf_checkpoint(d)",
    "naive": (
        "from dpokit.models import model_from_hf_config; from safetensors.torch import load_file;"
        "m = model_from_hf_config(d); sd = load_file(d + '/model.safetensors');"
        "m.load_state_dict({k.removeprefix('model.'): v for k, v in sd.items()})"
    ),
}


def child(method: str, directory: str) -> None:
    import torch  # noqa: F401  (baseline includes torch)

    import dpokit.models  # noqa: F401

    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS (Linux)
        f.write("5")
    base = _status("VmRSS")
    start = time.perf_counter()
    scope = {"d": directory}
    exec(METHODS[method], scope)
    sum(float(p.sum()) for p in scope["m"].parameters())  # touch every weight (mmap-backed pages count)
    peak = _status("VmHWM")
    print(f"{(peak - base) / 1024:.1f} {time.perf_counter() - start:.2f}")


def _status(field: str) -> int:
    """A kB field of /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    import torch

    from dpokit.models import llama, save_hf_checkpoint

    with tempfile.TemporaryDirectory() as directory:
        model = llama(
            vocab_size=args.vocab,
            dim=args.dim,
            n_layers=args.layers,
            n_heads=8,
            n_kv_heads=4,
            hidden_dim=4 * args.dim,
            max_seq_len=2048,
        )
        size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        save_hf_checkpoint(model, directory)
        del model
        print(f"checkpoint: {size_mb:.1f} MiB fp32 ({args.layers} layers, dim {args.dim}, vocab {args.vocab})")
        results = {}
        for method in METHODS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", method, directory], capture_output=True, text=True, check=True
            ).stdout.split()
            results[method] = float(out[0])
            print(f"{method:>7}: peak RSS +{out[0]} MiB ({float(out[0]) / size_mb:.2f}x checkpoint), {out[1]} s")
        print(f"naive / dpokit peak: {results['naive'] / max(results['dpokit'], 1e-9):.2f}x")
        del torch


if __name__ == "__main__":
    main()
