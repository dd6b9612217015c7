"""Two-rank runs in a row, counting the ones that did not end cleanly (a SIGABRT at exit,
"terminate called without an active exception", any non-zero exit or a traceback). Not a unit
test: it takes minutes. `python scripts/stress_shutdown.py --runs 50`"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--recipe", default="dpo_full_distributed")
    args = parser.parse_args()
    bad = 0
    started = time.perf_counter()
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "dpokit.cli", "run", args.recipe, "--config", "tiny",
                       "--nproc_per_node", "2", "max_steps=2", "eval_every=100", f"output_dir={out}"]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True)
            final = Path(out) / "final" / "model.safetensors"
            unclean = (
                result.returncode != 0
                or not final.is_file()
                or "terminate called" in result.stderr
                or "Traceback" in result.stderr
            )
            bad += unclean
            if unclean:
                print(f"run {i}: exit {result.returncode}\n{result.stderr[-2000:]}")
    print(f"{args.runs} two-rank runs of {args.recipe}: {bad} unclean, {time.perf_counter() - started:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
