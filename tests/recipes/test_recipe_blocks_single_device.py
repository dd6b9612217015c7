"""The single-device recipe's activation checkpointing and block compilation change how the step is
computed, not what it computes: the same run with either switch on logs the losses, gradient norms
and adapters of the run with both off (bitwise for recomputation; fp32 rounding for compile)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit.recipes
from dpokit.config import load_config
from dpokit.recipes.dpo_lora_single_device import main

CONFIG = Path(dpokit.recipes.__file__).parent / "configs" / "dpo_lora_single_device" / "tiny.yaml"
COMMON = ["max_steps=3", "eval_every=100", "lr_scheduler.warmup_steps=1", "batch_size=4", "device=cpu"]


def run(out: Path, *overrides: str) -> tuple[list[dict], dict]:
    main(load_config(CONFIG, [*COMMON, f"output_dir={out}", *overrides]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [{k: r[k] for k in ("step", "preference_loss", "grad_norm", "lr")} for r in rows if r["split"] == "train"]
    return train, load_file(out / "final" / "adapter" / "adapter_model.safetensors")


def test_activation_checkpointing_gives_the_same_run_bitwise(tmp_path):
    plain_rows, plain = run(tmp_path / "plain")
    rows, adapters = run(tmp_path / "ac", "activation_checkpointing=true")
    assert rows == plain_rows and len(rows) == 3
    assert all(torch.equal(adapters[k], plain[k]) for k in plain)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_run_within_fp32_rounding(tmp_path):
    plain_rows, plain = run(tmp_path / "plain")
    rows, adapters = run(tmp_path / "compiled", "compile=true", "activation_checkpointing=true")
    for a, b in zip(rows, plain_rows):
        assert a["step"] == b["step"] and a["lr"] == b["lr"]
        assert a["preference_loss"] == pytest.approx(b["preference_loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for k in plain:
        torch.testing.assert_close(adapters[k], plain[k], atol=1e-5, rtol=1e-4)
