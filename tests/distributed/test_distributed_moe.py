"""FSDP2 on 2 gloo processes with an MoE decoder (every expert inside its block's shard) against
the same DPO training, router load-balancing loss included, on a plain model in one process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from _distributed_helpers import TINY, collate, loss_fn, read_checkpoint, spawn, synthetic_pairs
from dpokit.models import llama
from dpokit.models.moe import MoE, SparseMoE

# 6 experts, top-2, layer 1 dense; a large aux coefficient so the router term moves the weights.
MOE = MoE(
    n_experts=6, top_k=2, expert_hidden_dim=16, norm_topk_prob=True, mlp_only_layers=(1,), router_aux_loss_coef=0.5
)
ARCH = dict(TINY, n_layers=3, moe=MOE)
STEPS = 3


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_moe_checkpoint(directory, seed: int = 0):
    torch.manual_seed(seed)
    model = llama(**ARCH)
    directory.mkdir(parents=True, exist_ok=True)
    state = {(k if k.startswith("lm_head.") else f"model.{k}"): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / "model.safetensors")
    return directory


def make_moe_model(checkpoint, *, sharded: bool):
    from dpokit.distributed.fsdp import load_into_shards, materialize, shard_model

    if sharded:
        with torch.device("meta"):
            model = llama(**ARCH)
        # activation checkpointing: the recomputed forward must not add router statistics again
        shard_model(model, activation_checkpointing=True)
        materialize(model, "cpu")
        load_into_shards(model, read_checkpoint(checkpoint))
    else:
        model = llama(**ARCH)
        model.load_state_dict(dict(read_checkpoint(checkpoint)))
    return model


def train_moe(checkpoint, *, sharded: bool, rank: int, world_size: int, accumulation: int) -> dict:
    from dpokit.distributed.fsdp import full_tensors
    from dpokit.distributed.sampler import GlobalBatchSampler
    from dpokit.training.reference import StateDictSwapReference
    from dpokit.training.step import accumulate_gradients

    pairs = synthetic_pairs(48)
    model = make_moe_model(checkpoint, sharded=sharded)
    reference = StateDictSwapReference(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    sampler = GlobalBatchSampler(
        pairs, collate, batch_size=2, gradient_accumulation_steps=accumulation, rank=rank, world_size=world_size, seed=0
    )
    losses, aux, norms = [], [], []
    for _ in range(STEPS):
        metrics, _ = accumulate_gradients(model, reference, sampler.next_step(), loss_fn, device=torch.device("cpu"))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        means = metrics.means()
        losses.append(means["preference_loss"])
        aux.append(means["router_aux_loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"losses": losses, "aux": aux, "grad_norms": norms, "weights": dict(full_tensors(model))}


def _worker(rank, checkpoint, out_dir):
    from torch.distributed.tensor import DTensor

    model = make_moe_model(checkpoint, sharded=True)
    experts = [p for m in model.modules() if isinstance(m, SparseMoE) for p in m.experts.parameters()]
    assert experts and all(isinstance(p, DTensor) for p in experts)
    result = train_moe(checkpoint, sharded=True, rank=rank, world_size=2, accumulation=2)
    if rank == 0:
        torch.save(result, out_dir / "two_rank_moe.pt")


@pytest.mark.multiprocess
def test_two_rank_fsdp_moe_dpo_matches_one_process(tmp_path):
    checkpoint = write_moe_checkpoint(tmp_path / "checkpoint")
    spawn(_worker, 2, checkpoint, tmp_path)
    two = torch.load(tmp_path / "two_rank_moe.pt", weights_only=False)
    # Same global batch of 8 pairs per step: 2 ranks x 2 micro-batches x 2 pairs vs 1 x 4 x 2.
    one = train_moe(checkpoint, sharded=False, rank=0, world_size=1, accumulation=4)
    assert abs(one["losses"][-1] - one["losses"][0]) > 1e-3 and abs(one["aux"][-1] - one["aux"][0]) > 1e-4
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(two["aux"]), torch.tensor(one["aux"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(two["grad_norms"]), torch.tensor(one["grad_norms"]), atol=1e-5, rtol=1e-5)
    for key, value in one["weights"].items():
        torch.testing.assert_close(two["weights"][key], value, atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_the_step_adds_coef_times_the_router_aux_loss():
    """accumulate_gradients' gradient with the coefficient minus without it is coef * grad(aux), and
    the metric is the aux loss of the policy forward."""
    from dpokit.models.moe import route_statistics
    from dpokit.training.forward import policy_logps
    from dpokit.training.reference import StateDictSwapReference
    from dpokit.training.router import routed_token_weights
    from dpokit.training.step import accumulate_gradients

    torch.manual_seed(0)
    model = llama(**ARCH)
    batch = collate(synthetic_pairs(4))

    def step_grads(coef):
        model.args["moe"] = MoE(**{**MOE.__dict__, "router_aux_loss_coef": coef})
        model.zero_grad()
        metrics, _ = accumulate_gradients(
            model, StateDictSwapReference(model), [batch], loss_fn, device=torch.device("cpu")
        )
        return {n: p.grad.clone() for n, p in model.named_parameters()}, metrics.means()["router_aux_loss"]

    with_aux, logged = step_grads(MOE.router_aux_loss_coef)
    without, _ = step_grads(0.0)
    model.zero_grad()
    with route_statistics(model, routed_token_weights(batch)) as stats:
        policy_logps(model, batch)
    aux = stats.loss()
    aux.backward()
    assert logged == pytest.approx(aux.item(), abs=1e-7)
    gate = "layers.0.mlp.gate.weight"
    assert (with_aux[gate] - without[gate]).abs().sum() > 1e-4
    for name, p in model.named_parameters():
        expected = MOE.router_aux_loss_coef * p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(with_aux[name] - without[name], expected, atol=1e-6, rtol=0)
