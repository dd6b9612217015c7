"""benchmarks/gpu_check.py on CPU: the dry run (every part at tiny shapes) passes, and a deliberately
corrupted comparison (--perturb) turns every check of the corrupted parts into a FAIL and the exit
status non-zero, so the assertions of the GPU run can fail."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
# Checks per part of the dry run (3 variants x 2 layouts x (2 fp32 + 1 bf16); 3 cases x 3; 1; the two
# offloaded runs against their twins without offloading; the memory checks are CUDA only).
EXPECTED = {"flex": 18, "compile": 9, "chunked": 1, "offload": 2}


def run_check(tmp_path, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "DPOKIT_GPU_CHECK_PERTURB"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--dry-run", "--workdir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=env,
    )
    return proc.returncode, proc.stdout + proc.stderr


def lines(output: str, verdict: str, part: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(rf"{verdict} {part}[ :]", line)]


def test_dry_run_passes_every_part(tmp_path):
    code, out = run_check(tmp_path, "--synthetic")
    assert code == 0, out
    assert re.search(r"^gpu_check PASSED: \d+ passed, 0 failed", out, re.M), out
    assert not re.search(r"^FAIL ", out, re.M), out
    for part, count in EXPECTED.items():
        assert len(lines(out, "PASS", part)) == count, (part, out)
    # the four dpokit runs of the throughput table ran and agree on the step-1 log-probs
    assert len(lines(out, "PASS", r"throughput dpokit .* ran")) == 4, out
    assert len(lines(out, "PASS", r"throughput dpokit .* step-1 logp == padded")) == 3, out
    assert "| dpokit prefix+ffd bf16-master ref=precomputed |" in out
    # CPU FlexAttention has no backward: said, not hidden
    assert "SKIP flex gradients: " in out
    # TRL: a row or a skip with its reason, never silently absent
    assert ("PASS throughput TRL bf16 ran" in out) or re.search(r"^SKIP throughput TRL bf16: .+ lacks ", out, re.M)
    assert "SKIP offload peak memory: " in out
    for part in ("flex", "compile", "chunked", "offload", "throughput"):
        assert re.search(rf"^== {part}: \d+\.\d s$", out, re.M), part


def test_perturbed_comparisons_fail(tmp_path):
    code, out = run_check(
        tmp_path, "--parts", "flex,compile,chunked,offload", "--perturb", "flex,compile,chunked,offload"
    )
    assert code == 1, out
    for part, count in EXPECTED.items():
        assert lines(out, "PASS", part) == [], (part, out)
        assert len(lines(out, "FAIL", part)) == count, (part, out)
    assert re.search(rf"^gpu_check FAILED: 1 passed, {sum(EXPECTED.values())} failed", out, re.M), out


def test_unknown_part_is_refused(tmp_path):
    code, out = run_check(tmp_path, "--parts", "flex,nope")
    assert code == 2 and "unknown parts ['nope']" in out, out
