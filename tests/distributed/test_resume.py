"""Exact resume of the `dpo_full_distributed` recipe (its `main`, on 2 gloo ranks)
and atomic checkpoints: a half-written checkpoint is never picked as the latest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from _distributed_helpers import small_full_recipe_config, spawn
from dpokit.config import instantiate
from dpokit.distributed.checkpoint import COMPLETE, latest_checkpoint
from dpokit.models import load_hf_checkpoint, save_hf_checkpoint


def _config(tmp_path: Path) -> Path:
    """The tiny config, made smaller: 2-layer dim-32 model, 64 train / 8 validation pairs."""
    path = tmp_path / "config.yaml"
    OmegaConf.save(small_full_recipe_config(tmp_path, train_pairs=64, batch_size=2), path)
    return path


def _interrupt(full: Path, resumed: Path) -> None:
    """What an interrupted run leaves: only the step-2 checkpoint survived, plus the leftovers of
    killed saves (a temp folder, and a step folder whose save never completed)."""
    checkpoints = resumed / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000002", checkpoints / "step_00000002")
    shutil.copytree(full / "checkpoints" / "step_00000004", checkpoints / ".tmp-step_00000004")
    half = shutil.copytree(full / "checkpoints" / "step_00000004", checkpoints / "step_00000006")
    (half / COMPLETE).unlink()
    (half / "__1_0.distcp").write_bytes(b"truncated")


def _recipe_worker(rank, config, full, resumed, diverged, from_hf, hf_dir):
    """The recipe's own `main` on 2 gloo ranks: an uninterrupted run, a resumed one, one whose
    loss is NaN from the first step (beta = NaN), and one loading its weights from an HF folder."""
    import torch.distributed as dist

    from dpokit.config import load_config, recipe_main
    from dpokit.errors import DpokitError
    from dpokit.recipes.dpo_full_distributed import CONFIG_KEYS, main

    recipe_main(main, CONFIG_KEYS, ["--config", str(config), f"output_dir={full}"])
    if rank == 0:
        _interrupt(full, resumed)
    dist.barrier()
    recipe_main(main, CONFIG_KEYS, ["--config", str(config), f"output_dir={resumed}", "resume=true"])
    try:
        main(load_config(config, [f"output_dir={diverged}", "loss.beta=.nan"]))
    except DpokitError as e:
        (diverged / f"error{rank}.txt").write_text(str(e))
    main(load_config(config, [f"output_dir={from_hf}", f"checkpoint_dir={hf_dir}", "max_steps=2"]))


def _train_losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.multiprocess
def test_resume_after_step_k_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    config = _config(tmp_path)
    full, resumed, diverged, from_hf = (tmp_path / name for name in ("full", "resumed", "diverged", "from_hf"))
    # The random init the recipe makes from `seed`, written as an HF checkpoint folder.
    torch.manual_seed(OmegaConf.load(config).seed)
    hf_dir = save_hf_checkpoint(instantiate(OmegaConf.load(config).model), tmp_path / "hf")
    spawn(_recipe_worker, 2, config, full, resumed, diverged, from_hf, hf_dir)
    assert [c.name for c in sorted((full / "checkpoints").iterdir())] == ["step_00000002", "step_00000004"]
    checkpoints = resumed / "checkpoints"
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses_full, losses_resumed = _train_losses(full), _train_losses(resumed)
    assert sorted(losses_resumed) == [3, 4]
    assert all(losses_resumed[s] == losses_full[s] for s in (3, 4))
    # The resumed run's own save at step 4 removed the stale temp folder.
    assert not (checkpoints / ".tmp-step_00000004").exists()

    # A NaN loss stops every rank before the optimizer step, naming the step; nothing is saved.
    for rank in (0, 1):
        message = (diverged / f"error{rank}.txt").read_text()
        assert message.startswith("step 1: non-finite loss (nan)"), message
    assert not (diverged / "final").exists() and latest_checkpoint(diverged / "checkpoints") is None

    # Loading the same weights from an HF folder (rank-local, through `iter_hf_weights`) trains
    # identically, and the final folder is an HF checkpoint that loads back.
    losses_hf = _train_losses(from_hf)
    assert losses_hf == {1: losses_full[1], 2: losses_full[2]}
    assert sum(p.numel() for p in load_hf_checkpoint(from_hf / "final").parameters()) == sum(
        t.numel() for t in load_file(from_hf / "final" / "model.safetensors").values()
    )


def test_latest_checkpoint_ignores_incomplete_saves(tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None
    for name, complete in (
        ("step_00000010", True),
        ("step_00000020", True),
        ("step_00000030", False),
        (".tmp-step_00000040", True),
        ("step_x", True),
    ):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / COMPLETE).write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step_00000020"
