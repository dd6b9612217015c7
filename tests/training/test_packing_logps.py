"""Packed and prefix-shared batches give the log-probs, DPO loss and gradients of the padded batch
(the reference path: `collate_preference_pairs` + `policy_logps`), with LoRA adapters on and off."""

import random

import pytest
import torch

from dpokit.data import collate_packed, collate_preference_pairs, first_fit_decreasing, first_fit_shuffle, pair_length
from dpokit.losses import dpo_loss
from dpokit.models import disable_adapter, lora_llama
from dpokit.models.moe import MoE, route_statistics
from dpokit.models.transformer import LongRopeScaling
from dpokit.training.forward import policy_logps
from dpokit.training.packed_forward import packed_policy_logps, segment_logps
from dpokit.training.router import routed_token_weights

TOL = dict(rtol=1e-5, atol=1e-5)


# The architecture switches of every family, on the tiny model (windows short enough to cut the
# sequences of `random_pairs`, which reach 24 tokens).
VARIANTS = {
    "llama": {},
    "qwen3": dict(qk_norm="head"),
    "mistral_window": dict(sliding_window=6),
    "gemma2": dict(
        norm_placement="sandwich",
        unit_offset_norm=True,
        activation="gelu_tanh",
        embedding_scale=True,
        attn_scale=0.3,
        attn_softcap=2.0,
        logit_softcap=3.0,
        sliding_window=5,
        layer_types=("sliding_attention", "full_attention"),
    ),
    "gemma3": dict(
        norm_placement="sandwich",
        unit_offset_norm=True,
        activation="gelu_tanh",
        embedding_scale=True,
        qk_norm="head",
        sliding_window=4,
        layer_types=("sliding_attention", "full_attention"),
        local_rope_theta=100.0,
    ),
    "olmo2": dict(norm_placement="post", qk_norm="projection", norm_scale_in_fp32=True),
    "phi3": dict(fused_projections=True, lora_targets=["qkv_proj", "o_proj", "gate_up_proj"]),
    "phi3_window": dict(fused_projections=True, sliding_window=6, lora_targets=["qkv_proj", "gate_up_proj"]),
    # longrope: the batch's longest sequence (up to 24 tokens) passes 12 positions, in every layout
    "phi3_longrope": dict(
        fused_projections=True,
        rope_scaling=LongRopeScaling((1.0, 1.5, 2.0, 3.0), (1.2, 4.0, 8.0, 16.0), 12, attention_factor=1.2),
        lora_targets=["qkv_proj", "down_proj"],
    ),
    "qwen3_moe": dict(
        qk_norm="head",
        moe=MoE(n_experts=4, top_k=2, expert_hidden_dim=16, norm_topk_prob=True, mlp_only_layers=(1,)),
        lora_targets=["q_proj", "v_proj", "o_proj"],  # MoE models take no MLP adapters
    ),
}


def tiny_lora_model(variant: str = "llama"):
    arch = dict(VARIANTS[variant])
    model = lora_llama(
        **{"lora_targets": ["q_proj", "v_proj", "o_proj", "down_proj"], **arch},
        vocab_size=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        max_seq_len=256,
        rope_theta=10_000.0,
        lora_rank=4,
    )
    # Non-zero adapters, so "adapters on" differs from "adapters off".
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.2)
            elif "norm" in name:
                p.uniform_(-0.5, 0.5) if arch.get("unit_offset_norm") else p.uniform_(0.5, 1.5)  # not the identity
    return model


def random_pairs(n, seed):
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(1, 64) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [{"prompt_ids": ids(1, 14), "chosen_ids": ids(1, 10), "rejected_ids": ids(1, 10)} for _ in range(n)]


def batches(pairs, prefix_sharing, packer):
    """The same pairs as one packed batch and as one padded batch in the packed pair order."""
    lengths = [pair_length(p, prefix_sharing=prefix_sharing) for p in pairs]
    packs = packer(lengths, 64)
    assert len(packs) < len(pairs)  # several pairs really share a row
    ordered = [pairs[i] for pack in packs for i in pack]
    packed = collate_packed(
        [[pairs[i] for i in pack] for pack in packs], pad_id=0, pack_size=64, prefix_sharing=prefix_sharing
    )
    return packed, collate_preference_pairs(ordered, pad_id=0)


@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["packed", "prefix_shared+packed"])
@pytest.mark.parametrize("adapters", ["on", "off"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_logps_equal_padded_logps(prefix_sharing, adapters, average, variant):
    model = tiny_lora_model(variant)
    packed, padded = batches(random_pairs(9, seed=1), prefix_sharing, first_fit_shuffle)
    with torch.no_grad():
        if adapters == "off":
            with disable_adapter(model):
                got, want = (
                    packed_policy_logps(model, packed, average_logps=average),
                    policy_logps(model, padded, average_logps=average),
                )
        else:
            got, want = (
                packed_policy_logps(model, packed, average_logps=average),
                policy_logps(model, padded, average_logps=average),
            )
    torch.testing.assert_close(got.chosen, want.chosen, **TOL)
    torch.testing.assert_close(got.rejected, want.rejected, **TOL)


def dpo_step(model, batch, forward):
    """DPO loss (policy = adapters on, reference = adapters off) and the adapter gradients."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), disable_adapter(model):
        ref = forward(model, batch)
    policy = forward(model, batch)
    out = dpo_loss(policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta=0.5)
    out.losses.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.losses.detach(), grads


@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["packed", "prefix_shared+packed"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_dpo_loss_and_gradients_equal_padded(prefix_sharing, variant):
    model = tiny_lora_model(variant)
    packed, padded = batches(random_pairs(10, seed=2), prefix_sharing, first_fit_decreasing)
    losses, grads = dpo_step(model, packed, packed_policy_logps)
    want_losses, want_grads = dpo_step(model, padded, policy_logps)
    assert want_losses.abs().sum() > 0 and len(grads) > 0
    torch.testing.assert_close(losses, want_losses, **TOL)
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def router_aux_step(model, batch, forward):
    """The MoE router's load-balancing loss of one policy forward and the adapter gradients."""
    model.zero_grad(set_to_none=True)
    with route_statistics(model, routed_token_weights(batch)) as stats:
        forward(model, batch)
    aux = stats.loss()
    aux.backward()
    # adapters after the last sparse layer do not reach a router: no gradient
    return aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["packed", "prefix_shared+packed"])
def test_packed_router_aux_loss_and_gradients_equal_padded(prefix_sharing):
    """Prefix sharing routes a prompt token once for two sequences: it counts twice, as in the
    padded batch; the pack's padding never counts."""
    model = tiny_lora_model("qwen3_moe")
    packed, padded = batches(random_pairs(10, seed=4), prefix_sharing, first_fit_decreasing)
    assert routed_token_weights(packed).sum() == routed_token_weights(padded).sum() == padded.num_tokens
    aux, grads = router_aux_step(model, packed, packed_policy_logps)
    want, want_grads = router_aux_step(model, padded, policy_logps)
    assert grads.keys() == want_grads.keys() and any(n.startswith("layers.0.self_attn.") for n in grads)
    torch.testing.assert_close(aux, want, rtol=0, atol=1e-6)
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    # counting the shared prompt once, or the padding, gives another value
    wrong = (packed.document_ids >= 0).float() if prefix_sharing else torch.ones(packed.input_ids.shape)
    with torch.no_grad(), route_statistics(model, wrong) as stats:
        packed_policy_logps(model, packed)
    assert abs(stats.loss().item() - want.item()) > 1e-5


def test_prefix_sharing_without_packing_is_a_pack_per_pair():
    model = tiny_lora_model()
    pairs = random_pairs(4, seed=3)
    shared = collate_packed([[p] for p in pairs], pad_id=0, prefix_sharing=True)
    padded = collate_preference_pairs(pairs, pad_id=0)
    with torch.no_grad():
        got, want = packed_policy_logps(model, shared), policy_logps(model, padded)
    torch.testing.assert_close(torch.cat(got), torch.cat(want), **TOL)
    # Each pair's prompt is computed once: fewer tokens than the two sequences of the padded layout.
    saved = sum(len(p["prompt_ids"]) - 1 for p in pairs)
    assert shared.num_tokens == padded.num_tokens - saved


def test_segment_logps_against_a_python_loop_and_empty_sequence_error():
    values = torch.randn(12, dtype=torch.float64)
    ids = torch.tensor([2, 0, 0, 1, 2, 2, 3, 1, 0, 3, 3, 3])
    sums, counts = segment_logps(values, ids, 4)
    for s in range(4):
        assert sums[s].item() == pytest.approx(sum(v for v, i in zip(values.tolist(), ids.tolist()) if i == s))
    means, _ = segment_logps(values, ids, 4, average_logps=True)
    torch.testing.assert_close(means, sums / counts)
    with pytest.raises(ValueError, match=r"sequence\(s\) \[4\] have no response tokens"):
        segment_logps(values, ids, 5)
