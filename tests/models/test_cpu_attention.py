"""flash_attention: torch's CPU flash kernel, its backward on fp32 copies for short sequences."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpokit.data import collate_preference_pairs
from dpokit.models import cpu_attention as cpu_attention_module
from dpokit.models import llama, prepare_blocks
from dpokit.models.attention import attention, build_attention_mask
from dpokit.models.cpu_attention import flash_attention, flash_attention_applies
from dpokit.training import policy_logps


def _qkv(length, *, batch=2, heads=8, kv_heads=4, dim=64, seed=0):
    """float64 q, k, v laid out as the model lays them out: [B, L, H, D] (transposed when used)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((batch, length, heads, dim), (batch, length, kv_heads, dim), (batch, length, kv_heads, dim))
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _causal_subset_mask(batch, length, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, 1, length, length, generator=gen) < 0.6
    return (mask & torch.ones(length, length, dtype=torch.bool).tril()) | torch.eye(length, dtype=torch.bool)


def _grads(fn, inputs, grad, dtype, needs_grad=(True, True, True)):
    """fn's output and the gradients of its inputs (None where not required), inputs passed as
    non-contiguous [B, H, L, D] views."""
    leaves = [t.detach().to(dtype).requires_grad_(need) for t, need in zip(inputs, needs_grad)]
    out = fn(*(t.transpose(1, 2) for t in leaves))
    wanted = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad.to(dtype).transpose(1, 2)))
    return [out, *(next(grads) if t.requires_grad else None for t in leaves)]


def _sdpa(mask, scale=None):
    return lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )


def _ours(mask, scale=None):
    return lambda q, k, v: flash_attention(q, k, v, mask, scale=scale)


@pytest.mark.parametrize("length", [7, 300, 450])  # 450: above FP32_BACKWARD_MAX_LENGTH, the bf16 backward
@pytest.mark.parametrize("mask_kind", ["causal", "per_row", "broadcast"])
def test_bf16_forward_is_torchs_and_gradients_are_at_least_as_close_to_float64(length, mask_kind):
    inputs = _qkv(length)
    mask = {"causal": None, "per_row": _causal_subset_mask(2, length), "broadcast": _causal_subset_mask(1, length)}
    mask = mask[mask_kind]
    scale = None if mask_kind == "causal" else 0.1
    grad = torch.randn(2, length, 8, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = _grads(_sdpa(mask, scale), inputs, grad, torch.float64)
    ours = _grads(_ours(mask, scale), inputs, grad, torch.bfloat16)
    torchs = _grads(_sdpa(mask, scale), inputs, grad, torch.bfloat16)
    assert torch.equal(ours[0], torchs[0])  # the same forward kernel on the same inputs
    for name, o, t, e in zip(("dq", "dk", "dv"), ours[1:], torchs[1:], exact[1:]):
        assert o.dtype == torch.bfloat16 and o.shape == t.shape
        if length > cpu_attention_module.FP32_BACKWARD_MAX_LENGTH:
            assert torch.equal(o, t), name  # torch's own bf16 backward
        else:
            ours_error, torchs_error = (o.double() - e).norm(), (t.double() - e).norm()
            assert ours_error <= 1.05 * torchs_error, (name, ours_error, torchs_error)


@pytest.mark.parametrize("limit, fp32", [(40, True), (39, False)])
def test_fp32_backward_up_to_the_limit_then_torchs_own(monkeypatch, limit, fp32):
    """40 tokens: up to the limit the gradients are those of the fp32 kernel on the bf16 values,
    rounded once; one token past it, those of torch's bf16 backward."""
    monkeypatch.setattr(cpu_attention_module, "FP32_BACKWARD_MAX_LENGTH", limit)
    inputs = [t.to(torch.bfloat16) for t in _qkv(40, batch=1)]
    grad = torch.randn(1, 40, 8, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours = _grads(_ours(None), inputs, grad, torch.bfloat16)
    if fp32:
        q, k, v = (t.transpose(1, 2) for t in inputs)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        upcast = (t.float() for t in (grad.bfloat16().transpose(1, 2), q, k, v, out))
        want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*upcast, lse, 0.0, True)
        want = [g.bfloat16().transpose(1, 2) for g in want]
    else:
        want = _grads(_sdpa(None), inputs, grad, torch.bfloat16)[1:]
    for o, w in zip(ours[1:], want):
        assert torch.equal(o, w)


def test_keys_and_values_without_gradients():
    inputs = _qkv(33)
    grad = torch.randn(2, 33, 8, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = _grads(_ours(None), inputs, grad, torch.bfloat16, needs_grad=(True, False, False))
    torchs = _grads(_sdpa(None), inputs, grad, torch.bfloat16, needs_grad=(True, False, False))
    assert ours[2] is None and ours[3] is None
    exact = _grads(_sdpa(None), inputs, grad, torch.float64)
    assert (ours[1].double() - exact[1]).norm() <= 1.05 * (torchs[1].double() - exact[1]).norm()


def test_takes_only_what_sdpa_would_send_to_its_flash_kernel():
    q, k, v = (t.bfloat16().transpose(1, 2).requires_grad_() for t in _qkv(12, batch=1))
    assert flash_attention_applies(q, k, v, None, enable_gqa=True)
    assert not flash_attention_applies(q, k, v, None, enable_gqa=False)  # 8 vs 4 heads: SDPA refuses
    assert not flash_attention_applies(q.detach(), k, v, None, enable_gqa=True)  # no gradient for q
    assert not flash_attention_applies(q.float(), k.float(), v.float(), None, enable_gqa=True)  # fp32: as it is
    assert not flash_attention_applies(q, k, v, torch.ones(1, 12, 12, dtype=torch.bool), enable_gqa=True)  # 3-D
    assert not flash_attention_applies(q, k, v, torch.zeros(12, 12), enable_gqa=True)  # an additive mask
    assert not flash_attention_applies(q.transpose(-1, -2)[..., :12, :], k, v, None, enable_gqa=True)  # strides
    with sdpa_kernel(SDPBackend.MATH):
        assert not flash_attention_applies(q, k, v, None, enable_gqa=True)
    with torch.no_grad():
        assert not flash_attention_applies(q, k, v, None, enable_gqa=True)


def test_per_document_gradients_match_float64_as_well_as_the_dense_sdpa_path():
    """The prefix-shared rule per document through segments (this backward) and over the whole row
    through one dense boolean mask and torch's SDPA, both in bf16 against float64."""
    documents = torch.tensor([[0] * 12 + [1] * 18])
    branches = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4 + [0] * 6 + [1] * 6 + [2] * 6])
    inputs = _qkv(30, batch=1, heads=4, kv_heads=2, dim=16)
    grad = torch.randn(1, 30, 4, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dense = build_attention_mask(documents, branches, "sdpa")
    segments = build_attention_mask(documents, branches, "segments")
    exact = _grads(_sdpa(dense), inputs, grad, torch.float64)
    ours = _grads(lambda q, k, v: attention(q, k, v, segments, enable_gqa=True), inputs, grad, torch.bfloat16)
    torchs = _grads(_sdpa(dense), inputs, grad, torch.bfloat16)
    for o, t, e in zip(ours, torchs, exact):
        assert (o.double() - e).norm() <= 1.05 * (t.double() - e).norm()


def test_activation_checkpointing_recomputes_the_same_bf16_step():
    """bf16 on the CPU with grouped-query heads: checkpointed blocks give the plain blocks' log-probs
    and gradients exactly (the recomputation runs the same kernels)."""
    torch.manual_seed(0)
    plain = llama(vocab_size=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)
    plain = plain.to(torch.bfloat16)
    checkpointed = copy.deepcopy(plain)
    prepare_blocks(checkpointed, activation_checkpointing=True)
    pairs = [{"prompt_ids": [1, 2, 3, 4, 5], "chosen_ids": [6, 7, 8], "rejected_ids": [9, 10]}]
    results = []
    for model in (plain, checkpointed):
        out = policy_logps(model, collate_preference_pairs(pairs, pad_id=0))
        (out.chosen - 2 * out.rejected).float().sum().backward()
        results.append([out.chosen.detach(), *(p.grad for p in model.parameters())])
    for a, b in zip(*results):
        assert torch.equal(a, b)
