import math

import pytest
import torch

from dpokit.models import llama, tiny
from dpokit.models.transformer import RMSNorm, RopeScaling, apply_rope, rope_inverse_frequencies


def small(**kw):
    cfg = dict(
        vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64, rope_theta=10_000.0
    )
    cfg.update(kw)
    return llama(**cfg)


def test_logits_shape_and_causality():
    model = small()
    tokens = torch.randint(0, 50, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 50)
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    torch.testing.assert_close(model(changed)[:, :8], logits[:, :8])
    assert not torch.allclose(model(changed)[:, 8:], logits[:, 8:])


def test_explicit_positions_and_mask_match_default_causal_path():
    model = small()
    tokens = torch.randint(0, 50, (2, 10))
    positions = torch.arange(10).expand(2, 10)
    mask = torch.ones(10, 10, dtype=torch.bool).tril().expand(2, 1, 10, 10)
    torch.testing.assert_close(model(tokens, positions, mask), model(tokens), rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = small(n_heads=4, n_kv_heads=2)
    mha = small(n_heads=4, n_kv_heads=4)
    state = gqa.state_dict()
    head_dim = 8
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            w = state[f"layers.{i}.self_attn.{name}.weight"].view(2, head_dim, 32)
            state[f"layers.{i}.self_attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(mha(tokens), gqa(tokens), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_the_output_matrix():
    model = small(tie_embeddings=True)
    assert model.lm_head is None and model.output_weight is model.embed_tokens.weight
    assert "lm_head.weight" not in model.state_dict()
    hidden = model.hidden_states(torch.randint(0, 50, (1, 5)))
    torch.testing.assert_close(model.project(hidden), hidden @ model.embed_tokens.weight.T)


def test_rope_is_a_rotation_that_depends_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    inv = rope_inverse_frequencies(16, 10_000.0)

    def rotate(x, pos):
        angles = torch.cat([pos * inv, pos * inv])[None, None, None]
        return apply_rope(x, angles.cos(), angles.sin())

    torch.testing.assert_close(rotate(q, 3).norm(), q.norm())
    dot = lambda a, b: (rotate(q, a) * rotate(k, b)).sum()  # noqa: E731
    torch.testing.assert_close(dot(7, 4), dot(13, 10), rtol=1e-5, atol=1e-5)


def test_llama31_rope_scaling_keeps_high_frequencies_and_slows_low_ones():
    base = rope_inverse_frequencies(128, 500_000.0)
    scaled = rope_inverse_frequencies(128, 500_000.0, RopeScaling(factor=8.0))
    wavelen = 2 * math.pi / base
    torch.testing.assert_close(scaled[wavelen < 8192 / 4], base[wavelen < 8192 / 4])
    torch.testing.assert_close(scaled[wavelen > 8192], base[wavelen > 8192] / 8)


def test_tiny_preset_is_small():
    model = tiny()
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_bad_head_counts_are_refused():
    with pytest.raises(ValueError, match="multiple"):
        small(n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_the_fp32_formula_rounded_once_with_gradients_as_precise(dtype):
    """Llama's RMSNorm: weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype). The output is
    exactly that formula's; fp32 gradients are the formula's exactly, bf16 gradients at least as
    close to float64 as the formula's autograd gives."""
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(3, 37, 96, generator=gen, dtype=torch.float64) * 3
    w64 = torch.randn(96, generator=gen, dtype=torch.float64) * 0.1 + 1
    grad = torch.randn(3, 37, 96, generator=gen, dtype=torch.float64)

    def formula(x, w):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)

    def run(fn, dt):
        x, w = x64.to(dt).requires_grad_(), w64.to(dt).requires_grad_()
        out = fn(x, w)
        return [out, *torch.autograd.grad(out, (x, w), grad.to(dt))]

    norm = RMSNorm(96, eps=1e-5)

    def module(x, w):
        return torch.func.functional_call(norm, {"weight": w}, (x,))

    exact = run(formula, torch.float64)
    ours, theirs = run(module, dtype), run(formula, dtype)
    assert torch.equal(ours[0], theirs[0])
    if dtype == torch.float32:
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
    else:
        for a, b, e in zip(ours[1:], theirs[1:], exact[1:]):
            assert (a.double() - e).norm() <= 1.05 * (b.double() - e).norm()
