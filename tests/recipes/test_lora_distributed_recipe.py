"""dpo_lora_distributed end to end on 2 CPU processes: the final folder layout a user loads."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from dpokit.models import lora_tiny, tiny


@pytest.mark.multiprocess
@pytest.mark.subprocess
def test_two_process_lora_run_writes_merged_model_and_separate_adapter(tmp_path):
    result = subprocess.run(
        [
            "dpokit",
            "run",
            "dpo_lora_distributed",
            "--config",
            "tiny",
            "--nproc_per_node",
            "2",
            "max_steps=2",
            "eval_every=100",
            f"output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "final"
    # Not next to config.json: transformers would apply the adapter again on top of merged weights.
    assert not (final / "adapter_config.json").exists()
    merged = load_file(final / "model.safetensors")
    base = tiny()
    base.load_state_dict({k.removeprefix("model."): v for k, v in merged.items()})
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    # An A and a B matrix for every adapted projection, and training moved B off zero.
    lora = lora_tiny(lora_targets=config["target_modules"], lora_rank=config["r"], lora_alpha=config["lora_alpha"])
    assert len(adapter) == 2 * sum(
        1 for name, _ in lora.named_modules() if name.endswith(tuple(config["target_modules"]))
    )
    assert any(torch.count_nonzero(v) for k, v in adapter.items() if "lora_B" in k)
