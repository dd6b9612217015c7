"""`RunReport`: the metrics.jsonl records and messages of the distributed recipes, compared with
the records the recipes wrote by hand before the report existed (same keys, order and values)."""

from __future__ import annotations

import json

from dpokit.training.run import RunReport

# What `PairMetrics.means()` gives for a step of a loss with an SFT term ("loss" = the total).
METRICS = {
    "acc": 0.75,
    "logps_chosen": -12.5,
    "logps_rejected": -14.0,
    "loss": 0.9,
    "preference_loss": 0.6,
    "reward_margin": 0.2,
    "rewards_chosen_mean": 0.1,
    "rewards_rejected_mean": -0.1,
    "sft_loss": 0.3,
}
VALIDATION = {"acc": 0.5, "loss": 0.69, "preference_loss": 0.69}


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _recipe_record(step, metrics, lr, grad_norm, tokens, elapsed, policy, reference, swap, optimizer):
    """The train record as `dpo_full_distributed` built it inline."""
    return {
        "step": step,
        "split": "train",
        "loss": metrics["preference_loss"],
        **metrics,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed,
        "policy_s": policy,
        "reference_s": reference,
        "swap_s": swap,
        "optimizer_s": optimizer,
    }


def test_train_and_validation_records_match_the_recipes_own(tmp_path, capsys):
    report = RunReport(tmp_path, is_main=True)
    report.start(total_steps=3, start_step=0)
    report.validation(0, VALIDATION)
    # Phases in the order a StepTimer fills them (reference first), swap carved out by the recipe.
    phases = {"reference": 0.25, "policy": 0.5, "optimizer": 0.125, "swap": 0.0625}
    report.train_step(1, METRICS, lr=1e-3, grad_norm=2.5, tokens=1000, seconds=2.0, phases=phases)
    report.validation(1, {**VALIDATION, "acc": 0.875})
    report.close()
    report.finish(tmp_path / "final")

    records = _records(tmp_path / "metrics.jsonl")
    expected = _recipe_record(1, METRICS, 1e-3, 2.5, 1000, 2.0, 0.5, 0.25, 0.0625, 0.125)
    assert records[1] == expected and list(records[1]) == list(expected)
    assert records[1]["loss"] == METRICS["loss"]  # the optimised total, not the preference part
    assert records[0] == {"step": 0, "split": "validation", **VALIDATION}
    assert [r["step"] for r in records] == [0, 1, 1]
    out = capsys.readouterr().out
    assert "step 0: validation loss 0.6900 acc 0.500" in out and "step 1: validation loss 0.6900 acc 0.875" in out
    assert "validation accuracy 0.500 -> 0.875" in out
    assert f"metrics: {tmp_path / 'metrics.jsonl'}\ncheckpoint: {tmp_path / 'final'}\n" in out


def test_a_resumed_run_continues_the_log_and_a_fresh_one_restarts_it(tmp_path, capsys):
    first = RunReport(tmp_path, is_main=True)
    first.start(total_steps=4, start_step=0)
    first.validation(0, VALIDATION)
    first.train_step(1, METRICS, lr=0.1, grad_norm=1.0, tokens=10, seconds=1.0, phases={})
    first.close()

    resumed = RunReport(tmp_path, is_main=True)
    resumed.start(total_steps=4, start_step=1, resumed_from=tmp_path / "checkpoints" / "step_00000001")
    resumed.train_step(2, METRICS, lr=0.1, grad_norm=1.0, tokens=10, seconds=1.0, phases={})
    resumed.validation(2, VALIDATION)
    resumed.close()
    resumed.finish(tmp_path / "final")
    assert [(r["step"], r["split"]) for r in _records(tmp_path / "metrics.jsonl")] == [
        (0, "validation"),
        (1, "train"),
        (2, "train"),
        (2, "validation"),
    ]
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000001'} at step 1" in out
    assert "validation accuracy" not in out  # no step-0 validation in this process to compare with

    fresh = RunReport(tmp_path, is_main=True)
    fresh.start(total_steps=4, start_step=0)
    fresh.validation(0, VALIDATION)
    fresh.close()
    assert len(_records(tmp_path / "metrics.jsonl")) == 1


def test_a_resume_drops_what_the_killed_run_logged_after_its_checkpoint(tmp_path, capsys):
    killed = RunReport(tmp_path, is_main=True)
    killed.start(total_steps=6, start_step=0)
    killed.validation(0, VALIDATION)
    for step in (1, 2, 3):  # checkpoint at 2, killed during step 4's write
        killed.train_step(step, METRICS, lr=0.1, grad_norm=1.0, tokens=10, seconds=1.0, phases={})
    killed.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "tr')

    resumed = RunReport(tmp_path, is_main=True)
    resumed.start(total_steps=6, start_step=2, resumed_from=tmp_path / "checkpoints" / "step_00000002")
    resumed.train_step(3, METRICS, lr=0.1, grad_norm=1.0, tokens=10, seconds=1.0, phases={})
    resumed.close()
    assert [(r["step"], r["split"]) for r in _records(tmp_path / "metrics.jsonl")] == [
        (0, "validation"),
        (1, "train"),
        (2, "train"),
        (3, "train"),
    ]
    assert "dropped 2 line(s) the interrupted run logged after step 2" in capsys.readouterr().out


def test_other_ranks_write_and_print_nothing(tmp_path, capsys):
    report = RunReport(tmp_path, is_main=False)
    report.say("hello")
    report.start(total_steps=2, start_step=0, resumed_from=tmp_path / "x")
    report.validation(0, VALIDATION)
    report.train_step(1, METRICS, lr=0.1, grad_norm=1.0, tokens=10, seconds=1.0, phases={"policy": 1.0})
    report.close()
    report.finish(None)
    assert not (tmp_path / "metrics.jsonl").exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
