"""`dpokit eval` of a finished run reproduces the validation the run logged for its final weights."""

import json
import os
import subprocess
import sys

import pytest

from dpokit.data import bundled_task_path

DPOKIT = [sys.executable, "-m", "dpokit.cli"]
VALIDATION = str(bundled_task_path("case_following", "validation"))
COMPARED = ("acc", "reward_margin", "rewards_chosen_mean", "rewards_rejected_mean", "preference_loss", "loss")
STEPS = ["max_steps=6", "eval_every=4", "validate_at_start=false", "device=cpu"]  # validations at 4 and 6 (the end)


def dpokit(*args, cwd=None):
    return subprocess.run([*DPOKIT, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def train(recipe, out, *overrides):
    result = dpokit("run", recipe, "--config", "tiny", f"output_dir={out}", *STEPS, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in validations] == [4, 6]
    return validations[-1]


def evaluate(*checkpoints, extra=()):
    result = dpokit("eval", *checkpoints, "--data", VALIDATION, "--json", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)["checkpoints"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "lora"
    # A beta other than the default, and mean log-probs: eval must take both from the run's config.
    return out, train("dpo_lora_single_device", out, "loss.beta=0.3", "average_logps=true")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "full"
    return out, train("dpo_full_distributed", out)


def worst_difference(metrics, logged):
    return max(abs(metrics[name] - logged[name]) for name in COMPARED)


@pytest.mark.subprocess
def test_eval_of_a_lora_run_reproduces_its_final_validation(lora_run):
    """The run dir and final/adapter are the trained policy as it trained (base + adapter, adapters
    off = reference): the same numbers. The merged final/ (reference: the run's initial weights)
    differs by the merge's rounding only."""
    out, logged = lora_run
    run_dir, adapter, merged = evaluate(out, out / "final" / "adapter", out / "final")
    for result in (run_dir, adapter):
        assert result["pairs"] == 256
        assert worst_difference(result["metrics"], logged) < 1e-6
        assert result["settings"]["beta"] == 0.3 and result["settings"]["average_logps"] is True
        assert "adapters off" in result["reference"] and "random init, seed 0" in result["reference"]
        assert abs(result["metrics"]["logps_chosen"] - logged["logps_chosen"]) < 1e-6
    assert worst_difference(merged["metrics"], logged) < 1e-6
    assert "initial weights" in merged["reference"]
    assert logged["acc"] != 0.5  # the adapter moved the policy: a reference mix-up would show


@pytest.mark.subprocess
def test_eval_of_a_full_run_reproduces_its_final_validation(full_run):
    out, logged = full_run
    for result in evaluate(out, out / "final"):
        assert worst_difference(result["metrics"], logged) < 1e-6
        assert result["reference"].startswith("the run's initial weights")


@pytest.mark.subprocess
def test_two_runs_side_by_side(lora_run, full_run):
    (lora_out, lora_logged), (full_out, full_logged) = lora_run, full_run
    result = dpokit("eval", lora_out, full_out, "--data", VALIDATION)
    assert result.returncode == 0, result.stderr[-3000:]
    header, *rows = [line.split() for line in result.stdout.splitlines()[1:11]]
    assert header == ["metric", "[1]", "[2]"]
    acc = next(row for row in rows if row[0] == "acc")
    assert [float(v) for v in acc[1:]] == pytest.approx([lora_logged["acc"], full_logged["acc"]], abs=1e-6)
    assert f"[1] {lora_out}" in result.stdout and f"[2] {full_out}" in result.stdout
    both = evaluate(lora_out, full_out, extra=["--loss-beta", "0.5"])
    assert [r["checkpoint"] for r in both] == [str(lora_out), str(full_out)]
    assert all(r["settings"]["beta"] == 0.5 for r in both)
    # beta scales the rewards: the run's own were logged at beta 0.3 (LoRA) and 0.1 (full). A
    # margin is a mean of small differences of fp32 log-probs (~1e-4 of ~100), so the rounding of
    # beta * (policy - reference) shows at 1e-4 relative.
    assert both[0]["metrics"]["reward_margin"] == pytest.approx(lora_logged["reward_margin"] * 0.5 / 0.3, rel=1e-3)
    assert both[1]["metrics"]["reward_margin"] == pytest.approx(full_logged["reward_margin"] * 0.5 / 0.1, rel=1e-3)


@pytest.mark.subprocess
def test_bad_inputs_are_one_line_and_exit_2(lora_run, tmp_path):
    out, _ = lora_run
    adapter_copy = tmp_path / "adapter"
    adapter_copy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter_copy / name).write_bytes((out / "final" / "adapter" / name).read_bytes())
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": "a"}\n')
    cases = [
        ((tmp_path / "missing", "--data", VALIDATION), "missing: checkpoint not found"),
        ((tmp_path, "--data", VALIDATION), "not a checkpoint"),
        ((adapter_copy, "--data", VALIDATION), "base_model_name_or_path is null"),
        ((out, "--data", tmp_path / "none.jsonl"), "none.jsonl: preference data file not found"),
        ((out, "--data", bad_data), "bad.jsonl:2"),
        ((out / "final" / "config.json", "--data", VALIDATION), "a checkpoint is a folder"),
    ]
    for args, expected in cases:
        result = dpokit("eval", *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dpokit: error: "), result.stderr
        assert expected in lines[0], lines[0]


@pytest.mark.subprocess
def test_a_hub_split_evaluates_as_the_same_local_file(lora_run, tmp_path):
    """--hub reads a Hugging Face dataset split (here from an offline cache) as --data reads the file."""
    out, logged = lora_run
    repo = tmp_path / "hf-cache" / "datasets--me--case"
    commit = "5c6cb2a5d3e4f1b0a9c8d7e6f5a4b3c2d1e0f9a8"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "test.jsonl").write_bytes(open(VALIDATION, "rb").read())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    command = [*DPOKIT, "eval", str(out), "--hub", "me/case", "--split", "test", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (evaluated,) = json.loads(result.stdout)["checkpoints"]
    assert evaluated["pairs"] == 256 and worst_difference(evaluated["metrics"], logged) < 1e-6
    result = subprocess.run([*command[:-2], "nope"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stderr.startswith("dpokit: error: me/case split 'nope'"), result.stderr
