"""A weighted mixture of named training sets through the single-device recipe: it trains, says
what it mixed, resumes, and refuses to resume a checkpoint made with other weights."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess

RUN = [sys.executable, "-m", "dpokit.cli", "run", "dpo_lora_single_device", "--config", "tiny", "device=cpu"]
BUNDLED = "{_component_: dpokit.data.bundled_preference_dataset, name: case_following, split: %s, max_seq_len: 128}"


def mixture(train_weight: float, validation_weight: float) -> str:
    return (
        f"train_datasets={{train: {{weight: {train_weight}, dataset: {BUNDLED % 'train'}}}, "
        f"held_out: {{weight: {validation_weight}, dataset: {BUNDLED % 'validation'}}}}}"
    )


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=600)


def test_a_mixture_trains_resumes_and_refuses_other_weights(tmp_path):
    out = tmp_path / "run"
    common = ["train_dataset=null", "eval_every=100", "checkpoint.every=2", f"output_dir={out}"]
    first = run(*common, mixture(3, 1), "max_steps=2")
    assert first.returncode == 0, first.stderr
    # 4,000 + 256 pairs mixed 3:1 -> 3,192 + 1,064 (the held-out set upsampled 4.16x)
    assert (
        "train: mixture of 2 sets: train 3,192 (weight 3, 0.8x of 4,000), held_out 1,064 (weight 1, 4.16x of 256)"
        in (first.stdout)
    )
    again = run(*common, mixture(3, 1), "max_steps=4", "resume=true")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout

    other = run(*common, mixture(1, 1), "max_steps=6", "resume=true")
    assert other.returncode == 2
    [line] = [x for x in other.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: checkpoint data position was saved with mixture=")


def test_a_mixture_and_a_single_training_set_at_once_is_refused(tmp_path):
    result = run(f"output_dir={tmp_path}", mixture(1, 1), "max_steps=1")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("give train_dataset or train_datasets, not both (train_dataset=null for a mixture)")
    )
    typo = run(f"output_dir={tmp_path}", "train_dataset=null", "train_datasets={a: {wieght: 1}}", "max_steps=1")
    assert typo.returncode == 2
    assert (
        typo.stderr.strip().splitlines()[-1].endswith("unknown key 'train_datasets.a.wieght' (did you mean 'weight'?)")
    )
