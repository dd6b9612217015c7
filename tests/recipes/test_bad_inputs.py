"""Bad input and faults through the real entry points (`dpokit run`, `dpokit pack`), one case per
kind: each must end in exactly one line on stderr (the one asserted here), the right exit code,
no traceback, and nothing half-written left behind."""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

DPOKIT = [sys.executable, "-m", "dpokit.cli"]
SINGLE = [*DPOKIT, "run", "dpo_lora_single_device", "--config", "tiny", "max_steps=2", "device=cpu"]
FULL = [*DPOKIT, "run", "dpo_full_distributed", "--config", "tiny", "max_steps=2", "device=cpu"]
TINY_YAML = "recipes/configs/dpo_lora_single_device/tiny.yaml"
PAIR = {"prompt": "Say hi", "chosen": "HI THERE", "rejected": "hi there"}


def run(command: list[str], *, file_size_limit: int | None = None) -> tuple[int, str]:
    """Exit code and the stderr lines that are not progress bars or warnings."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    result = subprocess.run(
        command, capture_output=True, text=True, preexec_fn=limit if file_size_limit else None, timeout=600
    )
    assert "Traceback" not in result.stderr, result.stderr
    lines = [
        line
        for line in result.stderr.replace("\r", "\n").splitlines()
        if line.strip() and not line.startswith(("dpo:", "warning:"))
    ]
    return result.returncode, lines


def write_jsonl(path: Path, records: list, *, extra_lines: list[str] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(f"{line}\n" for line in extra_lines))
    return path


def dataset_override(path: Path) -> str:
    return f"train_dataset={{_component_: dpokit.data.PreferenceDataset, path: '{path}', max_seq_len: 128}}"


@pytest.fixture(scope="module")
def config_path() -> str:
    import dpokit.recipes

    return str(Path(dpokit.recipes.__file__).parent / "configs" / "dpo_lora_single_device" / "tiny.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=0", "batch_size: 0 is not a whole number >= 1"),
        ("eval_every=0", "eval_every: 0 is not a whole number >= 1"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps: 0 is not a whole number >= 1"),
        ("max_steps=0", "max_steps: 0 is not a whole number >= 1"),
        ("max_grad_norm=-1", "max_grad_norm: -1 is not a number > 0"),
        ("+checkpoint.evry=3", "unknown key 'checkpoint.evry' (did you mean 'checkpoint.every'?)"),
        (
            "checkpoint=5",
            "checkpoint: expected a mapping with keys ['dir', 'every', 'higher_is_better', 'keep_last', 'keep_top_k', 'metric', 'on_interrupt'], got 5",
        ),
        ("checkpoint.keep_last=-1", "checkpoint.keep_last: -1 is not a whole number >= 0 (0: keep every checkpoint)"),
    ],
)
def test_config_values_are_checked_before_anything_loads(override, message, config_path, tmp_path):
    code, lines = run([*SINGLE, f"output_dir={tmp_path}", override])
    prefix = "" if override.startswith("checkpoint.keep_last") else f"{config_path}: "
    assert (code, lines) == (2, [f"error: {prefix}{message}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("device=tpu", "device: 'tpu' is not a device dpokit trains on; choose auto, cpu, cuda, cuda:N or mps"),
        (
            "checkpoint_dir=/nonexistent",
            "/nonexistent: no config.json (expected a Hugging Face model directory)",
        ),
        ("activation_offloading=true", "activation_offloading: true needs a CUDA device; this run is on cpu"),
    ],
)
def test_paths_and_devices_are_checked_before_training(override, message, tmp_path):
    code, lines = run([*SINGLE, f"output_dir={tmp_path}", override])
    assert (code, lines) == (2, [f"error: {message}"])
    assert not (tmp_path / "final").exists()


def test_an_output_dir_that_is_a_file_or_cannot_be_created(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert run([*SINGLE, f"output_dir={a_file}"]) == (2, [f"error: output_dir {a_file}: exists and is not a folder"])
    unwritable = Path("/proc/dpokit-test")  # no process, root or not, can create a folder there
    assert run([*SINGLE, f"output_dir={unwritable}"]) == (
        2,
        [f"error: output_dir {unwritable}: cannot write there (No such file or directory)"],
    )


def _data_cases(tmp: Path) -> list[tuple[Path, str]]:
    good = write_jsonl(tmp / "good.jsonl", [PAIR] * 4)
    raw = gzip.compress(good.read_bytes() * 50)
    (tmp / "truncated.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    (tmp / "corrupt.jsonl.gz").write_bytes(raw[:10] + b"\x00garbage" * 8 + raw[74:])
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "a", "rejected": "b"}'
    write_jsonl(tmp / "deep.jsonl", [PAIR], extra_lines=[deep])
    huge = '{"prompt": "x", "chosen": "a", "rejected": "b", "chosen_reward": ' + "9" * 5000 + ', "rejected_reward": 0}'
    write_jsonl(tmp / "huge_int.jsonl", [PAIR], extra_lines=[huge])
    write_jsonl(
        tmp / "surrogate.jsonl", [PAIR], extra_lines=['{"prompt": "x\\ud800y", "chosen": "a", "rejected": "b"}']
    )
    write_jsonl(tmp / "reward_typo.jsonl", [{**PAIR, "chosen_rewrd": 1.0, "rejected_reward": 0.0}] * 4)
    write_jsonl(tmp / "reward_overflow.jsonl", [{**PAIR, "chosen_reward": 1e39, "rejected_reward": 0.0}] * 4)
    return [
        (tmp / "truncated.jsonl.gz", "{p}:1: unreadable after line 0 (the gzip stream ends early: a truncated file)"),
        (tmp / "corrupt.jsonl.gz", "{p}:1: unreadable after line 0 (corrupt gzip data: "),
        (tmp / "deep.jsonl", "{p}:2: invalid JSON (nested too deeply)"),
        (tmp / "huge_int.jsonl", "{p}:2: invalid JSON (Exceeds the limit (4300 digits) for integer string conversion"),
        (tmp / "surrogate.jsonl", "{p}:2: invalid Unicode (a lone surrogate '\\ud800' at character 1 of a string)"),
        (
            tmp / "reward_typo.jsonl",
            "{p}:1: field 'chosen_rewrd' is not one dpokit reads; did you mean 'chosen_reward'?",
        ),
        (
            tmp / "reward_overflow.jsonl",
            "{p}:1: field 'chosen_reward': 1e+39 does not fit in float32 (largest 3.403e+38)",
        ),
    ]


def test_bad_data_files_are_one_line_with_file_and_line_in_training_and_in_pack(tmp_path):
    for path, message in _data_cases(tmp_path):
        expected = message.format(p=path)
        code, lines = run([*SINGLE, f"output_dir={tmp_path / 'out'}", "batch_size=2", dataset_override(path)])
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), (path.name, lines)
        packed = tmp_path / f"{path.name}.packed.jsonl"
        code, lines = run([*DPOKIT, "pack", str(path), str(packed), "--max-seq-len", "64", "--pack-size", "256"])
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"dpokit: error: {expected}"), (path.name, lines)
        assert not packed.exists()


def test_a_reward_aware_loss_refuses_data_without_rewards(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIR] * 4)
    loss = "loss={_component_: dpokit.losses.get_loss, name: rpo_sq, beta: 0.1}"
    code, lines = run([*SINGLE, f"output_dir={tmp_path / 'out'}", "batch_size=2", dataset_override(data), loss])
    assert (code, lines) == (
        2,
        [
            "error: loss: reads ground-truth rewards (chosen_reward / rejected_reward), but no pair of train_dataset "
            "carries them; it would train on its default rewards. Add them to the data or choose a loss without rewards"
        ],
    )


def test_pack_refuses_non_positive_lengths(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIR] * 4)
    code, lines = run([*DPOKIT, "pack", str(data), str(tmp_path / "p.jsonl"), "--max-seq-len", "0", "--pack-size", "8"])
    assert code == 2 and lines[-1].endswith("argument --max-seq-len: expected a positive integer, got '0'")


def test_a_full_disk_leaves_no_partial_file_or_checkpoint(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIR] * 400)
    packed = tmp_path / "packed.jsonl"
    code, lines = run(
        [*DPOKIT, "pack", str(data), str(packed), "--max-seq-len", "64", "--pack-size", "256"], file_size_limit=4096
    )
    assert (code, lines) == (2, [f"dpokit: error: cannot write the packed dataset to {packed}: File too large"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]

    out = tmp_path / "run"
    code, lines = run([*SINGLE, f"output_dir={out}", "checkpoint.every=1"], file_size_limit=30_000)
    tmp = out / "checkpoints" / ".tmp-step_00000001"
    assert (code, lines) == (2, [f"error: cannot write the step-1 checkpoint to {tmp}: File too large"])
    assert list((out / "checkpoints").iterdir()) == [] and not (out / "final").exists()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A finished one-process dpo_full_distributed run with a step-2 checkpoint and final/."""
    out = tmp_path_factory.mktemp("full_run")
    assert subprocess.run([*FULL, "checkpoint.every=2", f"output_dir={out}"], capture_output=True).returncode == 0
    return out


def _resume_copy(full_run: Path, where: Path) -> Path:
    shutil.copytree(full_run / "checkpoints", where / "checkpoints")
    return where / "checkpoints" / "step_00000002"


def test_corrupt_weights_and_checkpoints_are_one_line_naming_the_file(full_run, tmp_path):
    truncated = tmp_path / "truncated_hf"
    shutil.copytree(full_run / "final", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, lines = run([*FULL, f"checkpoint_dir={truncated}", f"output_dir={tmp_path / 'a'}"])
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {weights}: not a readable safetensors file (Error while deserializing header")
    assert lines[0].endswith("); it may be truncated or corrupt")
    random_bytes = tmp_path / "random_hf"
    shutil.copytree(full_run / "final", random_bytes)
    (random_bytes / "model.safetensors").write_bytes(os.urandom(4096))
    code, lines = run([*FULL, f"checkpoint_dir={random_bytes}", f"output_dir={tmp_path / 'b'}"])
    assert code == 2 and lines[0].startswith(f"error: {random_bytes / 'model.safetensors'}: not a readable safetensors")

    step = _resume_copy(full_run, tmp_path / "missing_shard")
    shard = next(step.glob("*.distcp"))
    shard.unlink()
    code, lines = run(
        [*FULL, "checkpoint.every=2", "max_steps=4", f"output_dir={tmp_path / 'missing_shard'}", "resume=true"]
    )
    assert (code, lines) == (
        2,
        [f"error: resume: cannot load {step} ({shard}: missing); resume from another checkpoint or start fresh"],
    )

    step = _resume_copy(full_run, tmp_path / "truncated_state")
    state = step / "rank0.pt"
    state.write_bytes(state.read_bytes()[:100])
    code, lines = run(
        [*FULL, "checkpoint.every=2", "max_steps=4", f"output_dir={tmp_path / 'truncated_state'}", "resume=true"]
    )
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: resume: cannot read {state} (")

    step = _resume_copy(full_run, tmp_path / "other_kind")
    code, lines = run([*SINGLE, f"output_dir={tmp_path / 'other_kind'}", "resume=true"])
    assert (code, lines) == (
        2,
        [
            f"error: resume: {step} holds the whole model, this recipe resumes the trainable (adapter) weights only; "
            "resume it with the recipe that wrote it (its config.yaml is in the run's output_dir)"
        ],
    )
