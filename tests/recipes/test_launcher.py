"""`dpokit run` owns its workers: one line for the failing ranks and their exit code, no launcher
traceback, Ctrl-C / SIGTERM stop every rank at one step with a checkpoint, nothing outlives a
killed launcher, one live run per output folder, and two launchers on loopback (a simulated
two-node run) train like one launcher with two processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.launch import LOST_PEER, Outcome, summarize

DPOKIT = [sys.executable, "-m", "dpokit.cli", "run"]
FULL = [*DPOKIT, "dpo_full_distributed", "--config", "tiny"]
SHORT = ["max_steps=4", "eval_every=100", "lr_scheduler.warmup_steps=1", "device=cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_train_row(out: Path, child: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "no train step logged"
        time.sleep(0.1)


def _workers_of(out: Path) -> list[int]:
    """Live processes whose command line names `out` (the workers carry it as an override)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                state = (proc / "stat").read_text().split(") ")[-1][0]
            except OSError:
                continue
            if f"output_dir={out}" in cmdline and "dpokit.cli" not in cmdline and state != "Z":
                pids.append(int(proc.name))
    return pids


def test_summary_is_one_line_when_the_ranks_agree_and_names_the_causes_when_not():
    same = [
        Outcome(0, 2, "data.jsonl:3: missing field 'chosen'"),
        Outcome(1, 2, "data.jsonl:3: missing field 'chosen'"),
    ]
    assert summarize(same) == (2, ["data.jsonl:3: missing field 'chosen' [every rank]"])
    one = [Outcome(0, 0, None), Outcome(1, 2, "boom"), Outcome(2, 1, "lost contact", LOST_PEER)]
    assert summarize(one) == (2, ["boom [rank 1]", "(1 other rank(s) stopped because of it)"])
    differ = [Outcome(0, 2, "a"), Outcome(1, -9, None)]
    assert summarize(differ) == (2, ["rank 0: a", "rank 1: killed by SIGKILL (out of memory?)"])
    assert summarize([Outcome(0, 0, None), Outcome(1, 0, None)]) == (0, [])
    assert summarize([Outcome(0, 130, "stopped at step 3 (SIGINT); no checkpoint")]) == (
        130,
        ["stopped at step 3 (SIGINT); no checkpoint"],
    )


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "options, message",
    [
        (["--nproc_per_node", "0"], "dpokit: error: --nproc_per_node 0: must be at least 1"),
        (["--nproc_per_node", "abc"], "dpokit: error: --nproc_per_node abc: not a whole number"),
        (["--nnodes", "1:2", "--nproc_per_node", "1"], "dpokit: error: --nnodes 1:2: elastic MIN:MAX node counts"),
        (["--nnodes", "2", "--nproc_per_node", "1"], "dpokit: error: --nnodes > 1 needs --rdzv_endpoint HOST:PORT"),
        (
            ["--nnodes", "2", "--node_rank", "2", "--nproc_per_node", "1", "--rdzv_endpoint", "h:1"],
            "dpokit: error: --node_rank 2: must be below --nnodes 2",
        ),
        (
            ["--nproc_per_node", "1", "--rdzv_endpoint", "nohost"],
            "dpokit: error: --rdzv_endpoint nohost: expected HOST:PORT",
        ),
    ],
)
def test_bad_launch_options_are_one_line_and_exit_2(options, message, tmp_path):
    result = subprocess.run([*FULL, *options, f"output_dir={tmp_path}"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_an_error_on_two_ranks_is_one_line_and_the_workers_exit_code(tmp_path):
    result = subprocess.run(
        [*FULL, "--nproc_per_node", "2", *SHORT, f"output_dir={tmp_path}", "loss.beta=.nan"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "error: step 1: non-finite loss (nan) or gradient norm (nan); stopped before the optimizer step. "
        "Last good checkpoint: none [every rank]"
    ]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_sigint_stops_both_ranks_at_one_step_with_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    command = [*FULL, "--nproc_per_node", "2", "checkpoint.every=1000", f"output_dir={out}"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_train_row(out, child)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    step = int(line.split("stopped at step ")[1].split(" ")[0])
    checkpoint = out / "checkpoints" / f"step_{step:08d}"
    assert line == (
        f"error: stopped at step {step} (SIGINT); latest checkpoint {checkpoint}; resume with: dpokit run "
        f"dpo_full_distributed --config tiny --nproc_per_node 2 checkpoint.every=1000 output_dir={out} "
        f"resume=true [every rank]"
    )
    assert checkpoint.is_dir() and "Traceback" not in stderr
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())][-1] == step
    assert not _workers_of(out)


@pytest.mark.subprocess
@pytest.mark.parametrize("on_interrupt", [True, False])
def test_sigterm_stops_one_device_at_a_step_boundary_and_saves_only_when_asked(tmp_path, on_interrupt):
    out = tmp_path / "run"
    command = [*DPOKIT, "dpo_lora_single_device", "--config", "tiny", "device=cpu", "checkpoint.every=1000"]
    command += [f"checkpoint.on_interrupt={str(on_interrupt).lower()}", f"output_dir={out}"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_train_row(out, child)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    step = int(line.split("stopped at step ")[1].split(" ")[0])
    checkpoint = out / "checkpoints" / f"step_{step:08d}"
    if on_interrupt:
        hint = " ".join(command[3:])  # from "run" on
        assert (
            line
            == f"error: stopped at step {step} (SIGTERM); latest checkpoint {checkpoint}; resume with: dpokit {hint} resume=true"
        )
        assert (checkpoint / ".complete").is_file()
    else:
        assert line == f"error: stopped at step {step} (SIGTERM); no checkpoint"
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())][-1] == step
    assert "Traceback" not in stderr and not (out / "final").exists()


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_no_worker_outlives_a_sigkilled_launcher_and_the_folder_is_locked_while_one_runs(tmp_path):
    out = tmp_path / "run"
    child = subprocess.Popen(
        [*FULL, "--nproc_per_node", "2", f"output_dir={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _wait_for_train_row(out, child)
    assert len(_workers_of(out)) == 2

    second = subprocess.run([*FULL, "--nproc_per_node", "2", f"output_dir={out}"], capture_output=True, text=True)
    assert second.returncode == 2
    assert second.stderr.splitlines()[-1].startswith(f"error: output_dir {out} is in use by another run (pid ")

    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 10
    while _workers_of(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _workers_of(out)


def _node(rank: int, port: int, out: Path, *extra: str) -> subprocess.Popen:
    options = [
        "--nnodes",
        "2",
        "--node_rank",
        str(rank),
        "--nproc_per_node",
        "1",
        "--rdzv_endpoint",
        f"127.0.0.1:{port}",
    ]
    return subprocess.Popen(
        [*FULL, *options, *extra, f"output_dir={out}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD,
    )


# CPU kernels round differently with another thread count: every rank of the runs compared bitwise
# gets one thread (as `dpokit run --nproc_per_node 2` gives each worker on this 2-core machine; two
# "nodes" on one machine would otherwise each take every core).
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_two_nodes_on_loopback_train_like_one_node_and_resume_on_another_rank_count(tmp_path):
    steps = ["max_steps=6", "checkpoint.every=3", "eval_every=100", "lr_scheduler.warmup_steps=1", "device=cpu"]
    one_node, two_nodes, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    one = [*FULL, "--nproc_per_node", "2", *steps, f"output_dir={one_node}"]
    assert subprocess.run(one, env=ONE_THREAD).returncode == 0
    port = _free_port()
    nodes = [_node(rank, port, two_nodes, *steps) for rank in (0, 1)]
    for node in nodes:
        node.communicate(timeout=300)
        assert node.returncode == 0
    a, b = load_file(one_node / "final" / "model.safetensors"), load_file(two_nodes / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (one_node / "metrics.jsonl").read_text().count("train") == 6

    # The step-3 checkpoint of the two-node run, resumed by one process (same global batch: 16).
    (resumed / "checkpoints").mkdir(parents=True)
    os.symlink(two_nodes / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    resume = [*FULL, *steps, "batch_size=16", f"output_dir={resumed}", "resume=true"]
    run = subprocess.run(resume, capture_output=True, env=ONE_THREAD)
    assert run.returncode == 0, run.stderr
    c = load_file(resumed / "final" / "model.safetensors")
    for k in a:  # one rank sums the gradient in another order than two: fp32 rounding, not bitwise
        torch.testing.assert_close(c[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_a_node_that_dies_stops_the_other_with_one_line(tmp_path):
    out, port = tmp_path / "run", _free_port()
    nodes = [_node(rank, port, out) for rank in (0, 1)]
    _wait_for_train_row(out, nodes[0])
    os.kill(nodes[1].pid, signal.SIGKILL)  # node 1's launcher; its worker dies with it
    _, stderr = nodes[0].communicate(timeout=60)
    assert nodes[0].returncode == 1
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: lost contact with another process of this run (it stopped, or its node went down): ")
    assert "Connection closed by peer" in line or "Connection reset by peer" in line, line
    assert "Traceback" not in stderr
