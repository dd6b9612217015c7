"""LoRA under FSDP2: fresh adapters for a meta-built model, and the merged/adapter tensors of a
sharded LoRA model gathered one module at a time for the final save."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from dpokit.distributed.fsdp import full_tensors
from dpokit.models.lora import LoRALinear, MergeRounding, merge_update


def fresh_adapter_tensors(model: nn.Module, *, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, full tensor) for every LoRA adapter weight, initialised as `LoRALinear.reset_adapter`
    does (A: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B: zeros, so the
    adapted model starts as the base). Seeded, so every rank makes the same tensors and can take
    its own slice. Works on a meta-device model (only names and shapes are read)."""
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            a = torch.empty(tuple(module.lora_a.weight.shape))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            yield f"{name}.lora_a.weight", a
            yield f"{name}.lora_b.weight", torch.zeros(tuple(module.lora_b.weight.shape))


def merged_full_tensors(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    rounding: MergeRounding | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, full CPU tensor) of the equivalent plain model, adapters folded in:
    W' = W + (alpha / rank) B A in fp32, then cast to `dtype` (`merge_update`; `rounding` counts
    the updates the cast drops). Collective (every rank iterates); holds one module's W, A, B."""
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in full_tensors(model):
        module_name, _, leaf = key.rpartition(".")
        owner = module_name.rsplit(".", 1)[0] if module_name.endswith((".lora_a", ".lora_b")) else module_name
        if owner not in lora or leaf == "bias":
            yield key, tensor if dtype is None else tensor.to(dtype)
            continue
        part = module_name.rsplit(".", 1)[-1] if owner != module_name else "weight"
        pending.setdefault(owner, {})[part] = tensor
        parts = pending[owner]
        if len(parts) == 3:
            merged = merge_update(
                parts["weight"],
                parts["lora_a"],
                parts["lora_b"],
                lora[owner].scaling,
                dtype=dtype or parts["weight"].dtype,
                rounding=rounding,
            )
            del pending[owner]
            yield f"{owner}.weight", merged
    if pending:
        raise RuntimeError(f"incomplete LoRA modules in the state dict: {sorted(pending)[:3]}")


def adapter_full_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, gathered (collective; small)."""
    adapters = {}
    for key, value in model.state_dict().items():
        if ".lora_a." in key or ".lora_b." in key:
            adapters[key] = (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().cpu()
    return adapters
