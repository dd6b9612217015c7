import copy
import json

import pytest
import torch

from dpokit.models import (
    LoRALinear,
    adapter_params,
    adapter_state_dict,
    cast_base,
    disable_adapter,
    llama,
    load_adapter_state_dict,
    load_peft_adapter,
    lora_llama,
    merged_state_dict,
    save_hf_checkpoint,
    save_peft_adapter,
)

CFG = dict(
    vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32, rope_theta=10_000.0
)
TARGETS = ("q_proj", "v_proj", "down_proj", "lm_head")


def base_and_lora():
    base = llama(**CFG)
    lora = lora_llama(lora_targets=TARGETS, lora_rank=4, lora_alpha=8.0, **CFG)
    missing, unexpected = lora.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)
    return base, lora


def randomize_adapters(model):
    with torch.no_grad():
        for p in adapter_params(model).values():
            p.normal_(0, 0.2)


def test_fresh_lora_model_equals_base():
    base, lora = base_and_lora()
    tokens = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(lora(tokens), base(tokens), rtol=0, atol=0)


def test_adapters_off_equals_base_exactly_and_on_differs():
    base, lora = base_and_lora()
    randomize_adapters(lora)
    tokens = torch.randint(0, 40, (2, 7))
    with disable_adapter(lora):
        assert torch.equal(lora(tokens), base(tokens))
    assert not torch.allclose(lora(tokens), base(tokens), atol=1e-4)
    assert all(m.adapter_enabled for m in lora.modules() if isinstance(m, LoRALinear))


def test_disable_adapter_restores_even_on_error():
    _, lora = base_and_lora()
    with pytest.raises(RuntimeError):
        with disable_adapter(lora):
            raise RuntimeError("boom")
    assert all(m.adapter_enabled for m in lora.modules() if isinstance(m, LoRALinear))


def test_only_adapters_are_trainable():
    _, lora = base_and_lora()
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(lora)) and trainable
    assert len(trainable) == 2 * (2 * 3 + 1)  # A and B on 3 targets per layer + lm_head


def test_merged_weights_reproduce_adapted_model():
    base, lora = base_and_lora()
    randomize_adapters(lora)
    base.load_state_dict(merged_state_dict(lora))
    tokens = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(base(tokens), lora(tokens), rtol=1e-5, atol=1e-5)


def test_adapter_state_dict_round_trip_and_strictness():
    _, a = base_and_lora()
    _, b = base_and_lora()
    randomize_adapters(a)
    load_adapter_state_dict(b, adapter_state_dict(a))
    for name, p in adapter_params(b).items():
        assert torch.equal(p, adapter_params(a)[name])
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state_dict(b, {})


def test_lora_gradient_reaches_only_adapters():
    _, lora = base_and_lora()
    randomize_adapters(lora)
    lora(torch.randint(0, 40, (2, 7))).sum().backward()
    for name, p in lora.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name


def test_unknown_target_and_tied_head_are_refused():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora_llama(lora_targets=("qproj",), **CFG)
    with pytest.raises(ValueError, match="ties"):
        lora_llama(lora_targets=("lm_head",), **{**CFG, "tie_embeddings": True})


# ----------------------------------------------------------------------------------------------
# Mixed precision: bf16 frozen base, fp32 adapters (`cast_base`).


def mixed_precision_lora():
    """A LoRA model with random adapters, cast to a bf16 base with fp32 adapters. The adapter values
    are bf16-representable, so the same model in any dtype starts from identical values."""
    _, lora = base_and_lora()
    randomize_adapters(lora)
    with torch.no_grad():
        for p in adapter_params(lora).values():
            p.copy_(p.to(torch.bfloat16))
    return cast_base(lora, torch.bfloat16)


def test_cast_base_puts_the_base_in_bf16_and_keeps_adapters_and_buffers_fp32():
    model = mixed_precision_lora()
    adapters = adapter_params(model)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name in adapters else torch.bfloat16), name
        assert p.requires_grad == (name in adapters), name
    assert model.inv_freq.dtype == torch.float32  # RoPE frequencies are not rounded to bf16


def test_lora_linear_bf16_input_fp32_adapter_matches_float64():
    layer = LoRALinear(32, 24, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_b.weight.normal_(0, 0.2)
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.bfloat16), requires_grad=False)
    x = torch.randn(5, 32).to(torch.bfloat16)
    out = layer(x)
    out.float().square().sum().backward()

    x64, w64 = x.double(), layer.weight.double()
    a64 = layer.lora_a.weight.detach().double().requires_grad_(True)
    b64 = layer.lora_b.weight.detach().double().requires_grad_(True)
    expected = x64 @ w64.T + layer.scaling * (x64 @ a64.T) @ b64.T
    expected.square().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.lora_a.weight.grad.dtype == torch.float32
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=0, atol=2e-2 * scale)
    for grad, grad64 in ((layer.lora_a.weight.grad, a64.grad), (layer.lora_b.weight.grad, b64.grad)):
        torch.testing.assert_close(grad.double(), grad64, rtol=0, atol=2e-2 * grad64.abs().max().item())
    # the adapter's share of the output is far above that tolerance: the comparison sees it
    assert (expected - x64 @ w64.T).abs().max() > 0.2 * scale


def test_bf16_base_fp32_adapter_model_matches_float64():
    model = mixed_precision_lora()
    exact = copy.deepcopy(model).double()  # the same values, computed in float64
    tokens = torch.randint(0, 40, (2, 7))
    out = model(tokens)
    expected = exact(tokens)
    tolerance = 3e-2 * expected.abs().max().item()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tolerance)
    with disable_adapter(exact):
        assert (exact(tokens) - expected).abs().max() > 5 * tolerance  # the adapters do contribute


def adamw_displacement(model, tokens, steps=10, lr=1e-5):
    """How far `steps` AdamW steps at `lr` move each adapter weight (as float64)."""
    params = adapter_params(model)
    start = {name: p.detach().double().clone() for name, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        logits = model(tokens[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.cat([(p.detach().double() - start[name]).flatten() for name, p in params.items()])


def test_fp32_adapters_keep_small_adamw_updates_that_bf16_adapters_lose():
    tokens = torch.randint(0, 40, (4, 12))
    steps, lr = 10, 1e-5
    mixed = mixed_precision_lora()
    exact = cast_base(copy.deepcopy(mixed), torch.bfloat16, trainable_dtype=torch.float64)  # reference
    all_bf16 = copy.deepcopy(mixed).to(torch.bfloat16)  # what casting the whole model does
    moved64 = adamw_displacement(exact, tokens, steps, lr)
    moved32 = adamw_displacement(mixed, tokens, steps, lr)
    moved16 = adamw_displacement(all_bf16, tokens, steps, lr)
    assert moved64.abs().mean() > 0.5 * steps * lr  # Adam moves each weight by about lr per step
    torch.testing.assert_close(moved32, moved64, rtol=1e-3, atol=1e-3 * steps * lr)
    # bf16 adapters: an update of 1e-5 on a weight of ~0.1 is below half a bf16 ulp and vanishes
    assert (moved16 == 0).double().mean() > 0.9
    assert (moved16 - moved64).norm() > 0.8 * moved64.norm()


def test_mixed_precision_checkpoint_merges_and_round_trips(tmp_path):
    model = mixed_precision_lora()
    merged = merged_state_dict(model)
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    q = model.layers[0].self_attn.q_proj
    expected = q.weight.double() + q.scaling * q.lora_b.weight.double() @ q.lora_a.weight.double()
    torch.testing.assert_close(merged["layers.0.self_attn.q_proj.weight"].double(), expected, rtol=2**-8, atol=0)
    plain = llama(**CFG).to(torch.bfloat16)
    plain.load_state_dict(merged)
    tokens = torch.randint(0, 40, (2, 7))
    reference = model(tokens).double()
    torch.testing.assert_close(plain(tokens).double(), reference, rtol=0, atol=3e-2 * reference.abs().max().item())

    save_hf_checkpoint(model, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    save_peft_adapter(model, tmp_path / "adapter")
    fresh = cast_base(base_and_lora()[1], torch.bfloat16)
    load_peft_adapter(fresh, tmp_path / "adapter")
    for name, p in adapter_params(fresh).items():
        assert p.dtype == torch.float32 and torch.equal(p, adapter_params(model)[name]), name
