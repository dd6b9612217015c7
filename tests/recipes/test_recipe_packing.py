"""The LoRA recipe on packed (and prefix-shared) data: online packing and a `dpokit pack` file."""

import json
import math
import subprocess

import pytest

from dpokit.data import PreferenceDataError, bundled_task_path, byte_tokenizer, load_packed_dataset

RUN = ["dpokit", "run", "dpo_lora_single_device", "--config", "tiny", "max_steps=2", "eval_every=100", "batch_size=4"]


def train_records(output_dir):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"]


def check_run(result, output_dir):
    assert result.returncode == 0, result.stderr[-3000:]
    assert "packing: " in result.stdout and "pairs per pack" in result.stdout
    first, second = train_records(output_dir)
    # Step 1 runs before any update: policy == reference, so every pair's loss is ln 2 exactly.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["acc"] == 0.5
    assert math.isfinite(second["loss"]) and second["grad_norm"] > 0


@pytest.mark.subprocess
def test_online_packing_with_prefix_sharing(tmp_path):
    packing = "packing={_component_: dpokit.data.pack_preference_dataset, pack_size: 256, prefix_sharing: true}"
    result = subprocess.run([*RUN, f"output_dir={tmp_path}", packing], capture_output=True, text=True)
    check_run(result, tmp_path)


@pytest.mark.subprocess
def test_offline_pack_file_is_read_by_the_recipe(tmp_path):
    packed = tmp_path / "packed.jsonl"
    made = subprocess.run(
        [
            "dpokit",
            "pack",
            str(bundled_task_path("case_following", "train")),
            str(packed),
            "--max-seq-len",
            "128",
            "--pack-size",
            "256",
        ],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    overrides = [
        "train_dataset._component_=dpokit.data.load_packed_dataset",
        f"+train_dataset.path={packed}",
        "~train_dataset.name",
        "~train_dataset.split",
        "~train_dataset.max_seq_len",
    ]
    result = subprocess.run([*RUN, f"output_dir={tmp_path / 'out'}", *overrides], capture_output=True, text=True)
    check_run(result, tmp_path / "out")


def test_packed_file_from_another_tokenizer_is_refused(tmp_path):
    packed = tmp_path / "p.jsonl"
    packed.write_text(
        json.dumps({"pairs": [{"prompt_ids": [1, 2], "chosen_ids": [3, 5000], "rejected_ids": [4]}]}) + "\n"
    )
    (tmp_path / "p.jsonl.stats.json").write_text(json.dumps({"pack_size": 64, "prefix_sharing": False}))
    assert len(load_packed_dataset(packed)) == 1
    with pytest.raises(PreferenceDataError, match=r"p.jsonl:1: field 'chosen_ids': token id 5000 is outside"):
        load_packed_dataset(packed, tokenizer=byte_tokenizer())
