"""benchmarks/op_timing.py and op_groups.py: ops timed by hand land in the right group, only inside
a runner's timed steps, for a runner of another source tree. No benchmark runs here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import op_groups  # noqa: E402
import overheads  # noqa: E402
from op_timing import RESULT_PREFIX, OpTimer, timer_overhead  # noqa: E402


def timed_ops(fn) -> OpTimer:
    timer = OpTimer()
    with timer:
        timer.active = True
        fn()
    return timer


def test_the_ops_of_a_step_fall_in_their_groups():
    """The op names the dispatcher really produces (overloads, in-place, backward) for each kind of work."""
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(48, 32, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(1, 2, 16, 8, requires_grad=True)

    def step():
        h = F.rms_norm(x, (32,))
        y = F.silu(F.linear(h, w)).float()
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        (y.logsumexp(-1).sum() + out.sum()).backward()

    timer = timed_ops(step)
    names = set(timer._groups)
    # the backward's own kernels are timed too (the autograd engine runs them with the mode on)
    assert {"aten::silu_backward", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= {
        name.split(".")[0] for name in names
    }
    assert {"aten::mm", "aten::rsqrt", "aten::silu", "aten::_to_copy", "aten::logsumexp"} <= {
        name.split(".")[0] for name in names
    }
    groups = timer._groups
    assert all(groups[n] == op_groups.MATMUL for n in names if n.split(".")[0] in ("aten::mm", "aten::addmm"))
    assert any(g == op_groups.ATTENTION for g in groups.values())
    assert groups["aten::rsqrt"] == groups["aten::silu"] == op_groups.ELEMENTWISE  # rms_norm's rsqrt, SwiGLU
    assert groups["aten::_to_copy"] == op_groups.CASTS
    assert groups["aten::logsumexp"] == op_groups.LOGPROBS
    assert timer.seconds[op_groups.MATMUL] > 0 and timer.seconds[op_groups.ATTENTION] > 0


def test_names_that_look_alike_are_not_confused():
    assert op_groups.op_group("aten::expand") == "other"  # not an exp
    assert op_groups.op_group("aten::rsqrt") == op_groups.ELEMENTWISE  # not the optimizer's sqrt
    assert op_groups.op_group("aten::addmm") == op_groups.MATMUL  # not an add
    assert op_groups.op_group("aten::add_.Tensor") == op_groups.ELEMENTWISE
    assert op_groups.op_group("aten::_fused_adamw_") == op_groups.OPTIMIZER
    assert op_groups.op_group("aten::fill_") == "other"
    assert op_groups.op_group("Optimizer.step#AdamW.step") == op_groups.OPTIMIZER  # a profiler annotation


def test_the_timers_cost_is_taken_out_of_the_step():
    """10 s wall, 1,000 ops at 1 ms of timer each: a 9 s step, of which 4.5 s matmul, 0.9 s attention,
    1.8 s other ops and the rest (1.8 s) between ops."""
    report = {
        "seconds": 10.0,
        "steps": 3,
        "ops": 1000,
        "timer_seconds_per_op": 1e-3,
        "groups": {op_groups.MATMUL: 4.5, op_groups.ATTENTION: 0.9, "other": 1.8},
    }
    shares = overheads.timed_shares(report)
    assert abs(shares[op_groups.MATMUL] - 0.5) < 1e-12
    assert abs(shares[overheads.BETWEEN_OPS] - 0.2) < 1e-12
    assert abs(shares["non-matmul"] - 0.4) < 1e-12


def test_the_timer_costs_a_little_per_op():
    assert 0.0 < timer_overhead(calls=2000) < 1e-3


def test_nothing_is_timed_while_inactive():
    a = torch.randn(32, 32)
    timer = OpTimer()
    with timer:
        a @ a
        timer.active = True
        a + a
        timer.active = False
        a @ a
    assert timer.calls == 1
    assert set(timer.seconds) == {op_groups.ELEMENTWISE}


TOY_RUNNER = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared_io
from shared_io import Stopwatch

print("tree marker:", getattr(shared_io, "TREE_MARKER", None))  # this tree's shared_io, not the caller's

a = torch.randn(64, 64)
for _ in range(5):  # outside the timed steps: not counted
    a @ a
watch = Stopwatch("cpu")
for _ in range(int(sys.argv[1])):
    with watch:
        (a @ a).add_(1.0).relu_()
print("BENCH_RESULT {}")
"""


def test_a_runner_of_another_tree_is_timed_in_its_steps_only(tmp_path):
    tree = tmp_path / "other-tree"
    (tree / "benchmarks").mkdir(parents=True)
    shutil.copy(BENCH / "shared_io.py", tree / "benchmarks" / "shared_io.py")
    with open(tree / "benchmarks" / "shared_io.py", "a") as f:
        f.write("\nTREE_MARKER = 'other-tree'\n")
    (tree / "benchmarks" / "toy_runner.py").write_text(TOY_RUNNER)
    proc = subprocess.run(
        [sys.executable, str(BENCH / "op_timing.py"), "--tree", str(tree), "toy_runner.py", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tree marker: other-tree" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    report = json.loads(lines[-1][len(RESULT_PREFIX) :])
    assert report["steps"] == 3
    assert report["ops"] == 3 * 3  # mm, add_, relu_ per step; the warmup's five mm are outside
    assert set(report["groups"]) == {op_groups.MATMUL, op_groups.ELEMENTWISE, "other"}
    assert 0 < sum(report["groups"].values()) <= report["seconds"]


def test_compiled_runs_are_refused(capsys):
    """Under a dispatch mode torch.compile'd code runs eagerly: timing it would report the eager step."""
    import op_timing

    try:
        op_timing.main(["dpokit_runner.py", "--compile"])
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("op_timing.py accepted --compile")
    assert "compiled code runs eagerly" in capsys.readouterr().err
