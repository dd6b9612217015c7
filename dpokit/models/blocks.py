"""What recipes do to a decoder's repeated blocks before training, on one device or under FSDP2:
recompute their activations in the backward, keep them in CPU memory until the backward (CUDA),
compile them one by one (regional compilation: one compiled graph reused by every block of the
same shape)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Saved tensors below this size stay on the GPU: their copies would cost more than they free.
OFFLOAD_MIN_BYTES = 1 << 20


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the decoder's `layers`)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no `layers` (transformer blocks)")
    return list(layers)


def enable_activation_checkpointing(module: nn.Module) -> None:
    """Recompute `module`'s activations in backward instead of storing them.

    Wraps `forward` rather than the module, so state-dict keys stay unchanged."""
    forward = module.forward

    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed_forward


class ActivationOffload:
    """Saved-tensor hooks that keep a CUDA block's activations in pinned CPU memory from its
    forward to its backward.

    Pack (forward): the device-to-host copy runs on a side stream after the work that produced the
    tensor, so the forward does not wait for it; `record_stream` keeps the GPU memory from being
    reused until that copy is done, and the caching allocator frees it then. Unpack (backward):
    the compute stream waits for that copy and copies the tensor back (non-blocking, from pinned
    memory). No host synchronisation either way. Parameters (saved weights) and tensors under
    `OFFLOAD_MIN_BYTES` are not copied. The copy back is not prefetched: each block's backward
    waits for its own activations (measured in benchmarks/gpu_check.py)."""

    def __init__(self, min_bytes: int = OFFLOAD_MIN_BYTES):
        self.min_bytes = min_bytes
        self._stream: torch.cuda.Stream | None = None

    def pack(self, tensor: torch.Tensor):
        if (
            tensor.device.type != "cuda"
            or isinstance(tensor, nn.Parameter)
            or tensor.numel() * tensor.element_size() < self.min_bytes
        ):
            return tensor
        if self._stream is None:
            self._stream = torch.cuda.Stream(tensor.device)
        self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self._stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        tensor.record_stream(self._stream)
        return tensor.device, host, copied

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, copied = packed
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)


def enable_activation_offloading(module: nn.Module, offload: ActivationOffload | None = None) -> None:
    """Keep the tensors `module`'s forward saves for the backward in CPU memory (CUDA tensors only;
    elsewhere nothing changes). Composes with activation checkpointing applied first: then only
    the block's input, the checkpoint's one saved tensor, leaves the GPU."""
    offload = offload or ActivationOffload()
    forward = module.forward

    def offloaded_forward(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack):
            return forward(*args, **kwargs)

    module.forward = offloaded_forward


def prepare_blocks(
    model: nn.Module,
    *,
    activation_checkpointing: bool = False,
    activation_offloading: bool = False,
    compile_blocks: bool = False,
) -> None:
    """Activation checkpointing, activation offloading (CUDA) and / or `torch.compile` on every
    transformer block, in that order (the compiled graph then holds the recomputation boundary)."""
    offload = ActivationOffload() if activation_offloading else None
    for block in transformer_blocks(model):
        if activation_checkpointing:
            enable_activation_checkpointing(block)
        if offload is not None:
            enable_activation_offloading(block, offload)
        if compile_blocks:
            block.compile()
