"""QLoRA end to end: `dpokit run dpo_lora_single_device --config tiny_qlora` (NF4 base dequantised to
bf16, fp32 adapters) learns, and its final checkpoint reproduces what the run measured.

The check of the checkpoint is independent of the recipe's code path: the merged HF weights are the
policy, the merged weights minus the PEFT adapter's (alpha / r) B A are the reference (the NF4 base),
and the validation reward margin computed from both in float64 must equal the one the run logged.
"""

import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from dpokit.data import bundled_preference_dataset, byte_tokenizer, collate_preference_pairs
from dpokit.logprobs import token_logps
from dpokit.models import cast_base, load_peft_adapter, lora_tiny, tiny
from dpokit.models.lora import is_nf4

STEPS = 20
BETA = 0.1  # the config's loss.beta


def read_metrics(output_dir):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "validation"]


def checkpoint_policy_and_reference(final):
    """float64 models from the final folder: merged weights (policy) and merged - adapter (reference)."""
    merged = {k.removeprefix("model."): v for k, v in load_file(final / "model.safetensors").items()}
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    base = {k: v.double() for k, v in merged.items()}
    for key, lora_a in adapter.items():
        if ".lora_A." in key:
            lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.model.").replace(".lora_A.weight", ".weight")
            base[name] -= scaling * lora_b.double() @ lora_a.double()
    policy, reference = tiny().double(), tiny().double()
    policy.load_state_dict({k: v.double() for k, v in merged.items()})  # strict: every key fits
    reference.load_state_dict(base)
    return policy, reference


@pytest.mark.subprocess
def test_qlora_recipe_learns_and_its_checkpoint_reproduces_the_run(tmp_path):
    result = subprocess.run(
        [
            "dpokit",
            "run",
            "dpo_lora_single_device",
            "--config",
            "tiny_qlora",
            f"output_dir={tmp_path}",
            f"max_steps={STEPS}",
            f"eval_every={STEPS}",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable (float32), " in result.stdout and " in NF4" in result.stdout  # the base stayed 4-bit
    train, validation = read_metrics(tmp_path)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train)
    assert validation[0]["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    final_validation = validation[-1]
    assert final_validation["step"] == STEPS and final_validation["preference_loss"] < math.log(2) - 0.003
    first, last = train[:5], train[-5:]
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)

    final = tmp_path / "final"
    # merged in fp32 and saved in fp32 (save_dtype), so no update is rounded away
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "float32"
    assert all(v.dtype == torch.float32 for v in load_file(final / "model.safetensors").values())
    assert "merged model (float32)" in result.stdout
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in adapter.values())  # trained and saved in fp32
    qlora = cast_base(
        lora_tiny(lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"], quantize_base=True), torch.bfloat16
    )
    load_peft_adapter(qlora, final / "adapter")  # strict: rank, alpha, targets and every key
    assert is_nf4(qlora.layers[0].mlp.gate_proj.weight)

    policy, reference = checkpoint_policy_and_reference(final)
    tokenizer = byte_tokenizer()
    dataset = bundled_preference_dataset("case_following", "validation", tokenizer, max_seq_len=128)
    batch = collate_preference_pairs([dataset[i] for i in range(len(dataset))], pad_id=tokenizer.pad_id)
    pairs = batch.num_pairs
    with torch.no_grad():
        pi = token_logps(policy(batch.input_ids), batch.labels).sum(-1)
        ref = token_logps(reference(batch.input_ids), batch.labels).sum(-1)
    margin = (BETA * ((pi[:pairs] - ref[:pairs]) - (pi[pairs:] - ref[pairs:]))).mean().item()
    # The run computed in bf16: a few percent of noise.
    assert final_validation["reward_margin"] > 0.005
    assert margin == pytest.approx(final_validation["reward_margin"], rel=0.1)
    assert pi[:pairs].mean().item() == pytest.approx(final_validation["logps_chosen"], abs=0.05)
