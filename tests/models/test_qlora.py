"""QLoRA: NF4 base weights (torchao), full-precision adapters; checked against the same model
computed with the dequantised weights in plain fp32."""

import pytest
import torch

from dpokit.models import adapter_params, disable_adapter, llama, lora_llama, merged_state_dict
from dpokit.models.lora import LoRALinear, NF4Linear, dequantize, is_nf4

CFG = dict(
    vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=32, rope_theta=10_000.0
)
TARGETS = ("q_proj", "v_proj", "down_proj")


def qlora_and_reference():
    torch.manual_seed(0)
    q = lora_llama(lora_targets=TARGETS, lora_rank=4, lora_alpha=8.0, quantize_base=True, **CFG)
    with torch.no_grad():
        for p in adapter_params(q).values():
            p.normal_(0, 0.2)
    reference = lora_llama(lora_targets=TARGETS, lora_rank=4, lora_alpha=8.0, **CFG)
    reference.load_state_dict({k: dequantize(v) for k, v in q.state_dict().items()})
    return q, reference


def test_frozen_projections_are_nf4_and_adapters_full_precision():
    q, _ = qlora_and_reference()
    layer = q.layers[0]
    for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert is_nf4(module.weight) and not module.weight.requires_grad
    assert isinstance(layer.self_attn.k_proj, NF4Linear) and isinstance(layer.self_attn.q_proj, LoRALinear)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in adapter_params(q).values())
    # NF4 is lossy but close: 4-bit codes with per-block scales
    w = dequantize(layer.mlp.gate_proj.weight)
    assert w.shape == (128, 64)


def test_qlora_forward_equals_dequantised_model_and_adapter_off_is_base():
    q, reference = qlora_and_reference()
    tokens = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(q(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
    with disable_adapter(q), disable_adapter(reference):
        torch.testing.assert_close(q(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
        base_out = q(tokens)
    assert not torch.allclose(q(tokens), base_out, atol=1e-4)
    plain = llama(**CFG)
    plain.load_state_dict(merged_state_dict(q))
    torch.testing.assert_close(plain(tokens), q(tokens), rtol=1e-5, atol=1e-5)


def test_qlora_gradients_reach_only_adapters_and_match_reference():
    q, reference = qlora_and_reference()
    tokens = torch.randint(0, 64, (2, 12))
    q(tokens).square().mean().backward()
    reference(tokens).square().mean().backward()
    ref_params = dict(reference.named_parameters())
    for name, p in q.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6)


def test_qlora_loads_a_checkpoint_quantising_each_weight(tmp_path):
    from dpokit.models import load_hf_checkpoint, save_hf_checkpoint

    torch.manual_seed(1)
    save_hf_checkpoint(llama(**CFG), tmp_path)
    q = load_hf_checkpoint(tmp_path, lora={"lora_targets": TARGETS, "lora_rank": 4}, quantize_base=True)
    full = load_hf_checkpoint(tmp_path)
    assert is_nf4(q.layers[1].mlp.up_proj.weight) and is_nf4(q.layers[1].self_attn.v_proj.weight)
    from dpokit.models.lora import quantize_nf4

    full_state = full.state_dict()
    for key, value in q.state_dict().items():
        if ".lora_" in key:
            continue
        expected = dequantize(quantize_nf4(full_state[key])) if is_nf4(value) else full_state[key]
        assert torch.equal(dequantize(value), expected), key
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        err = (q(tokens) - full(tokens)).abs().max() / full(tokens).abs().max()
    assert 0 < err < 0.3  # quantisation error: present, and moderate


def test_quantize_needs_lora():
    from dpokit.models import model_from_hf_config

    with pytest.raises(ValueError, match="needs LoRA"):
        model_from_hf_config(
            dict(
                model_type="llama",
                vocab_size=64,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=4,
            ),
            quantize_base=True,
        )


def test_cast_base_keeps_nf4_weights_quantised_in_bf16_with_fp32_adapters():
    from dpokit.models import cast_base

    q, _ = qlora_and_reference()
    cast_base(q, torch.bfloat16)
    for name, p in q.named_parameters():
        if is_nf4(p):
            assert p.dtype == torch.bfloat16 and dequantize(p).dtype == torch.bfloat16, name
        else:
            assert p.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name
    assert sum(is_nf4(p) for p in q.parameters()) == 2 * 7 + 1  # every projection, and the output head
    # float64 reference: the same (dequantised) values, computed exactly
    exact = lora_llama(lora_targets=TARGETS, lora_rank=4, lora_alpha=8.0, **CFG).double()
    exact.load_state_dict({k: dequantize(v).double() for k, v in q.state_dict().items()})
    tokens = torch.randint(0, 64, (2, 12))
    expected = exact(tokens)
    torch.testing.assert_close(q(tokens).double(), expected, rtol=0, atol=3e-2 * expected.abs().max().item())
    with disable_adapter(exact):
        assert (exact(tokens) - expected).abs().max() > 0.1 * expected.abs().max()
    merged = merged_state_dict(q)
    assert all(v.dtype == torch.bfloat16 and not is_nf4(v) for v in merged.values())
