"""Completions of fixed prompts at each validation: in metrics.jsonl and the trackers, the policy's
equal to decoding the exported model, the reference's to decoding the untrained one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpokit.data import byte_tokenizer
from dpokit.generation import generate
from dpokit.models.hf_checkpoint import load_hf_checkpoint

pytestmark = pytest.mark.subprocess

PROMPTS = ["Write in UPPER case: Quiet Harbor", "Write in lower case: Golden Meadow"]
SAMPLES = f"samples={{prompts: {json.dumps(PROMPTS)}, max_new_tokens: 12}}"


def dpokit_run(*args, nproc=1):
    command = [sys.executable, "-m", "dpokit.cli", "run", *args, "device=cpu", "--nproc_per_node", str(nproc)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def sample_records(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["samples"] for r in records if r["split"] == "samples"}


def decoded(model, prompts):
    tokenizer = byte_tokenizer()
    ids = [tokenizer.encode_prompt([{"role": "user", "content": p}]) for p in prompts]
    outs = generate(model, ids, max_new_tokens=12, stop_ids=[tokenizer.eot_id])
    return [tokenizer.decode([t for t in out if t != tokenizer.eot_id]) for out in outs]


def test_lora_samples_are_the_exported_policy_and_the_base(tmp_path):
    out = tmp_path / "run"
    result = dpokit_run(
        "dpo_lora_single_device", "--config", "tiny", f"output_dir={out}", "max_steps=6", "eval_every=3",
        SAMPLES, "loggers={tensorboard: {}}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = sample_records(out)
    assert sorted(samples) == [0, 3, 6]  # validate_at_start, every 3 steps
    assert [row["prompt"] for row in samples[6]] == PROMPTS
    # The reference never changes (adapters off); at step 0 the policy is the reference.
    assert all(samples[s][i]["reference"] == samples[0][i]["reference"] for s in samples for i in range(2))
    assert [r["policy"] for r in samples[0]] == [r["reference"] for r in samples[0]]
    final = load_hf_checkpoint(out / "final")  # adapters merged
    assert [r["policy"] for r in samples[6]] == decoded(final, PROMPTS)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")}
    assert sorted(texts) == [0, 3, 6] and PROMPTS[0] in texts[6]


@pytest.mark.parametrize("nproc", [1, 2])
def test_full_distributed_samples_are_the_exported_policy_and_the_initial_one(tmp_path, nproc):
    """Under FSDP2 every rank decodes (the forwards are collective), rank 0 logs. The tiny model's
    greedy choices are near ties, so one and two ranks (equal within fp32 rounding, not bitwise)
    may pick different tokens: each run is checked against its own export."""
    out = tmp_path / "run"
    result = dpokit_run(
        "dpo_full_distributed", "--config", "tiny", f"output_dir={out}", "max_steps=4", "eval_every=2",
        SAMPLES, nproc=nproc,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = sample_records(out)
    assert sorted(samples) == [0, 2, 4]
    assert [r["policy"] for r in samples[4]] == decoded(load_hf_checkpoint(out / "final"), PROMPTS)
    # The swap reference decodes with the initial weights: the step-0 policy's text.
    assert [r["reference"] for r in samples[4]] == [r["policy"] for r in samples[0]]


@pytest.mark.parametrize(
    "override, message",
    [
        ("samples={prompts: []}", "samples.prompts: expected a non-empty list"),
        ("samples={prompts: [hi], max_new_tokens: 0}", "samples.max_new_tokens: expected a positive integer"),
        ("samples={prompts: [hi], top_p: 0}", "samples: top_p must be in (0, 1]"),
        ("samples={prompts: [hi], temprature: 1}", "unknown key 'samples.temprature' (did you mean 'temperature'?)"),
        ("samples={prompts: hello}", "samples.prompts: expected a non-empty list"),
        ("samples={prompts: [[{content: hi}]]}", "samples.prompts[0]: expected a string or a list of {role, content}"),
        ("samples={prompts: [[{role: tool, content: hi}]]}", "samples.prompts[0]: "),
    ],
)
def test_bad_samples_settings_are_one_line(tmp_path, override, message):
    result = dpokit_run("dpo_lora_single_device", "--config", "tiny", f"output_dir={tmp_path}", override)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_samples_under_fsdp_mixed_precision(tmp_path):
    """fsdp.param_dtype=bf16 (every real full config): the all-gathered weights compute in bf16
    while the shards stay fp32; decoding must follow the compute dtype."""
    out = tmp_path / "run"
    result = dpokit_run(
        "dpo_full_distributed", "--config", "tiny", f"output_dir={out}", "max_steps=2", "eval_every=2",
        "fsdp.param_dtype=bf16", SAMPLES, nproc=2,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(sample_records(out)) == [0, 2]
