"""Where a runner's timed steps spend their time, op by op, without torch.profiler.

    python benchmarks/op_timing.py [--tree DIR] RUNNER [runner flags...]

runs `DIR/benchmarks/RUNNER` (default DIR: this checkout) as it is, with a TorchDispatchMode that
times every aten op of the timed steps (the runner's `Stopwatch` marks them) with perf_counter and
sums the seconds by `op_groups.op_group`. It prints the runner's own result line, then
`OP_TIMING {json}`: the timed steps' wall seconds, the seconds per op group, the op count, and
the seconds the timer itself adds to each op (measured at the end on a trivial op, with the timer
and without), so that a reader can take the timer's cost out of the wall time.

Why not torch.profiler: on the project's VMs the profiler changes the process's memory behaviour
(the timed steps of the full FFD step took 7 minor page faults plain and 54,739 profiled) and those
faults land in the memory-bound ops (zero fills, casts), so their profiled times are inflated; e.g.
the embedding's gradient zero fill, 1.6 ms timed by hand, showed 45-62 ms profiled. Timed here,
an op costs its own run plus a few microseconds of Python around it; the time the mode adds per op
falls outside every group, so `step - ops x overhead - sum(groups)` is the time between ops
(Python, autograd, dispatch) of the step as it runs without the timer.

Ops are timed where they are dispatched: a CPU step (synchronous kernels) is timed exactly; on CUDA
the kernels are asynchronous and these figures are launch times, not kernel times. Compiled blocks
(`--compile`) are refused: under an active dispatch mode torch.compile'd code runs op by op, eagerly,
so the figures would be the eager step's.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from op_groups import op_group  # noqa: E402

RESULT_PREFIX = "OP_TIMING "


class OpTimer(TorchDispatchMode):
    """Seconds per op group of every aten op dispatched while `active`."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls = 0
        self._groups: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.active:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = func.name()
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = op_group(name)
        self.seconds[group] += elapsed
        self.calls += 1
        return out


def timer_overhead(calls: int = 20_000, repeats: int = 3) -> float:
    """Seconds an active OpTimer adds to one op: a trivial in-place op timed in a loop with the
    timer and without it (the fastest of `repeats` loops each)."""
    x = torch.zeros(())

    def loop() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            x.add_(0.0)
        return time.perf_counter() - start

    plain = min(loop() for _ in range(repeats))
    timer = OpTimer()
    with timer:
        timer.active = True
        timed = min(loop() for _ in range(repeats))
    return max(0.0, (timed - plain) / calls)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=str(HERE.parent), help="the dpokit source tree whose runner to run")
    ap.add_argument("runner", help="a runner script in TREE/benchmarks, e.g. dpokit_runner.py")
    args, runner_argv = ap.parse_known_args(argv)
    if any(len(arg) > 4 and "--compile".startswith(arg) for arg in runner_argv):  # argparse takes prefixes
        ap.error("--compile: compiled code runs eagerly under a dispatch mode; time it with the runner's --profile")
    bench = Path(args.tree).resolve() / "benchmarks"
    # The runner's own helpers, imported first so that its `from shared_io import Stopwatch` gets
    # the patched class: the timer runs only inside the timed steps.
    sys.path.insert(0, str(bench))
    import shared_io

    timer = OpTimer()
    wall = {"seconds": 0.0, "steps": 0}
    stopwatch_enter, stopwatch_exit = shared_io.Stopwatch.__enter__, shared_io.Stopwatch.__exit__

    def enter(self):
        result = stopwatch_enter(self)
        timer.active = True
        return result

    def exit_(self, *exc):
        timer.active = False
        stopwatch_exit(self, *exc)
        wall["seconds"], wall["steps"] = self.seconds, self.steps

    shared_io.Stopwatch.__enter__, shared_io.Stopwatch.__exit__ = enter, exit_
    sys.argv = [str(bench / args.runner), *runner_argv]
    with timer:
        try:
            runpy.run_path(str(bench / args.runner), run_name="__main__")
        except SystemExit as stop:
            if stop.code not in (None, 0):
                raise
    report = {
        "seconds": wall["seconds"],
        "steps": wall["steps"],
        "ops": timer.calls,
        "groups": dict(timer.seconds),
        "timer_seconds_per_op": timer_overhead(),
    }
    print(RESULT_PREFIX + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
