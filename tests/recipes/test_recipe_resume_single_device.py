"""The single-device LoRA recipe checkpoints and resumes through the shared step: a run resumed
from its step-3 checkpoint ends bitwise equal to the uninterrupted run (padded and packed), and so
does a `dpokit run` killed with SIGKILL mid-run and started again with resume=true."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit.recipes
from dpokit.config import load_config
from dpokit.recipes.dpo_lora_single_device import main

CONFIG = Path(dpokit.recipes.__file__).parent / "configs" / "dpo_lora_single_device" / "tiny.yaml"
COMMON = ["max_steps=6", "eval_every=100", "checkpoint.every=3", "checkpoint.keep_last=0",
          "lr_scheduler.warmup_steps=1", "batch_size=4", "gradient_accumulation_steps=2"]  # fmt: skip
PACKED = "packing={_component_: dpokit.data.pack_preference_dataset, pack_size: 256, prefix_sharing: true}"


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # wall-clock fields differ between any two runs
    return [{k: v for k, v in r.items() if not k.endswith("_s") and not k.startswith(("tokens_per_s", "mfu", "peak_memory"))}
            for r in rows if r["split"] == "train"]  # fmt: skip


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_resumed_run_equals_the_uninterrupted_one_bitwise(layout, tmp_path):
    extra = [PACKED] if layout == "packed" else []
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(load_config(CONFIG, [*COMMON, *extra, f"output_dir={full}"]))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    main(load_config(CONFIG, [*COMMON, *extra, f"output_dir={resumed}", "resume=true"]))

    assert [r["step"] for r in train_rows(full)] == [1, 2, 3, 4, 5, 6]
    assert train_rows(resumed) == train_rows(full)[3:]  # steps 4-6: same batches, losses, LR, grad norms
    a = load_file(full / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(torch.count_nonzero(v) for k, v in a.items() if "lora_B" in k)  # it trained


@pytest.mark.subprocess
def test_sigkilled_run_resumed_equals_the_uninterrupted_one_bitwise(tmp_path):
    steps = ["max_steps=8", "checkpoint.every=2", "checkpoint.keep_last=0", "eval_every=100",
             "lr_scheduler.warmup_steps=1", "batch_size=4", "device=cpu"]  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    main(load_config(CONFIG, [*steps, f"output_dir={full}"]))

    command = [sys.executable, "-m", "dpokit.cli", "run", "dpo_lora_single_device", "--config", "tiny", *steps]
    child = subprocess.Popen([*command, f"output_dir={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step_00000004").is_dir() and child.poll() is None:
        assert time.monotonic() < deadline, "no step-4 checkpoint after 300 s"
        time.sleep(0.05)
    assert child.poll() is None, child.stderr.read().decode()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (killed / "final").exists()

    result = subprocess.run([*command, f"output_dir={killed}", "resume=true"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "step_0000000" in result.stdout + result.stderr  # it says which checkpoint it resumed from
    # One row per step: rows the killed run logged after its last checkpoint are dropped, not doubled.
    assert [r["step"] for r in train_rows(killed)] == list(range(1, 9))
    assert [r["loss"] for r in train_rows(killed)] == [r["loss"] for r in train_rows(full)]
    a = load_file(full / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
