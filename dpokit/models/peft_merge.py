"""Start from an SFT adapter: a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors,
as `peft`'s `save_pretrained` writes it) merged into the base weights as they are read.

For each targeted weight W (out x in) with PEFT's A (r x in) and B (out x r):

    W' = W + s * B @ A,   s = lora_alpha / r   (or lora_alpha / sqrt(r) with use_rslora)

computed in fp32 and cast back to W's dtype. Merging (rather than stacking a second adapter)
makes base + SFT the model's frozen weights, so the DPO reference (the adapters-off model) is
base + SFT exactly, and the DPO adapters start from zero on top of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from dpokit.models.hf_config import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Initialisations that move part of the base into the adapter: merging them into the original base is wrong.
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "eva")


@dataclass
class LoraUpdate:
    """One targeted weight's A (r x in), B (out x r) and scale; the dense update is made only when
    that weight streams past, so a whole model's updates are never held at once."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W + s * B @ A in fp32, in W's dtype."""
        return (weight.float() + self.scale * (self.b.float() @ self.a.float())).to(weight.dtype)


def read_lora_updates(adapter_dir: str | Path) -> dict[str, LoraUpdate]:
    """{HF weight name: its LoraUpdate} of a PEFT LoRA adapter folder; refuses what a plain merge
    would get wrong (DoRA, per-module rank or alpha patterns, trained biases, extra modules,
    fan-in/fan-out layouts, initialisations that change the base)."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_CONFIG} (expected a PEFT LoRA adapter folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {config.get('peft_type')!r}; only LORA adapters can be merged")
    refused = {
        "use_dora": bool(config.get("use_dora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "bias": config.get("bias", "none") != "none",
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "init_lora_weights": str(config.get("init_lora_weights", "")).lower().startswith(RESIDUAL_INITS),
    }
    for name, bad in refused.items():
        if bad:
            raise CheckpointError(f"{config_path}: {name}={config[name]!r} is not supported (a plain LoRA merge)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{config_path}: r={rank!r}, lora_alpha={alpha!r}: expected a rank >= 1 and a number")
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    if not weights_path.is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({e})") from None

    updates: dict[str, LoraUpdate] = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise CheckpointError(f"{weights_path}: unexpected tensor {key!r} (only lora_A / lora_B are merged)")
            continue
        module = key.removesuffix(".lora_A.weight")
        b_key = f"{module}.lora_B.weight"
        if b_key not in tensors:
            raise CheckpointError(f"{weights_path}: {key} has no {b_key}")
        a, b = tensors[key], tensors[b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{weights_path}: {key} {tuple(a.shape)} and {b_key} {tuple(b.shape)} do not chain")
        updates[f"{module.removeprefix(PEFT_PREFIX)}.weight"] = LoraUpdate(a, b, scale)
    if not updates:
        raise CheckpointError(f"{weights_path}: no LoRA weights in it")
    return updates


def merge_lora_updates(
    weights: Iterator[tuple[str, torch.Tensor]], updates: dict[str, LoraUpdate], *, hf_key, source: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """The (our key, tensor) stream with each targeted weight replaced by W + update (see the
    module docstring); `hf_key` maps our key to the HF name the adapter uses. Every update must
    find its weight (an adapter for another model is an error naming the first stray module)."""
    left = dict(updates)
    for key, tensor in weights:
        update = left.pop(hf_key(key), None)
        if update is not None:
            if tuple(update.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{source}: the adapter's update of {hf_key(key)} is {tuple(update.shape)}, the weight {tuple(tensor.shape)}"
                )
            tensor = update.apply(tensor)
        yield key, tensor
    if left:
        raise CheckpointError(f"{source}: adapter weights for modules the model lacks: {sorted(left)[:4]}")
