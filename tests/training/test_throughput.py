"""The throughput numbers every recipe logs: model FLOPs per token counted against the modules
by hand (full model, LoRA, tied head), and tokens/s / MFU arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpokit.models import lora_tiny, tiny
from dpokit.models.lora import LoRALinear
from dpokit.training.throughput import Throughput, flops_per_token, matmul_weights, peak_memory_gib


def _linear_weights(model: nn.Module) -> tuple[int, int]:
    """(base Linear weight entries, LoRA adapter entries), walking the modules."""
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    adapter_modules = {id(a) for m in lora for a in (m.lora_a, m.lora_b)}
    base = sum(m.weight.numel() for m in lora)
    base += sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in adapter_modules)
    adapters = sum(m.lora_a.weight.numel() + m.lora_b.weight.numel() for m in lora)
    return base, adapters


def test_full_training_counts_6n_for_the_policy_and_2n_for_the_reference():
    model = tiny()
    n, _ = _linear_weights(model)
    assert n == sum(p.numel() for p in matmul_weights(model))  # the embedding table is looked up, not multiplied
    assert flops_per_token(model, reference_forward=True) == 8 * n
    assert flops_per_token(model, reference_forward=False) == 6 * n


def test_lora_counts_4n_for_the_frozen_base_6n_for_adapters_and_the_adapter_off_reference():
    model = lora_tiny(lora_targets=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8.0)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    base, adapters = _linear_weights(model)
    lora_in_linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad
    )
    assert adapters == lora_in_linear > 0
    assert flops_per_token(model, reference_forward=True) == 4 * base + 6 * adapters + 2 * base
    assert flops_per_token(model, reference_forward=False) == 4 * base + 6 * adapters


def test_a_tied_head_is_counted_once_as_a_matmul():
    model, untied_model = tiny(), tiny()
    untied, _ = _linear_weights(model)
    model.lm_head = None  # tied: the embedding is the head (`output_weight`)
    assert sum(p.numel() for p in matmul_weights(model)) == untied  # the same matmuls, one fewer tensor
    assert any(p is model.embed_tokens.weight for p in matmul_weights(model))
    assert not any(p is untied_model.embed_tokens.weight for p in matmul_weights(untied_model))


def test_tokens_per_second_per_device_and_mfu():
    model = tiny()
    meter = Throughput(model, device=torch.device("cpu"), dtype=torch.float32, world_size=4, reference_forward=True)
    meter.peak = 1e12  # the measured CPU peak, fixed for the arithmetic
    out = meter.measure(tokens=8000, seconds=2.0)
    assert out["tokens_per_s"] == 4000 and out["tokens_per_s_per_device"] == 1000
    assert out["mfu"] == pytest.approx(1000 * flops_per_token(model, reference_forward=True) / 1e12, rel=1e-12)
    assert 0 < out["peak_memory_gib"] == pytest.approx(peak_memory_gib(torch.device("cpu")), rel=0.5)
