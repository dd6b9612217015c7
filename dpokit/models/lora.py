"""LoRA: low-rank adapters on frozen linear layers (Hu et al., 2021, arXiv:2106.09685).

    y = x W^T (+ b) + (alpha / rank) * dropout(x) A^T B^T,   A: [rank, in], B: [out, rank]

B starts at zero, so a freshly adapted model computes exactly what the base model computes.
`disable_adapter(model)` switches every adapter off at once; the LoRA recipes use the same model
with adapters off as the DPO reference policy, so no second copy of the weights exists.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314): with `quantize_base=True` every frozen projection
weight (the base of each LoRALinear and the non-adapted projections, `NF4Linear`) is stored as a
torchao NF4 tensor (4-bit NormalFloat, blocks of 64 with double-quantised scales) and
dequantised on the fly inside the matmul; the adapters stay in full precision. Quantisation
happens when a weight is set (`set_base_weight`), so a checkpoint loader that builds the model on
the meta device quantises each tensor as it arrives and never holds the whole model in bf16.

Mixed precision (`cast_base`): the frozen base in bf16 and the trainable adapters in fp32. An AdamW
step of about lr (1e-5 .. 1e-4) on a bf16 weight of size ~0.1 is below half a bf16 ulp (~2.4e-4)
and is rounded away, so bf16 adapters barely train. The adapter path computes in the activations'
dtype, casting the fp32 adapter weights on the fly as `torch.autocast` does: the fp32 weights keep
every update while activations are never copied to fp32.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# torchao is imported only when something is quantised: importing it costs seconds and prints
# warnings about optional CUDA kernels on CPU-only machines.
_NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"


def _nf4():
    # `torchao.quantization.quantize_` is also a function name, so `import a.b as m` cannot be used.
    return importlib.import_module(_NF4_MODULE)


def is_nf4(tensor: torch.Tensor) -> bool:
    module = sys.modules.get(_NF4_MODULE)  # no NF4 tensor can exist before torchao is imported
    return module is not None and isinstance(tensor, module.NF4Tensor)


# Projection names a LoRA builder may target (the HF module names of the decoder).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS + ("lm_head",)


NF4_BLOCK_SIZE = 64  # weights per 4-bit block (one absmax scale each)
NF4_SCALER_BLOCK_SIZE = 256  # scales per double-quantisation block


def quantize_nf4(weight: torch.Tensor) -> torch.Tensor:
    """weight -> NF4 (QLoRA's defaults: blocks of 64, scales double-quantised in blocks of 256).

    A matrix whose block count is not a multiple of 256 (only tiny test models) uses the largest
    scaler block that divides it instead of failing.
    """
    if weight.numel() % NF4_BLOCK_SIZE:
        raise ValueError(f"NF4 needs a weight with a multiple of {NF4_BLOCK_SIZE} elements, got {tuple(weight.shape)}")
    scaler_block = math.gcd(weight.numel() // NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
    return _nf4().to_nf4(weight.detach(), NF4_BLOCK_SIZE, scaler_block)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a plain or NF4 weight."""
    return weight.get_original_weight() if is_nf4(weight) else weight


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = _nf4().linear_nf4(x, weight) if is_nf4(weight) else F.linear(x, weight)
    return out if bias is None else out + bias


class _FrozenBase:
    """What a layer with a frozen, possibly NF4, `weight` shares: setting that weight."""

    quantize_base: bool
    weight: nn.Parameter

    def set_base_weight(self, tensor: torch.Tensor) -> None:
        """Replace the frozen weight (quantising it to NF4 when the layer is a QLoRA layer)."""
        if tuple(tensor.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(tensor.shape)} != {(self.out_features, self.in_features)}")
        value = quantize_nf4(tensor) if self.quantize_base else tensor.detach()
        self.weight = nn.Parameter(value, requires_grad=False)


class NF4Linear(_FrozenBase, nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (the non-adapted projections of QLoRA)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.quantize_base = in_features, out_features, True
        plain = nn.Linear(in_features, out_features, bias=bias)  # same init as an unquantised layer
        self.bias = nn.Parameter(plain.bias.detach(), requires_grad=False) if bias else None
        if plain.weight.is_meta:
            self.weight = nn.Parameter(plain.weight.detach(), requires_grad=False)
        else:
            self.set_base_weight(plain.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)

    def projection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, W) with x @ W^T equal to this layer's output (no bias), W dequantised."""
        return x, dequantize(self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4"


class LoRALinear(_FrozenBase, nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    The frozen weight keeps the name `weight` (and `bias`), so a base checkpoint loads into a LoRA
    model with the same keys; the adapter lives in `lora_a` / `lora_b`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        quantize_base: bool = False,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, alpha
        self.quantize_base = quantize_base
        self.scaling = alpha / rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.lora_a = nn.Linear(in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if is_nf4(self.weight):
            raise RuntimeError("cannot re-initialise an NF4 base weight; set it with set_base_weight")
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_adapter()
        if self.quantize_base and not self.weight.is_meta:
            self.set_base_weight(self.weight)

    def reset_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = frozen_linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return out
        return out + F.linear(self.adapter_down(x), self.lora_b.weight.to(x.dtype))

    def projection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x', W') with x' @ W'^T equal to this layer's output (no bias): with the adapter on,
        x W^T + s (x A^T) B^T = [x, s x A^T] @ [W, B]^T, so the hidden states widen by the rank and
        the weight by B (gradients reach A and B through the concatenations); off, plain W."""
        weight = dequantize(self.weight)
        if not self.adapter_enabled:
            return x, weight
        low_rank = self.adapter_down(x)  # in x's dtype, whatever the adapter's
        return torch.cat([x, low_rank], -1), torch.cat([weight, self.lora_b.weight.to(weight.dtype)], 1)

    def adapter_down(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / rank) * dropout(x) A^T, [..., rank] in x's dtype (A is cast, not x: see module doc)."""
        return self.scaling * F.linear(self.dropout(x), self.lora_a.weight.to(x.dtype))

    def merged_weight(
        self,
        *,
        base: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        rounding: MergeRounding | None = None,
    ) -> torch.Tensor:
        """W + (alpha / rank) B A, the weight of the equivalent plain linear layer (see `merge_update`).

        base: W at a higher precision than the module holds (the checkpoint's stored weight), else
        the module's own (dequantised when NF4). dtype: of the result, default W's dtype."""
        base = dequantize(self.weight) if base is None else base
        return merge_update(
            base, self.lora_a.weight, self.lora_b.weight, self.scaling, dtype=dtype or base.dtype, rounding=rounding
        )

    def extra_repr(self) -> str:
        nf4 = ", nf4" if self.quantize_base else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}{nf4}"


def lora_linear_factory(targets, rank: int, alpha: float, dropout: float = 0.0, quantize_base: bool = False):
    """A `LinearFactory` for the decoder: LoRALinear for projections named in `targets`; with
    `quantize_base` (QLoRA) the other projections are frozen `NF4Linear`s."""
    unknown = set(targets) - set(ALL_PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {list(ALL_PROJECTIONS)}")
    targets = frozenset(targets)

    def make(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if name in targets:
            return LoRALinear(in_features, out_features, rank, alpha, dropout, bias, quantize_base)
        if quantize_base:
            return NF4Linear(in_features, out_features, bias)
        return nn.Linear(in_features, out_features, bias=bias)

    return make


def check_targets_exist(model: nn.Module, targets) -> None:
    """Every LoRA target must name a projection this model has (Phi-3 has `qkv_proj`, not `q_proj`)."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - present)
    if missing:
        have = [p for p in ALL_PROJECTIONS if p in present]
        raise ValueError(f"LoRA target(s) {missing} are not projections of this model; it has {have}")


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


def cast_base(model: nn.Module, dtype: torch.dtype, *, trainable_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Mixed-precision LoRA in place: frozen parameters (the base, NF4 ones included) to `dtype`,
    trainable ones (the adapters) to `trainable_dtype`, so optimizer updates are not rounded away.

    Buffers keep their dtype (the RoPE frequencies stay fp32). A parameter already in its target
    dtype is not touched, so adapters loaded in fp32 never round-trip through `dtype`, and NF4
    weights quantised from a `dtype` checkpoint stay as they are. Call it before building the
    optimizer: a cast parameter is a new `nn.Parameter`. Returns `model`.
    """
    cast: dict[int, nn.Parameter] = {}  # tied parameters stay tied
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in cast:
                target = trainable_dtype if param.requires_grad else dtype
                same = param.dtype == target or not param.is_floating_point()
                cast[id(param)] = param if same else nn.Parameter(_cast(param.detach(), target), param.requires_grad)
            if cast[id(param)] is not param:
                setattr(module, name, cast[id(param)])
    return model


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if is_nf4(tensor):  # torchao's NF4 `.to(dtype)` dequantises: re-quantise its values in `dtype`
        return quantize_nf4(dequantize(tensor).to(dtype))
    return tensor.to(dtype)


def parameter_summary(model: nn.Module) -> str:
    """'N parameters, M trainable (dtypes)[, K in NF4]': what a recipe prints about its model."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in trainable}))
    total, nf4 = sum(p.numel() for p in params), sum(p.numel() for p in params if is_nf4(p))
    summary = f"{total:,} parameters, {sum(p.numel() for p in trainable):,} trainable ({dtypes})"
    return summary + (f", {nf4:,} in NF4" if nf4 else "")


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


@dataclass
class MergeRounding:
    """What casting merged weights W + ΔW to the saved dtype did to the adapters' update ΔW,
    counted entry by entry over the adapted weights."""

    updated: int = 0  # entries with ΔW != 0
    dropped: int = 0  # of those, entries saved equal to W itself: the update rounded away

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / self.updated if self.updated else 0.0

    def summary(self, dtype: torch.dtype) -> str:
        name = str(dtype).removeprefix("torch.")
        return (
            f"merged model ({name}): {self.dropped:,} of {self.updated:,} updated weight entries "
            f"({self.dropped_fraction:.1%}) rounded back to the base value"
        )


def merge_update(
    base: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    dtype: torch.dtype,
    rounding: MergeRounding | None = None,
) -> torch.Tensor:
    """W' = W + scaling * B A computed in fp32, then cast to `dtype`. With `rounding`, counts the
    entries whose update is nonzero and those where the cast gives back W's own value."""
    base = base.float()
    delta = scaling * (lora_b.float() @ lora_a.float())
    merged = (base + delta).to(dtype)
    if rounding is not None:
        updated = delta != 0
        rounding.updated += int(updated.sum())
        rounding.dropped += int((updated & (merged == base.to(dtype))).sum())
    return merged


def merged_state_dict(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    base_weights: Callable[[str], torch.Tensor | None] | None = None,
    rounding: MergeRounding | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict of the equivalent plain model: adapters folded into the base weights
    (NF4 base weights are dequantised first), in `dtype` (None: each weight's own dtype).

    base_weights(key): the frozen weight as stored at a higher precision (e.g. the fp32
    checkpoint the model was loaded from and cast to bf16), or None to use the model's own. The
    stored value is used only where it rounds to what the model holds (NF4 weights: where the
    shapes agree), so the result is the stored base plus the trained update: what PEFT's
    `merge_and_unload` of the stored base and the adapter gives."""

    def base_of(key: str, held: torch.Tensor) -> torch.Tensor:
        stored = base_weights(key) if base_weights is not None else None
        if stored is None or stored.shape != held.shape:
            return dequantize(held)
        if is_nf4(held) or torch.equal(stored.to(held.dtype), held):
            return stored
        return dequantize(held)

    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            key = f"{name}.weight"
            merged[key] = module.merged_weight(base=base_of(key, module.weight), dtype=dtype, rounding=rounding)
    for key, value in model.state_dict().items():
        if ".lora_a." in key or ".lora_b." in key or key in merged:
            continue
        value = base_of(key, value)
        merged[key] = value if dtype is None else value.to(dtype)
    return {k: merged[k] for k in sorted(merged)}
