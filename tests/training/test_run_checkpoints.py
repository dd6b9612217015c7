"""The loop bookkeeping of the distributed recipes (`dpokit.training.run`): the step, evaluation
and checkpoint cadences against brute-force enumerations, keep-last-N against the folder names,
and a save -> resume round trip (one process, no process group: DCP's single-process mode)
against the uninterrupted run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from _distributed_helpers import build_model, collate, loss_fn, synthetic_pairs
from dpokit.distributed.checkpoint import COMPLETE, stale_checkpoints
from dpokit.distributed.sampler import GlobalBatchSampler
from dpokit.errors import DpokitError
from dpokit.training.reference import AdapterOffReference
from dpokit.training.run import Checkpointer, evaluation_due, total_training_steps
from dpokit.training.schedules import warmup_cosine_schedule
from dpokit.training.step import accumulate_gradients, clip_and_step


@pytest.mark.parametrize("steps_per_epoch,epochs,max_steps", [(10, 3, None), (10, 3, 7), (10, 1, 50), (4, 2, 8)])
def test_total_training_steps_is_epochs_cut_at_max_steps(steps_per_epoch, epochs, max_steps):
    every_step = [(e, s) for e in range(epochs) for s in range(steps_per_epoch)][:max_steps]
    assert total_training_steps(steps_per_epoch=steps_per_epoch, epochs=epochs, max_steps=max_steps) == len(every_step)


@pytest.mark.parametrize("every,total", [(25, 150), (25, 160), (7, 20), (1, 5), (100, 4)])
def test_evaluation_every_n_steps_and_after_the_last(every, total):
    due = [s for s in range(1, total + 1) if evaluation_due(s, every=every, total_steps=total)]
    expected = sorted(set(range(every, total + 1, every)) | {total})
    assert due == expected


@pytest.mark.parametrize("every", [0, 1, 3, 50])
def test_checkpoint_due_every_n_steps_and_never_for_zero(tmp_path, every):
    checkpointer = Checkpointer(tmp_path, every=every, keep_last=2)
    due = [s for s in range(1, 101) if checkpointer.due(s)]
    assert due == (list(range(every, 101, every)) if every else [])


def test_validation_at_the_end_can_be_switched_off():
    due = [s for s in range(1, 21) if evaluation_due(s, every=7, total_steps=20, at_end=False)]
    assert due == [7, 14]


def _make_checkpoints(root, names_complete):
    for name, complete in names_complete:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / COMPLETE).write_text("{}")


@pytest.mark.parametrize("keep_last", [0, 1, 2, 3, 10])
def test_stale_checkpoints_are_the_complete_ones_beyond_the_newest_n(tmp_path, keep_last):
    steps = [40, 8, 120, 16, 100]  # created out of order
    _make_checkpoints(
        tmp_path,
        [(f"step_{s:08d}", True) for s in steps]
        + [("step_00000200", False), (".tmp-step_00000300", True), ("notes", True)],
    )
    newest_first = sorted(steps, reverse=True)
    kept = newest_first if keep_last == 0 else newest_first[:keep_last]
    expected = sorted(set(steps) - set(kept))
    assert [p.name for p in stale_checkpoints(tmp_path, keep_last)] == [f"step_{s:08d}" for s in expected]


def _run(model, optimizer, scheduler, sampler, steps, *, first_step, checkpointer=None):
    """`steps` optimizer steps of DPO against a frozen copy of the seed-0 weights; returns per-step
    losses and one RNG draw (python, torch) per step, saving where the checkpointer says so."""
    losses, draws = [], []
    for step in range(first_step, first_step + steps):
        metrics, _ = accumulate_gradients(model, REFERENCE, sampler.next_step(), loss_fn, device=torch.device("cpu"))
        loss = metrics.means()["preference_loss"]
        clip_and_step(model.parameters(), optimizer, scheduler, max_grad_norm=1.0, loss=loss, step=step)
        losses.append(loss)
        draws.append((random.random(), torch.rand(()).item()))
        if checkpointer is not None and checkpointer.due(step):
            checkpointer.save(step, model, optimizer, scheduler, sampler)
    return losses, draws


with torch.random.fork_rng():
    torch.manual_seed(0)
    # The reference policy: the seed-0 weights, never trained (a model without adapters is its own
    # adapters-off self).
    REFERENCE = AdapterOffReference(build_model().requires_grad_(False))


def _fresh(seed):
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = warmup_cosine_schedule(optimizer, total_steps=6, warmup_steps=2, min_lr_ratio=0.1)
    sampler = GlobalBatchSampler(
        synthetic_pairs(24), collate, batch_size=2, gradient_accumulation_steps=2, rank=0, world_size=1, seed=3
    )  # 6 steps per epoch: the resumed part crosses no epoch
    return model, optimizer, scheduler, sampler


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP without a process group
def test_resume_round_trip_continues_exactly_like_the_uninterrupted_run(tmp_path):
    # Uninterrupted: 5 steps, a checkpoint every 2 steps, the newest 2 kept.
    model, optimizer, scheduler, sampler = _fresh(seed=0)
    random.seed(1)
    checkpointer = Checkpointer(tmp_path / "ckpt", every=2, keep_last=2)
    losses, draws = _run(model, optimizer, scheduler, sampler, 5, first_step=1, checkpointer=checkpointer)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000002", "step_00000004"]
    assert checkpointer.latest().name == "step_00000004"

    # A new process: other weights, other RNG state, nothing trained; resume from the latest.
    model2, optimizer2, scheduler2, sampler2 = _fresh(seed=123)
    random.seed(999)
    resumed = Checkpointer(tmp_path / "ckpt", every=2, keep_last=2)
    start = resumed.resume(True, model2, optimizer2, scheduler2, sampler2)
    assert start == 4 and resumed.resumed_from == tmp_path / "ckpt" / "step_00000004"
    assert scheduler2.last_epoch == scheduler.last_epoch - 1 and sampler2.state_dict()["step_in_epoch"] == 4
    losses2, draws2 = _run(model2, optimizer2, scheduler2, sampler2, 1, first_step=start + 1)
    assert losses2 == losses[4:] and draws2 == draws[4:]
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_without_a_checkpoint_starts_at_step_zero(tmp_path):
    model, optimizer, scheduler, sampler = _fresh(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for setting in (None, False, True):  # true, but nothing saved yet: a fresh start
        checkpointer = Checkpointer(tmp_path / "empty", every=2, keep_last=2)
        assert checkpointer.resume(setting, model, optimizer, scheduler, sampler) == 0
        assert checkpointer.resumed_from is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_from_an_incomplete_checkpoint_is_an_error(tmp_path):
    _make_checkpoints(tmp_path, [("step_00000002", False)])
    model, optimizer, scheduler, sampler = _fresh(seed=0)
    with pytest.raises(DpokitError, match="resume: .*step_00000002 is not a complete checkpoint"):
        Checkpointer(tmp_path, every=2, keep_last=2).resume(
            str(tmp_path / "step_00000002"), model, optimizer, scheduler, sampler
        )


@pytest.mark.parametrize("keep_last,keep_top_k,higher", [(1, 2, True), (2, 1, False), (1, 0, True), (0, 1, True)])
def test_the_best_k_by_a_named_metric_are_kept_besides_the_newest(tmp_path, keep_last, keep_top_k, higher):
    """Brute force: every subset rule written out against the folder names (NaN scores are never best)."""
    scores = {10: 0.5, 20: 0.9, 30: float("nan"), 40: 0.7, 50: 0.6, 60: 0.1}
    for step, value in scores.items():
        (tmp_path / f"step_{step:08d}").mkdir()
        score = {"metric": "validation/hh/acc", "value": value, "validated_at": step}
        (tmp_path / f"step_{step:08d}" / COMPLETE).write_text(json.dumps({"step": step, "score": score}))
    (tmp_path / "step_00000070").mkdir()  # unscored (e.g. saved before the first validation)
    (tmp_path / "step_00000070" / COMPLETE).write_text(json.dumps({"step": 70}))
    steps = [*scores, 70]
    finite = sorted(
        (s for s in scores if scores[s] == scores[s]), key=lambda s: (-scores[s] if higher else scores[s], s)
    )
    kept = set(steps) if keep_last == 0 else set(steps[-keep_last:]) | set(finite[:keep_top_k])
    stale = stale_checkpoints(
        tmp_path, keep_last, keep_top_k=keep_top_k, metric="validation/hh/acc", higher_is_better=higher
    )
    assert [p.name for p in stale] == [f"step_{s:08d}" for s in steps if s not in kept]
    other_metric = stale_checkpoints(tmp_path, keep_last, keep_top_k=keep_top_k, metric="validation/acc")
    assert [p.name for p in other_metric] == ([f"step_{s:08d}" for s in steps[:-keep_last]] if keep_last else [])
    checkpointer = Checkpointer(
        tmp_path,
        every=10,
        keep_last=keep_last,
        keep_top_k=keep_top_k,
        metric="validation/hh/acc",
        higher_is_better=higher,
    )
    assert checkpointer.best() == (tmp_path / f"step_{finite[0]:08d}" if keep_top_k else None)


def test_a_checkpoint_is_scored_by_the_latest_validation_of_its_set():
    checkpointer = Checkpointer("unused", every=5, keep_last=1, keep_top_k=1, metric="validation/hh/reward_margin")
    validations = {
        (0, None): {"reward_margin": 9.0},
        (0, "hh"): {"reward_margin": 1.0},
        (4, "hh"): {"reward_margin": 2.0},
    }
    assert checkpointer.score(3, validations) == {
        "metric": "validation/hh/reward_margin",
        "value": 1.0,
        "validated_at": 0,
    }
    assert checkpointer.score(5, validations) == {
        "metric": "validation/hh/reward_margin",
        "value": 2.0,
        "validated_at": 4,
    }
    assert Checkpointer("unused", every=5, keep_last=1, metric="validation/uf/acc").score(5, validations) is None
    with pytest.raises(
        DpokitError, match=r"^checkpoint.metric: 'accuracy' is not a validation metric; choose from \['loss', "
    ):
        Checkpointer("unused", every=5, keep_last=1, metric="validation/hh/accuracy")
    assert Checkpointer("unused", every=5, keep_last=1, metric="validation/preference_loss").higher_is_better is False
    assert Checkpointer("unused", every=5, keep_last=1, metric="validation/reward_margin").higher_is_better is True
    named = Checkpointer("unused", every=5, keep_last=1, keep_top_k=1, metric="validation/uf/acc")
    with pytest.raises(
        DpokitError,
        match=r"^checkpoint.metric: 'validation/uf/acc' names no validation set; validation_datasets has \['hh'\]$",
    ):
        named.check_metric({None: [], "hh": []}, eval_every=5)
    assert named.check_metric({None: [], "uf": []}, eval_every=5) is None
    assert "is not a multiple of eval_every=2" in named.check_metric({None: [], "uf": []}, eval_every=2)
    for bad in ("acc", "train/loss", "validation/", "validation/a/b/c"):
        with pytest.raises(DpokitError, match="is not a validation metric name like 'validation/acc'"):
            Checkpointer("unused", every=5, keep_last=1, metric=bad)


def test_a_save_without_a_score_keeps_the_best_ones(tmp_path):
    """After a resume the first checkpoint may come before any validation (no score): the kept best
    ones are still judged by their recorded scores, not forgotten."""
    for step, value in ((100, 0.9), (200, 0.6)):
        (tmp_path / f"step_{step:08d}").mkdir()
        score = {"metric": "validation/acc", "value": value, "validated_at": step}
        (tmp_path / f"step_{step:08d}" / COMPLETE).write_text(json.dumps({"step": step, "score": score}))
    (tmp_path / "step_00000250").mkdir()
    (tmp_path / "step_00000250" / COMPLETE).write_text(json.dumps({"step": 250}))
    stale = stale_checkpoints(tmp_path, 1, keep_top_k=1, metric="validation/acc")
    assert [p.name for p in stale] == ["step_00000200"]
