"""The single-device LoRA recipe checkpoints and resumes through the shared step: a run resumed
from its step-3 checkpoint ends bitwise equal to the uninterrupted run (padded and packed)."""

from __future__ import annotations

import json
import shutil
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
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "tokens_per_s_rank0"}
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
