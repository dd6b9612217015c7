"""Throughput and memory numbers of a training step: tokens/s per device, peak memory, and an
MFU estimate (model FLOPs per second over the device's peak).

Model FLOPs per token, counting every matmul weight W (numel |W|) once, attention excluded:
    trained weight  6|W|  (forward 2, input gradient 2, weight gradient 2)
    frozen weight   4|W|  (forward 2, input gradient 2: adapters or earlier layers still need it)
    reference       2|W|  per token for every weight, when the reference runs a forward
so full DPO costs 6N + 2N per token and LoRA DPO 4N + 6n + 2N (n adapter weights). N counts the
active weights: an MoE expert multiplies top_k / n_experts of the tokens. Attention's
own FLOPs (4 * layers * heads * head_dim * context per token) are left out, so the estimate is
low for long sequences. The peak is the dense bf16 / fp16 tensor-core figure of known CUDA
devices (others: no MFU), or, on CPU, a matmul measured once at the start in the training dtype
by each process with its own threads (its share of the machine).
"""

from __future__ import annotations

import resource
import sys
import time

import torch
from torch import nn

from dpokit.models.moe import active_parameter_fractions

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of the CUDA device name.
CUDA_BF16_PEAK = {  # most specific name first
    "B200": 2.25e15,
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def matmul_weights(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a forward multiplies with (2-D and up), each once (a tied head counts once as
    the head); embedding tables are looked up, not multiplied, unless they are the tied head."""
    head = getattr(model, "output_weight", None)  # the decoder's property (the embedding when tied)
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen, out = set(), []
    for p in model.parameters():
        if id(p) in seen or p.dim() < 2 or (id(p) in lookups and p is not head):
            continue
        seen.add(id(p))
        out.append(p)
    return out


def flops_per_token(model: nn.Module, *, reference_forward: bool) -> float:
    """Model FLOPs of one trained token (see the module docstring)."""
    adapters = {id(p) for name, p in model.named_parameters() if "lora_" in name}
    active = active_parameter_fractions(model)  # MoE experts: top_k / n_experts of the tokens each
    total = 0.0
    for p in matmul_weights(model):
        used = p.numel() * active.get(id(p), 1.0)
        total += (6 if p.requires_grad else 4) * used
        if reference_forward and id(p) not in adapters:  # the adapter-off reference skips the adapters
            total += 2 * used
    return total


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the allocator's peak since the start; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (2**30 if sys.platform == "darwin" else 2**20)  # macOS reports bytes


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, *, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of the best of a few n x n matmuls on `device` in `dtype` (a short probe, not a benchmark)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # kernel selection
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak FLOP/s MFU is measured against (None: unknown CUDA device, or fp32 on CUDA)."""
    if device.type == "cuda":
        if dtype not in (torch.bfloat16, torch.float16):
            return None
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in CUDA_BF16_PEAK.items() if key in name), None)
    return measured_matmul_peak(device, dtype) if device.type == "cpu" else None  # MPS: no synchronised timing


class Throughput:
    """Per-step speed numbers for the metrics: `measure(tokens, seconds)` with the step's tokens
    summed over all `world_size` ranks."""

    def __init__(
        self, model: nn.Module, *, device: torch.device, dtype: torch.dtype, world_size: int, reference_forward: bool
    ):
        self.device, self.dtype, self.world_size = device, dtype, world_size
        self.flops_per_token = flops_per_token(model, reference_forward=reference_forward)
        self._peak: float | None | bool = False  # not measured yet

    @property
    def peak(self) -> float | None:
        """The device's peak FLOP/s, found on first use: only the rank that logs (rank 0) pays the
        CPU matmul probe, once."""
        if self._peak is False:
            self._peak = device_peak_flops(self.device, self.dtype)
        return self._peak

    @peak.setter
    def peak(self, value: float | None) -> None:  # a known peak (benchmarks, tests) skips the probe
        self._peak = value

    def measure(self, tokens: int, seconds: float) -> dict[str, float]:
        per_device = tokens / seconds / self.world_size
        out = {
            "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_device": per_device,
            "peak_memory_gib": peak_memory_gib(self.device),
        }
        if self.peak:
            out["mfu"] = per_device * self.flops_per_token / self.peak
        return out
