"""LoRA: low-rank adapters on frozen linear layers (Hu et al., 2021, arXiv:2106.09685).

    y = x W^T (+ b) + (alpha / rank) * dropout(x) A^T B^T,   A: [rank, in], B: [out, rank]

B starts at zero, so a freshly adapted model computes exactly what the base model computes.
`disable_adapter(model)` switches every adapter off at once; the LoRA recipes use the same model
with adapters off as the DPO reference policy, so no second copy of the weights exists.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Projection names a LoRA builder may target (the HF module names of the decoder).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS + ("lm_head",)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    The frozen weight keeps the name `weight` (and `bias`), so a base checkpoint loads into a LoRA
    model with the same keys; the adapter lives in `lora_a` / `lora_b`.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0, bias: bool = False
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, alpha
        self.scaling = alpha / rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.lora_a = nn.Linear(in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_adapter()

    def reset_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return out
        return out + self.scaling * self.lora_b(self.lora_a(self.dropout(x)))

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / rank) B A, the weight of the equivalent plain linear layer."""
        delta = self.lora_b.weight.float() @ self.lora_a.weight.float()
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def lora_linear_factory(targets, rank: int, alpha: float, dropout: float = 0.0):
    """A `LinearFactory` for the decoder: LoRALinear for projections named in `targets`."""
    unknown = set(targets) - set(ALL_PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {list(ALL_PROJECTIONS)}")
    targets = frozenset(targets)

    def make(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if name in targets:
            return LoRALinear(in_features, out_features, rank, alpha, dropout, bias)
        return nn.Linear(in_features, out_features, bias=bias)

    return make


def lora_modules(model: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in model.modules() if isinstance(m, LoRALinear))


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every LoRA adapter weight in the model."""
    return {name: p for name, p in model.named_parameters() if ".lora_a." in name or ".lora_b." in name}


def set_trainable_params(model: nn.Module, trainable: dict[str, nn.Parameter] | None = None) -> int:
    """Freeze everything except `trainable` (default: the adapters). Returns the trainable count."""
    trainable = adapter_params(model) if trainable is None else trainable
    if not trainable:
        raise ValueError("no trainable parameters: the model has no LoRA adapters")
    keep = {id(p) for p in trainable.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in trainable.values())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in adapter_params(model).items()}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapter weights strictly: every adapter filled, no extra key."""
    params = adapter_params(model)
    missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
    if missing or unexpected:
        raise KeyError(f"adapter state dict mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state_dict[name])


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Run `model` as its base model: every LoRA adapter contributes nothing inside the block."""
    modules = list(lora_modules(model))
    previous = [m.adapter_enabled for m in modules]
    for m in modules:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.adapter_enabled = state


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the equivalent plain model: adapters folded into the base weights."""
    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            merged[f"{name}.weight"] = module.merged_weight()
    for key, value in model.state_dict().items():
        if ".lora_a." in key or ".lora_b." in key or key in merged:
            continue
        merged[key] = value
    return {k: merged[k] for k in sorted(merged)}
