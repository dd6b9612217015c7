"""Final checkpoints: safetensors weights plus, for LoRA models, the adapter in PEFT layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dpokit.models.lora import LoRALinear, adapter_state_dict, merged_state_dict


def hf_key(key: str) -> str:
    """Our parameter name -> the Hugging Face Llama/Qwen2 name (the decoder body sits under `model.`)."""
    return key if key.startswith("lm_head.") else f"model.{key}"


def peft_key(key: str) -> str:
    """`layers.0.self_attn.q_proj.lora_a.weight` -> PEFT's
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    key = key.replace(".lora_a.", ".lora_A.").replace(".lora_b.", ".lora_B.")
    return f"base_model.model.{hf_key(key)}"


def lora_config(model: nn.Module) -> dict:
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not modules:
        raise ValueError("the model has no LoRA adapters")
    ranks = {m.rank for _, m in modules}
    alphas = {m.alpha for _, m in modules}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"mixed LoRA ranks/alphas are not supported in one adapter: {ranks}, {alphas}")
    dropout = next(iter(m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for _, m in modules))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": ranks.pop(),
        "lora_alpha": alphas.pop(),
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def save_lora_checkpoint(model: nn.Module, directory: str | Path) -> Path:
    """Writes `model.safetensors` (adapters merged into the base weights, HF key names),
    `adapter_model.safetensors` + `adapter_config.json` (the adapter alone, PEFT key names)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merged = {hf_key(k): v for k, v in merged_state_dict(model).items()}
    save_file(_contiguous(merged), directory / "model.safetensors", metadata={"format": "pt"})
    adapter = {peft_key(k): v for k, v in adapter_state_dict(model).items()}
    save_file(_contiguous(adapter), directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(lora_config(model), indent=2) + "\n")
    return directory
