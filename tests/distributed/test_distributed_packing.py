"""Packed and prefix-shared training batches in the distributed path.

- 2 FSDP2 gloo ranks on packed batches train exactly like 1 plain process on the same packs (the
  packs of a step are dealt to ranks, whose pair counts then differ; the loss is still the mean
  over the step's global pair count), for the swap, frozen, precomputed and no-reference
  strategies, unshared and prefix-shared.
- One packed optimizer step equals the padded step on the same pairs (loss and gradients): the
  padded global batch is built from the pair indices of the step's packs.
- The data position of the packed stream is part of the checkpoint: a sampler restored from its
  state continues with the same batches, a different packing is refused, and the recipe's own
  `main` resumed at step 2 ends bitwise equal to an uninterrupted packed run.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from _distributed_helpers import (
    build_model,
    collate,
    loss_fn,
    make_model,
    make_reference,
    small_full_recipe_config,
    spawn,
    synthetic_pairs,
    write_checkpoint,
)
from dpokit.data import PackedBatch, PackedPreferenceDataset, pack_preference_dataset
from dpokit.data.synthetic import case_following_pairs
from dpokit.distributed.sampler import GlobalBatchSampler, PackedGlobalBatchSampler, collate_with_index
from dpokit.errors import DpokitError
from dpokit.losses import simpo_loss
from dpokit.training.reference import NoReference, PrecomputedReference
from dpokit.training.reference_cache import compute_reference_logps
from dpokit.training.step import accumulate_gradients

NUM_PAIRS, PACK_SIZE, STEPS = 40, 56, 3
# (reference strategy, prefix sharing): every strategy runs packed, both layouts are covered.
RUNS = (("swap", False), ("frozen", True), ("precomputed", True), ("none", False))
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _packed(prefix_sharing: bool, seed: int = 0):
    return pack_preference_dataset(
        synthetic_pairs(NUM_PAIRS, seed=seed), pack_size=PACK_SIZE, prefix_sharing=prefix_sharing
    )


def packed_trajectory(
    checkpoint: Path,
    strategy: str,
    prefix_sharing: bool,
    *,
    sharded: bool,
    rank: int,
    world_size: int,
    accumulation: int,
) -> dict:
    """STEPS SGD steps on packed batches (1 pack per micro-batch); per-step losses, this rank's
    pair counts per step, and the final full weights."""
    from dpokit.distributed.fsdp import full_tensors

    packed = _packed(prefix_sharing)
    policy = make_model(checkpoint, sharded=sharded)
    if strategy == "none":
        reference, step_loss = NoReference(), partial(simpo_loss, beta=0.5, gamma=0.5)
    else:
        reference, step_loss = make_reference(strategy, policy, checkpoint, packed.pairs, sharded=sharded), loss_fn
    optimizer = torch.optim.SGD(policy.parameters(), lr=5.0)  # SGD: see _distributed_helpers.train_trajectory
    sampler = PackedGlobalBatchSampler(
        packed,
        pad_id=0,
        batch_size=1,
        gradient_accumulation_steps=accumulation,
        rank=rank,
        world_size=world_size,
        seed=0,
    )
    losses, local_pairs = [], []
    for _ in range(STEPS):
        micro_batches = sampler.next_step()
        assert all(isinstance(b, PackedBatch) for b in micro_batches)  # really packed
        local_pairs.append(sum(b.num_pairs for b in micro_batches))
        metrics, _ = accumulate_gradients(policy, reference, micro_batches, step_loss, device=CPU)
        losses.append(metrics.means()["preference_loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"losses": losses, "local_pairs": local_pairs, "weights": dict(full_tensors(policy))}


def _two_rank_worker(rank, checkpoint, out_dir):
    runs = {
        run: packed_trajectory(checkpoint, *run, sharded=True, rank=rank, world_size=2, accumulation=2) for run in RUNS
    }
    torch.save(runs, out_dir / f"rank{rank}.pt")


@pytest.mark.multiprocess
def test_two_rank_packed_training_matches_one_process(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "checkpoint")
    spawn(_two_rank_worker, 2, checkpoint, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for run in RUNS:
        # Same 4 packs per step: 2 ranks x 2 micro-batches x 1 pack vs 1 process x 4 micro-batches.
        one = packed_trajectory(checkpoint, *run, sharded=False, rank=0, world_size=1, accumulation=4)
        two = ranks[0][run]
        assert abs(one["losses"][-1] - one["losses"][0]) > 1e-3, run  # it trains: not a vacuous comparison
        # The ranks split each step's pairs between them, unequally at least once.
        per_rank = list(zip(ranks[0][run]["local_pairs"], ranks[1][run]["local_pairs"]))
        assert [a + b for a, b in per_rank] == one["local_pairs"], run
        assert any(a != b for a, b in per_rank), run
        torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=0)
        for key, value in one["weights"].items():
            torch.testing.assert_close(two["weights"][key], value, atol=1e-5, rtol=0, msg=f"{run} {key}")


def _step(checkpoint, reference, micro_batches):
    model = make_model(checkpoint, sharded=False)
    metrics, _ = accumulate_gradients(model, reference, micro_batches, loss_fn, device=CPU)
    return metrics.means(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["packed", "prefix-shared"])
def test_packed_step_equals_the_padded_step_on_the_same_pairs(tmp_path, prefix_sharing):
    checkpoint = write_checkpoint(tmp_path / "checkpoint")
    packed = _packed(prefix_sharing, seed=3)
    # A reference unlike the policy (per-pair losses and gradients differ), looked up by pair_index:
    # a wrong pair order in the packed batch would change the loss.
    other = build_model()
    reference = PrecomputedReference(*compute_reference_logps(other, packed.pairs, collate, batch_size=16, device=CPU))
    sampler = PackedGlobalBatchSampler(
        packed, pad_id=0, batch_size=1, gradient_accumulation_steps=4, rank=0, world_size=1, seed=0
    )
    micro_batches = sampler.next_step()
    counts = [b.num_pairs for b in micro_batches]
    assert len(set(counts)) > 1  # uneven micro-batches: the per-pair weighting is exercised
    pair_index = torch.cat([b.pair_index for b in micro_batches]).tolist()
    padded = [collate_with_index(packed.pairs, sorted(pair_index), collate)]
    packed_metrics, packed_grads = _step(checkpoint, reference, micro_batches)
    padded_metrics, padded_grads = _step(checkpoint, reference, padded)
    assert packed_metrics["preference_loss"] == pytest.approx(padded_metrics["preference_loss"], abs=1e-5)
    assert packed_metrics["acc"] == padded_metrics["acc"]
    assert abs(padded_metrics["preference_loss"] - 0.6931472) > 1e-2  # the reference differs from the policy
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_packed_data_position_round_trips_and_refuses_another_stream():
    packed = _packed(False)
    settings = dict(pad_id=0, batch_size=1, gradient_accumulation_steps=2, rank=0, world_size=1, seed=0)
    sampler = PackedGlobalBatchSampler(packed, **settings)
    for _ in range(sampler.steps_per_epoch + 1):  # into the second epoch
        sampler.next_step()
    restored = PackedGlobalBatchSampler(packed, **settings)
    restored.load_state_dict(sampler.state_dict())
    for _ in range(3):
        for a, b in zip(sampler.next_step(), restored.next_step()):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pair_index, b.pair_index)

    state = sampler.state_dict()
    # Same pairs and pack count, other packs (two pairs swapped between packs): only the fingerprint differs.
    packs = [list(pack) for pack in packed.packs]
    packs[0][0], packs[1][0] = packs[1][0], packs[0][0]
    other = PackedPreferenceDataset(packed.pairs, pack_size=PACK_SIZE, packs=packs)
    with pytest.raises(DpokitError, match="packing="):
        PackedGlobalBatchSampler(other, **settings).load_state_dict(state)
    with pytest.raises(DpokitError, match="num_packs=15, this run has 11"):  # prefix sharing packs differently
        PackedGlobalBatchSampler(_packed(True), **settings).load_state_dict(state)
    padded = GlobalBatchSampler(
        packed.pairs, collate, batch_size=1, gradient_accumulation_steps=2, rank=0, world_size=1, seed=0
    )
    with pytest.raises(DpokitError, match="exact resume"):  # a packed position into a padded run
        padded.load_state_dict(state)
    with pytest.raises(DpokitError, match="num_packs=absent"):  # and a padded one into a packed run
        PackedGlobalBatchSampler(packed, **settings).load_state_dict(padded.state_dict())


def _recipe_config(tmp_path: Path) -> Path:
    """The tiny config made smaller, packed with prefix sharing, precomputed reference."""
    cfg = small_full_recipe_config(tmp_path, train_pairs=48, batch_size=1)
    cfg.packing = {"_component_": "dpokit.data.pack_preference_dataset", "pack_size": 160, "prefix_sharing": True}
    cfg.reference.strategy = "precomputed"
    path = tmp_path / "config.yaml"
    OmegaConf.save(cfg, path)
    return path


def test_packed_recipe_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    import shutil

    from dpokit.config import load_config
    from dpokit.errors import DpokitError
    from dpokit.recipes.dpo_full_distributed import main

    config = _recipe_config(tmp_path)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(load_config(config, [f"output_dir={full}"]))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    main(load_config(config, [f"output_dir={resumed}", "resume=true"]))
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = {
        name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for name, run in (("full", full), ("resumed", resumed))
    }
    losses = {name: {r["step"]: r["loss"] for r in rs if r["split"] == "train"} for name, rs in rows.items()}
    assert sorted(losses["resumed"]) == [3, 4] and all(losses["resumed"][s] == losses["full"][s] for s in (3, 4))
    # Step 1 runs before any update, so the policy is its reference: rewards 0, loss log 2, which
    # needs the packed policy log-probs and the pair_index lookup of the padded-precomputed table to agree.
    first = next(r for r in rows["full"] if r["split"] == "train" and r["step"] == 1)
    assert first["preference_loss"] == pytest.approx(0.6931472, abs=1e-5)

    with pytest.raises(DpokitError, match="ld_alpha is set but the training data is packed"):
        main(load_config(config, [f"output_dir={tmp_path / 'ld'}", "ld_alpha=0.5"]))


def test_lora_recipe_trains_on_a_dpokit_pack_file(tmp_path):
    """`dpo_lora_distributed` with a packed file as train_dataset (the offline flow): step 1 is at
    the reference (adapters start at zero), so its loss is log 2 on the packed forward; it trains."""
    from dpokit.config import load_config
    from dpokit.data import PreferenceDataset, byte_tokenizer
    from dpokit.errors import DpokitError
    from dpokit.recipes.dpo_lora_distributed import main

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "recipes/configs/dpo_lora_distributed/tiny.yaml")
    for name, n, seed in (("train", 48, 0), ("validation", 8, 1)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in case_following_pairs(n, seed)))
    pairs = PreferenceDataset(tmp_path / "train.jsonl", byte_tokenizer(), max_seq_len=64)
    pack_preference_dataset(pairs, pack_size=160, prefix_sharing=True).save(tmp_path / "packed.jsonl")
    cfg.train_dataset = {"_component_": "dpokit.data.load_packed_dataset", "path": str(tmp_path / "packed.jsonl")}
    cfg.validation_dataset = {
        "_component_": "dpokit.data.PreferenceDataset",
        "path": str(tmp_path / "validation.jsonl"),
        "max_seq_len": 64,
    }
    cfg.batch_size, cfg.gradient_accumulation_steps, cfg.max_steps, cfg.eval_every = 1, 2, 4, 100
    cfg.optimizer.lr, cfg.lr_scheduler.warmup_steps, cfg.checkpoint.every = 1e-2, 1, 0
    config = tmp_path / "lora.yaml"
    OmegaConf.save(cfg, config)
    main(load_config(config, [f"output_dir={tmp_path / 'out'}"]))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["preference_loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 4
    assert losses[0] == pytest.approx(0.6931472, abs=1e-5) and abs(losses[-1] - losses[0]) > 1e-3

    cfg.packing = {"_component_": "dpokit.data.pack_preference_dataset", "pack_size": 160}
    OmegaConf.save(cfg, config)
    with pytest.raises(DpokitError, match="train_dataset is already packed"):  # packing a packed file
        main(load_config(config, [f"output_dir={tmp_path / 'twice'}"]))
