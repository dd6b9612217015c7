"""Experiment trackers, read back with each tool's own reader: TensorBoard's event accumulator,
MLflow's client over its local file store, and W&B's own protobuf records of an offline run. What
they hold must equal metrics.jsonl, under the names `train/<metric>`, `validation/<metric>` and
`validation/<set>/<metric>`, and each run must be closed with the status the run ended in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpokit.errors import RunInterrupted
from dpokit.training.loggers import MetricLogger
from dpokit.training.metrics import JsonlLogger
from dpokit.training.run import RunReport

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

pytestmark = pytest.mark.subprocess

RUN = [sys.executable, "-m", "dpokit.cli", "run", "dpo_lora_single_device", "--config", "tiny", "device=cpu"]
ALL_LOGGERS = "loggers={tensorboard: {}, mlflow: {experiment: dpo}, wandb: {project: dpo, mode: offline}}"
AGAIN = (
    "validation_datasets={again: {_component_: dpokit.data.bundled_preference_dataset, name: case_following, "
    "split: validation, max_seq_len: 128}}"
)


def jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def expected_series(records: list[dict]) -> dict[str, dict[int, float]]:
    """metrics.jsonl as tracker series: name -> {step: value}."""
    series: dict[str, dict[int, float]] = {}
    for r in records:
        prefix = f"{r['split']}/{r['dataset']}/" if "dataset" in r else f"{r['split']}/"
        for key, value in r.items():
            if key not in ("step", "split", "dataset"):
                series.setdefault(prefix + key, {})[r["step"]] = value
    return series


def tensorboard_series(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def mlflow_run(tracking_dir: Path, experiment: str):
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_dir.resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline W&B run file (`run-<id>.wandb`): W&B's own `Record`
    message, framed as a LevelDB log (32 KiB blocks; 7-byte chunk headers: crc32c, length, type)."""
    from wandb.proto.wandb_internal_pb2 import Record

    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL, LAST
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_series(records) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            step = r.history.step.num
            for key, value in items.items():
                if not key.startswith("_"):
                    series.setdefault(key, {})[step] = value
    return series


def assert_same_series(found: dict, expected: dict, *, rel: float) -> None:
    assert set(found) == set(expected)
    for name, points in expected.items():
        assert found[name].keys() == points.keys(), name
        for step, value in points.items():
            assert found[name][step] == pytest.approx(value, rel=rel, abs=1e-12), (name, step)


def test_every_tracker_holds_what_metrics_jsonl_holds_and_is_closed_finished(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [*RUN, "max_steps=4", "eval_every=2", f"output_dir={out}", ALL_LOGGERS, AGAIN],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    expected = expected_series(jsonl(out))
    assert {"train/loss", "train/mfu", "train/peak_memory_gib", "train/tokens_per_s_per_device"} <= set(expected)
    assert {"validation/acc", "validation/again/acc"} <= set(expected)
    assert sorted(expected["validation/again/acc"]) == [0, 2, 4]

    assert_same_series(tensorboard_series(out / "tensorboard"), expected, rel=1e-6)  # stored as float32

    client, run = mlflow_run(out / "mlruns", "dpo")
    assert run.info.status == "FINISHED"
    found = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} for name in expected}
    assert_same_series(found, expected, rel=1e-12)
    assert run.data.params["optimizer.lr"] == "0.0005" and run.data.params["checkpoint.keep_top_k"] == "0"

    records = wandb_records(out)
    assert_same_series(wandb_series(records), expected, rel=1e-12)
    [config] = [r.config for r in records if r.WhichOneof("record_type") == "config"][:1]
    keys = {item.key for item in config.update}
    assert {"optimizer", "loss", "checkpoint"} <= keys
    [exit_record] = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


def _wait_for(path: Path, text: str, child: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read() if child.stderr else ""
        time.sleep(0.2)


def test_an_interrupted_run_and_a_failed_run_close_their_trackers_with_that_status(tmp_path):
    loggers = "loggers={mlflow: {}, wandb: {mode: offline}, tensorboard: {}}"
    stopped = tmp_path / "stopped"
    child = subprocess.Popen(
        [*RUN, f"output_dir={stopped}", "checkpoint.on_interrupt=false", loggers],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(stopped / "metrics.jsonl", '"train"', child)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    _, run = mlflow_run(stopped / "mlruns", "dpokit")
    assert run.info.status == "KILLED"
    [exit_record] = [r.exit for r in wandb_records(stopped) if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1
    last_step = jsonl(stopped)[-1]["step"]
    assert max(tensorboard_series(stopped / "tensorboard")["train/loss"]) == last_step  # nothing lost

    failed = tmp_path / "failed"
    result = subprocess.run(
        [*RUN, "max_steps=3", f"output_dir={failed}", "loss.beta=.nan", loggers], capture_output=True, text=True
    )
    assert result.returncode == 2 and "non-finite loss" in result.stderr
    _, run = mlflow_run(failed / "mlruns", "dpokit")
    assert run.info.status == "FAILED"
    assert [r.exit.exit_code for r in wandb_records(failed) if r.WhichOneof("record_type") == "exit"] == [1]


def test_a_missing_tracker_package_or_an_unknown_logger_is_one_line(tmp_path):
    result = subprocess.run(
        [*RUN, "max_steps=1", f"output_dir={tmp_path}", "loggers={tensorbored: {}}"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: loggers.tensorbored: unknown logger; choose from ['mlflow', 'tensorboard', 'wandb']"
    )
    not_a_map = subprocess.run(
        [*RUN, "max_steps=1", f"output_dir={tmp_path}", "loggers=5"], capture_output=True, text=True
    )
    assert not_a_map.returncode == 2
    assert not_a_map.stderr.strip().splitlines()[-1] == (
        "error: loggers: expected a mapping of tracker name -> options (e.g. {tensorboard: {}}), got 5"
    )
    code = (
        "import sys; sys.modules['wandb'] = None\n"
        "from dpokit.training.loggers import open_loggers\n"
        "from dpokit.errors import DpokitError\n"
        "try:\n    open_loggers({'wandb': {}}, sys.argv[1])\n"
        "except DpokitError as e:\n    print(e)\n"
    )
    printed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True).stdout
    assert printed.strip() == "loggers.wandb: needs the wandb package (pip install 'dpokit[wandb]')"


class _Failing(MetricLogger):
    name = "flaky"

    def __init__(self, fail_log_at: int | None = None, fail_close: bool = False):
        self.fail_log_at, self.fail_close, self.logged, self.closed = fail_log_at, fail_close, [], None

    def log(self, step, metrics):
        if step == self.fail_log_at:
            raise ConnectionError("server went away")
        self.logged.append(step)

    def close(self, status="finished"):
        self.closed = status
        if self.fail_close:
            raise OSError("cannot flush")


def test_a_tracker_that_fails_mid_run_is_dropped_with_a_warning_and_training_goes_on(tmp_path, capsys):
    report = RunReport(tmp_path, is_main=True)
    flaky, steady = _Failing(fail_log_at=2), _Failing(fail_close=True)
    with report.running(total_steps=3, start_step=0):
        report.loggers = [flaky, steady]
        for step in (1, 2, 3):
            report.validation(step, {"acc": 0.5, "preference_loss": 0.69})
    err = capsys.readouterr().err
    assert "warning: loggers.flaky: stopped logging at step 2: server went away" in err
    assert "warning: loggers.flaky: closing failed: cannot flush" in err
    assert flaky.logged == [1] and flaky.closed == "failed"
    assert steady.logged == [1, 2, 3] and steady.closed == "finished"
    assert [r["step"] for r in JsonlLogger.read(tmp_path / "metrics.jsonl")] == [1, 2, 3]  # nothing lost


def test_a_failing_loop_keeps_its_own_error_when_a_tracker_cannot_close(tmp_path):
    report = RunReport(tmp_path, is_main=True)
    with pytest.raises(RunInterrupted):
        with report.running(total_steps=3, start_step=0):
            report.loggers = [_Failing(fail_close=True)]
            raise RunInterrupted(1, None, "SIGTERM")
    assert report.loggers == []


def test_a_resumed_run_replaces_the_tensorboard_steps_after_its_checkpoint(tmp_path):
    """Resuming from an earlier checkpoint re-logs the steps after it; TensorBoard must show the
    new values once (as metrics.jsonl, which is cut back), not the dead run's."""
    out = tmp_path / "run"
    common = [f"output_dir={out}", "loggers={tensorboard: {}}", "checkpoint.every=2", "checkpoint.keep_last=5"]
    first = subprocess.run([*RUN, "max_steps=4", *common], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    before = {r["step"]: r["loss"] for r in jsonl(out) if r["split"] == "train"}
    # Another beta after step 2 makes the losses of steps 3 and 4 differ from the first run's.
    resumed = subprocess.run(
        [*RUN, "max_steps=4", *common, f"resume={out / 'checkpoints' / 'step_00000002'}", "loss.beta=2.0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    after = {r["step"]: r["loss"] for r in jsonl(out) if r["split"] == "train"}
    assert sorted(after) == [1, 2, 3, 4] and after[4] != pytest.approx(before[4], rel=1e-4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    shown = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in shown] == [1, 2, 3, 4]  # each step once: the dead run's 3 and 4 are gone
    assert dict(shown) == pytest.approx(after, rel=1e-6)
