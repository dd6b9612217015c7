"""flash_attention: torch's CPU flash kernel, its backward on fp32 copies for short sequences."""

import pytest
import torch
import torch.nn.functional as F

from dpokit.models import cpu_attention as cpu_attention_module
from dpokit.models.attention import attention, build_attention_mask
from dpokit.models.cpu_attention import flash_attention


def _qkv(length, dtype, *, batch=2, heads=8, kv_heads=4, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim))
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _causal_subset_mask(batch, length, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, 1, length, length, generator=gen) < 0.6
    return (mask & torch.ones(length, length, dtype=torch.bool).tril()) | torch.eye(length, dtype=torch.bool)


def _grads(fn, inputs, grad, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]


def _sdpa(mask, scale=None):
    return lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )


@pytest.mark.parametrize("length", [7, 300, 450])  # 450: above FP32_BACKWARD_MAX_LENGTH, the bf16 backward
@pytest.mark.parametrize("masked", [False, True])
def test_bf16_forward_is_torchs_and_gradients_are_at_least_as_close_to_float64(length, masked):
    inputs = _qkv(length, torch.float64)
    mask = _causal_subset_mask(2, length) if masked else None
    grad = torch.randn(2, 8, length, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = _grads(_sdpa(mask, 0.1), inputs, grad, torch.float64)
    ours = _grads(lambda q, k, v: flash_attention(q, k, v, mask, scale=0.1), inputs, grad, torch.bfloat16)
    torchs = _grads(_sdpa(mask, 0.1), inputs, grad, torch.bfloat16)
    assert torch.equal(ours[0], torchs[0])  # the same forward kernel on the same inputs
    for name, o, t, e in zip(("dq", "dk", "dv"), ours[1:], torchs[1:], exact[1:]):
        assert o.dtype == torch.bfloat16 and o.shape == t.shape
        ours_error, torchs_error = (o.double() - e).abs().max(), (t.double() - e).abs().max()
        if length > cpu_attention_module.FP32_BACKWARD_MAX_LENGTH:
            assert torch.equal(o, t), name  # torch's own bf16 backward
        else:
            assert ours_error <= 1.05 * torchs_error, (name, ours_error, torchs_error)


def test_fp32_backward_is_the_kernels_math_on_exact_copies():
    """Below the threshold the gradients are those of the fp32 kernel on the bf16 values, rounded once."""
    inputs = [t.to(torch.bfloat16) for t in _qkv(40, torch.float64, batch=1)]
    grad = torch.randn(1, 8, 40, 64, dtype=torch.bfloat16)
    ours = _grads(flash_attention, inputs, grad, torch.bfloat16)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*inputs, 0.0, True)
    fp32 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad.float(), *(t.float() for t in inputs), out.float(), lse, 0.0, True
    )
    for o, f in zip(ours[1:], fp32):
        assert torch.equal(o, f.to(torch.bfloat16))


def test_attention_takes_it_for_low_precision_cpu_training_only(monkeypatch):
    calls = []
    original = cpu_attention_module._FlashAttention.apply
    monkeypatch.setattr(cpu_attention_module._FlashAttention, "apply", lambda *a: calls.append(1) or original(*a))
    documents = torch.tensor([[0] * 5 + [1] * 7])
    segments = build_attention_mask(documents, torch.zeros_like(documents), "segments")
    for dtype, grad, expected in ((torch.bfloat16, True, 2), (torch.bfloat16, False, 0), (torch.float32, True, 0)):
        calls.clear()
        q, k, v = (t.to(dtype).requires_grad_(grad) for t in _qkv(12, torch.float64, batch=1, heads=4, kv_heads=2))
        with torch.set_grad_enabled(grad):
            out = attention(q, k, v, segments, enable_gqa=True)
        assert len(calls) == expected, dtype  # one call per document when it applies
        if grad:
            out.float().sum().backward()
            assert q.grad is not None and k.grad.shape == k.shape


def test_per_document_gradients_equal_the_dense_mask_path_in_bf16():
    """The prefix-shared rule through segments (this backward, per document) and through one dense
    boolean mask over the whole row (torch's SDPA, 30 tokens): bf16 gradients within bf16 rounding."""
    documents = torch.tensor([[0] * 12 + [1] * 18])
    branches = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4 + [0] * 6 + [1] * 6 + [2] * 6])
    inputs = _qkv(30, torch.float64, batch=1, heads=4, kv_heads=2, dim=16)
    grad = torch.randn(1, 4, 30, 16, dtype=torch.float64)
    results = {}
    for backend in ("segments", "sdpa"):
        mask = build_attention_mask(documents, branches, backend)
        results[backend] = _grads(
            lambda q, k, v: attention(q, k, v, mask, enable_gqa=True), inputs, grad, torch.bfloat16
        )
    for a, b in zip(results["segments"], results["sdpa"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
