"""Full DPO with a reference that is not the initial policy (`reference.checkpoint_dir`): for the
swap, frozen and precomputed strategies the step-0 validation must hold the policy's log-probs
(those of a run of A alone) and rewards beta * (log p_A - log p_B), B's log-probs being those of a
run of B alone; and all three strategies must train alike."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dpokit.distributed.checkpoint import save_hf_model
from dpokit.models import tiny

pytestmark = pytest.mark.subprocess
RUN = [sys.executable, "-m", "dpokit.cli", "run", "dpo_full_distributed", "--config", "tiny", "device=cpu"]
STEPS = ["max_steps=2", "eval_every=100", "validate_at_end=false", "lr_scheduler.warmup_steps=1"]


def _export(seed: int, directory) -> None:
    torch.manual_seed(seed)
    model = tiny()
    save_hf_model(model, model.state_dict().items(), directory, dtype=torch.float32)


def _run(tmp_path, name: str, *overrides: str) -> list[dict]:
    out = tmp_path / name
    result = subprocess.run([*RUN, *STEPS, f"output_dir={out}", *overrides], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_reference_from_another_checkpoint_for_every_strategy(tmp_path):
    _export(1, tmp_path / "a")
    _export(2, tmp_path / "b")
    alone_a = _run(tmp_path, "alone_a", f"checkpoint_dir={tmp_path / 'a'}")[0]
    alone_b = _run(tmp_path, "alone_b", f"checkpoint_dir={tmp_path / 'b'}")[0]
    beta = 0.1
    runs = {}
    for strategy in ("swap", "frozen", "precomputed"):
        records = _run(
            tmp_path,
            strategy,
            f"checkpoint_dir={tmp_path / 'a'}",
            f"reference.checkpoint_dir={tmp_path / 'b'}",
            f"reference.strategy={strategy}",
        )
        start = records[0]
        assert start["split"] == "validation" and start["step"] == 0
        assert start["logps_chosen"] == pytest.approx(alone_a["logps_chosen"], rel=1e-6)
        for side in ("chosen", "rejected"):
            expected = beta * (alone_a[f"logps_{side}"] - alone_b[f"logps_{side}"])
            assert start[f"rewards_{side}_mean"] == pytest.approx(expected, rel=1e-4), (strategy, side)
        assert abs(start["reward_margin"]) > 1e-4  # not the policy against itself
        runs[strategy] = [r["loss"] for r in records if r["split"] == "train"]
    assert runs["frozen"] == pytest.approx(runs["swap"], rel=1e-5)
    assert runs["precomputed"] == pytest.approx(runs["swap"], rel=1e-5)


def test_a_missing_reference_checkpoint_is_refused_before_loading(tmp_path):
    result = subprocess.run(
        [*RUN, *STEPS, f"output_dir={tmp_path / 'out'}", f"reference.checkpoint_dir={tmp_path / 'nowhere'}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nowhere'}: no config.json (expected a Hugging Face model directory)"
    )
