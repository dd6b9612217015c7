"""`ld_alpha` (LD-DPO) in the single-device LoRA recipe.

The recipe runs in-process on four pairs (one step = the whole set) with a model whose adapters are
already nonzero, so the policy differs from the reference at step 1. Its logged loss is checked
against the same loss computed here in float64 from full logits with `length_desensitized_logps`.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch

import dpokit.recipes
from dpokit.config import check_keys, load_config
from dpokit.data import byte_tokenizer, collate_preference_pairs
from dpokit.data.preference import PreferenceDataset
from dpokit.errors import DpokitError
from dpokit.logprobs import length_desensitized_logps, token_logps
from dpokit.losses import dpo_loss
from dpokit.models import adapter_params, disable_adapter, lora_tiny
from dpokit.recipes.dpo_lora_single_device import CONFIG_KEYS, main

CONFIG = Path(dpokit.recipes.__file__).parent / "configs" / "dpo_lora_single_device" / "tiny.yaml"
BETA = 0.1
# Responses of different lengths, so that LD-DPO's down-weighting of the longer one's tail matters.
PAIRS = [
    {"prompt": "Say hi.", "chosen": "HI THERE, FRIEND", "rejected": "hi"},
    {"prompt": "Name a colour.", "chosen": "RED", "rejected": "red is a colour, and so is blue"},
    {"prompt": "Count to three.", "chosen": "ONE TWO THREE", "rejected": "one, two, three, four, five"},
    {"prompt": "Greet me.", "chosen": "GOOD MORNING TO YOU AND YOURS", "rejected": "morning"},
]


def lora_tiny_with_random_adapters():
    """The tiny LoRA model with nonzero adapters, identical on every call."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = lora_tiny()
        with torch.no_grad():
            for p in adapter_params(model).values():
                p.normal_(0, 0.1)
    return model


def write_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    return path


def run_recipe(tmp_path, ld_alpha):
    """One step over all four pairs; returns (train record of step 1, validation record of step 0)."""
    data = write_pairs(tmp_path)
    out = tmp_path / f"run_{ld_alpha}"
    cfg = load_config(
        CONFIG,
        [
            f"output_dir={out}",
            "batch_size=4",
            "eval_batch_size=4",
            "eval_every=100",
            "max_steps=1",
            "dtype=fp32",
            "device=cpu",
            f"ld_alpha={'null' if ld_alpha is None else ld_alpha}",
        ],
    )
    cfg.model = {"_component_": f"{__name__}.lora_tiny_with_random_adapters"}
    for split in ("train_dataset", "validation_dataset"):
        cfg[split] = {"_component_": "dpokit.data.PreferenceDataset", "path": str(data), "max_seq_len": 128}
    check_keys(cfg, CONFIG_KEYS)
    main(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    validation = [r for r in records if r["split"] == "validation"]
    return train[0], validation[0]


def direct_loss(tmp_path, ld_alpha):
    """The DPO loss of the untrained model on all pairs, in float64 from materialised logits."""
    tokenizer = byte_tokenizer()
    dataset = PreferenceDataset(write_pairs(tmp_path), tokenizer, max_seq_len=128)
    batch = collate_preference_pairs([dataset[i] for i in range(len(dataset))], pad_id=tokenizer.pad_id)
    model = lora_tiny_with_random_adapters().double()
    labels, pairs = batch.labels, batch.num_pairs

    def sequence_logps():
        per_token = token_logps(model(batch.input_ids), labels)
        if ld_alpha is None:
            return per_token.sum(-1)
        return length_desensitized_logps(per_token, labels, pairs, ld_alpha=ld_alpha)

    with torch.no_grad():
        policy = sequence_logps()
        with disable_adapter(model):
            reference = sequence_logps()
    out = dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], beta=BETA)
    return out.losses.mean().item()


def test_ld_alpha_step_loss_equals_length_desensitized_computation(tmp_path):
    plain_train, plain_validation = run_recipe(tmp_path, None)
    ld_train, ld_validation = run_recipe(tmp_path, 0.3)
    expected_plain, expected_ld = direct_loss(tmp_path, None), direct_loss(tmp_path, 0.3)
    assert abs(expected_ld - expected_plain) > 0.005  # LD-DPO changes this loss far beyond the tolerance
    assert ld_train["loss"] == pytest.approx(expected_ld, rel=1e-4)
    assert plain_train["loss"] == pytest.approx(expected_plain, rel=1e-4)
    # validation uses the same log-probs as training (at step 0 the model is the untrained one)
    assert ld_validation["step"] == 0 and ld_validation["preference_loss"] == pytest.approx(expected_ld, rel=1e-4)
    assert plain_validation["preference_loss"] == pytest.approx(expected_plain, rel=1e-4)


@pytest.mark.subprocess
def test_packing_with_ld_alpha_is_a_one_line_config_error(tmp_path):
    small_train_set = [
        "train_dataset._component_=dpokit.data.PreferenceDataset",
        f"+train_dataset.path={write_pairs(tmp_path)}",
        "~train_dataset.name",
        "~train_dataset.split",
    ]
    packing = "packing={_component_: dpokit.data.pack_preference_dataset, pack_size: 256}"
    result = subprocess.run(
        [
            "dpokit",
            "run",
            "dpo_lora_single_device",
            "--config",
            "tiny",
            f"output_dir={tmp_path}",
            *small_train_set,
            "ld_alpha=0.5",
            packing,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "error: ld_alpha is set but the training data is packed" in lines[0]


@pytest.mark.parametrize("value", [1.5, -0.1, "'0.5'"])
def test_ld_alpha_outside_0_1_is_refused(tmp_path, value):
    with pytest.raises(DpokitError, match=r"ld_alpha: .* is not a number in \[0, 1\]"):
        run_recipe(tmp_path, value)
