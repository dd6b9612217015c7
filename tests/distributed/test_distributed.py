"""FSDP2 on 2 gloo processes against the same training on a plain model in one process."""

from __future__ import annotations

import pytest
import torch

from _distributed_helpers import (
    build_model,
    collate,
    loss_fn,
    make_model,
    read_checkpoint,
    spawn,
    synthetic_pairs,
    train_lora_trajectory,
    train_trajectory,
    write_checkpoint,
)
from dpokit.training.reference import PrecomputedReference, StateDictSwapReference
from dpokit.training.reference_cache import compute_reference_logps
from dpokit.training.step import accumulate_gradients

STRATEGIES = ("swap", "frozen", "precomputed")
STEPS = 3


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: threads only add contention (the spawned ranks use one thread each too).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _two_rank_worker(rank, checkpoint, out_dir):
    from torch.distributed.tensor import DTensor

    from dpokit.distributed.fsdp import full_tensors

    # Rank-local loading: every parameter is a DTensor shard, and the sharded model is the checkpoint.
    model = make_model(checkpoint, sharded=True)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    loaded = dict(full_tensors(model))
    for key, tensor in read_checkpoint(checkpoint):
        assert torch.equal(loaded[key], tensor), key

    # A state-dict swap round trip leaves the training shards bitwise unchanged, and the swapped-in
    # weights really are the reference's (different log-probs once the policy has moved).
    pairs = synthetic_pairs(8)
    batch = collate(pairs)
    reference = StateDictSwapReference(model)
    before_ref = reference.logps(batch)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(0.01 * torch.randn_like(p.to_local()))
    shards = [p.to_local().clone() for p in model.parameters()]
    after_ref = reference.logps(batch)
    swap_bitwise = all(torch.equal(a, p.to_local()) for a, p in zip(shards, model.parameters()))
    ref_unchanged = bool(torch.equal(before_ref.chosen, after_ref.chosen))

    results = {
        s: train_trajectory(
            checkpoint, s, sharded=True, rank=rank, world_size=2, steps=STEPS, batch_size=2, accumulation=2
        )
        for s in STRATEGIES
    }
    lora = train_lora_trajectory(
        checkpoint, sharded=True, rank=rank, world_size=2, steps=STEPS, batch_size=2, accumulation=2
    )
    if rank == 0:
        torch.save(
            {"trajectories": results, "lora": lora, "swap_bitwise": swap_bitwise, "ref_unchanged": ref_unchanged},
            out_dir / "two_rank.pt",
        )


@pytest.mark.multiprocess
def test_two_rank_fsdp_matches_one_process_for_every_reference_strategy(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "checkpoint")
    spawn(_two_rank_worker, 2, checkpoint, tmp_path)
    two = torch.load(tmp_path / "two_rank.pt", weights_only=False)
    assert two["swap_bitwise"] and two["ref_unchanged"]

    # Same global batch of 8 pairs per step: 2 ranks x 2 micro-batches x 2 pairs vs 1 x 4 x 2.
    one = {
        s: train_trajectory(
            checkpoint, s, sharded=False, rank=0, world_size=1, steps=STEPS, batch_size=2, accumulation=4
        )
        for s in STRATEGIES
    }
    baseline = one["swap"]
    assert abs(baseline["losses"][-1] - baseline["losses"][0]) > 1e-3  # it trains: the comparison is not vacuous
    for strategy in STRATEGIES:
        for run in (one[strategy], two["trajectories"][strategy]):
            torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(baseline["losses"]), atol=1e-5, rtol=0)
            torch.testing.assert_close(
                torch.tensor(run["grad_norms"]), torch.tensor(baseline["grad_norms"]), atol=1e-5, rtol=1e-5
            )
            for key, value in baseline["weights"].items():
                torch.testing.assert_close(run["weights"][key], value, atol=1e-5, rtol=0)

    # FSDP2 + LoRA (frozen base and trainable adapters in the same shards, adapter-off reference,
    # LoRA on the output head): same trajectory, and the merged weights gathered module by module
    # equal the plain model's merged state dict.
    lora_one = train_lora_trajectory(
        checkpoint, sharded=False, rank=0, world_size=1, steps=STEPS, batch_size=2, accumulation=4
    )
    lora_two = two["lora"]
    assert abs(lora_one["losses"][-1] - lora_one["losses"][0]) > 1e-3
    torch.testing.assert_close(torch.tensor(lora_two["losses"]), torch.tensor(lora_one["losses"]), atol=1e-5, rtol=0)
    assert lora_two["merged"].keys() == lora_one["merged"].keys()
    for key, value in lora_one["merged"].items():
        # 1e-4: lr-5 SGD steps on B turn fp32 reduction-order noise into ~1e-5 of W + s B A; a
        # wrong merge (scaling, transpose, missing module) is off by O(0.1).
        torch.testing.assert_close(lora_two["merged"][key], value, atol=1e-4, rtol=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _accumulated_grads(checkpoint, micro_batches, reference_tables):
    model = make_model(checkpoint, sharded=False)
    metrics, _ = accumulate_gradients(model, reference_tables, micro_batches, loss_fn, device=torch.device("cpu"))
    return _grads(model), metrics.means()


def test_gradient_accumulation_is_a_per_pair_mean_over_the_global_batch(tmp_path):
    from dpokit.distributed.sampler import collate_with_index

    checkpoint = write_checkpoint(tmp_path / "checkpoint")
    pairs = synthetic_pairs(8, seed=3)
    # A reference that differs from the policy, so the losses (and grads) differ per pair.
    other = build_model()
    chosen, rejected = compute_reference_logps(other, pairs, collate, batch_size=8, device=torch.device("cpu"))
    reference = PrecomputedReference(chosen, rejected)
    whole = [collate_with_index(pairs, list(range(8)), collate)]
    split = [collate_with_index(pairs, list(range(i, i + 2)), collate) for i in range(0, 8, 2)]
    uneven = [collate_with_index(pairs, [0, 1, 2], collate), collate_with_index(pairs, [3, 4, 5, 6, 7], collate)]
    g_whole, m_whole = _accumulated_grads(checkpoint, whole, reference)
    for micro_batches in (split, uneven):
        g, m = _accumulated_grads(checkpoint, micro_batches, reference)
        for name in g_whole:
            torch.testing.assert_close(g[name], g_whole[name], atol=1e-6, rtol=0)
        assert m["preference_loss"] == pytest.approx(m_whole["preference_loss"], abs=1e-6)

    # The reference for the check: the gradient of the plain mean loss over the 8 pairs.
    model = make_model(checkpoint, sharded=False)
    from dpokit.training.forward import policy_logps

    batch = whole[0]
    out = loss_fn(*policy_logps(model, batch), chosen, rejected)
    out.losses.mean().backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(g_whole[name], grad, atol=1e-6, rtol=0)
