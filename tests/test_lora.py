import pytest
import torch

from dpokit.models import (
    LoRALinear,
    adapter_params,
    adapter_state_dict,
    disable_adapter,
    llama,
    load_adapter_state_dict,
    lora_llama,
    merged_state_dict,
)

CFG = dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32,
           rope_theta=10_000.0)
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
