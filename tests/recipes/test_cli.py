"""End-to-end: the `dpokit` command and the LoRA DPO recipe, run as a user runs them."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dpokit.models import tiny

RUN = ["dpokit", "run", "dpo_lora_single_device", "--config", "tiny"]


def dpokit(*args, cwd=None):
    return subprocess.run(["dpokit", *args], capture_output=True, text=True, cwd=cwd)


def read_metrics(output_dir):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    validation = [r for r in records if r["split"] == "validation"]
    return train, validation


def run_recipe(*overrides, cwd=None):
    result = subprocess.run([*RUN, *overrides], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.subprocess
def test_demo_learns_the_bundled_task_and_writes_metrics_and_checkpoint(tmp_path):
    """The README's command 1, in full: validation accuracy starts at chance and ends >= 0.9."""
    out = tmp_path / "run"
    result = run_recipe(f"output_dir={out}")
    assert f"output directory: {out}" in result.stdout
    train, validation = read_metrics(out)
    assert validation[0]["step"] == 0 and validation[0]["acc"] == 0.5  # policy == reference
    assert validation[-1]["acc"] >= 0.9
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    for name in (
        "loss",
        "preference_loss",
        "acc",
        "rewards_chosen_mean",
        "rewards_rejected_mean",
        "reward_margin",
        "logps_chosen",
        "logps_rejected",
        "lr",
        "grad_norm",
        "tokens_per_s",  # the names every recipe logs (the shared RunReport)
        "tokens_per_s_per_device",
        "peak_memory_gib",
        "mfu",
        "step_s",
        "policy_s",
        "reference_s",
    ):
        assert name in train[-1], name
    assert train[-1]["loss"] < train[0]["loss"]

    final = out / "final"
    merged = load_file(final / "model.safetensors")
    base = tiny()
    base.load_state_dict({k.removeprefix("model."): v for k, v in merged.items()})  # strict: every key fits
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert adapter and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in adapter)
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert any(torch.count_nonzero(v) for k, v in adapter.items() if "lora_B" in k)  # it trained


@pytest.mark.subprocess
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """16 pairs as one micro-batch == 4 micro-batches of 4: the loss is a mean over the step's pairs."""
    common = ["max_steps=3", "eval_every=100", "validation_dataset.split=validation"]
    run_recipe(f"output_dir={tmp_path / 'a'}", "batch_size=16", "gradient_accumulation_steps=1", *common)
    run_recipe(f"output_dir={tmp_path / 'b'}", "batch_size=4", "gradient_accumulation_steps=4", *common)
    a, _ = read_metrics(tmp_path / "a")
    b, _ = read_metrics(tmp_path / "b")
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "acc", "reward_margin", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)


@pytest.mark.subprocess
def test_cp_then_run_the_copies(tmp_path):
    assert dpokit("cp", "dpo_lora_single_device", str(tmp_path / "my_dpo.py")).returncode == 0
    assert dpokit("cp", "dpo_lora_single_device/tiny", str(tmp_path)).returncode == 0
    assert (tmp_path / "tiny.yaml").is_file()
    again = dpokit("cp", "dpo_lora_single_device", str(tmp_path / "my_dpo.py"))
    assert again.returncode == 2 and "exists" in again.stderr
    result = subprocess.run(
        ["dpokit", "run", "./my_dpo.py", "--config", "./tiny.yaml", "max_steps=2", "eval_every=1", "output_dir=out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    train, validation = read_metrics(tmp_path / "out")
    assert len(train) == 2 and len(validation) == 3
    assert (tmp_path / "out" / "final" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.subprocess
def test_ls_and_cat():
    listing = dpokit("ls")
    assert listing.returncode == 0 and "dpo_lora_single_device/tiny" in listing.stdout
    cat = dpokit("cat", "dpo_lora_single_device/tiny")
    assert cat.returncode == 0 and "_component_: dpokit.models.lora_tiny" in cat.stdout


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "dpo_lora_singel", "--config", "tiny"], "unknown recipe 'dpo_lora_singel' (did you mean"),
        (["run", "dpo_lora_single_device", "--config", "tinny"], "no config 'tinny'"),
        (["run", "dpo_lora_single_device", "--config", "tiny", "batch_sise=4"], "no key 'batch_sise'"),
        (["run", "dpo_lora_single_device", "--config", "tiny", "model.lora_rank=0"], "LoRA rank must be positive"),
        (["run", "dpo_lora_single_device", "--config", "tiny", "train_dataset.name=nope"], "no bundled task"),
        (["run", "dpo_lora_single_device", "--config", "tiny", "save_dtype=fp64"], "save_dtype: unknown dtype 'fp64'"),
        (["run", "dpo_lora_single_device", "--config", "tiny", "checkpoint.keep_last=-1"], "checkpoint.keep_last: -1"),
        (["cat", "dpo_lora_single_device/nope"], "no config 'nope'"),
    ],
)
def test_mistakes_are_one_line_errors(args, message, tmp_path):
    result = dpokit(*args, cwd=tmp_path)  # anything a run writes stays in tmp_path
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "dpokit: error:"))]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("metrics.jsonl"))  # refused before any training


@pytest.mark.subprocess
def test_help_everywhere():
    for args in ([], ["run"], ["ls"], ["cp"], ["cat"]):
        result = dpokit(*args, "--help")
        assert result.returncode == 0 and "usage: dpokit" in result.stdout


@pytest.mark.subprocess
def test_recipe_help_runs_without_a_config():
    from dpokit.cli import resolve_recipe

    result = subprocess.run(
        [sys.executable, str(resolve_recipe("dpo_lora_single_device")), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--config" in result.stdout
