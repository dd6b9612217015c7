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
    memory). No host synchronisation either way. The copy back is not prefetched: each block's
    backward waits for its own activations (measured in benchmarks/gpu_check.py).

    Left on the GPU: tensors under `min_bytes`, those sharing storage with `keep` (the block's
    parameters, whose saved views `weight.t()` are not Parameters, and the inputs every block shares:
    RoPE tables, masks), and tensors that are not dense (expanded views would be materialised).
    Autograd's check that a saved tensor was not modified in place does not see offloaded tensors;
    the decoder modifies none."""

    def __init__(self, min_bytes: int = OFFLOAD_MIN_BYTES):
        self.min_bytes = min_bytes
        self.keep: set[int] = set()  # untyped_storage().data_ptr() of tensors to leave in place
        self.offloaded_bytes = 0  # copied to the host so far (a measure, for benchmarks)
        self._stream: torch.cuda.Stream | None = None

    def pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if (
            tensor.device.type != "cuda"
            or nbytes < self.min_bytes
            or not tensor.is_non_overlapping_and_dense()
            or tensor.untyped_storage().data_ptr() in self.keep
        ):
            return tensor
        if self._stream is None:
            self._stream = torch.cuda.Stream(tensor.device)
        self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self._stream):
            host = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        tensor.record_stream(self._stream)
        self.offloaded_bytes += nbytes
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
    elsewhere nothing changes). The first argument is the block's own input (the hidden states);
    parameters and the other arguments stay where they are (see `ActivationOffload`). Composes
    with activation checkpointing applied first: then only the block's input, the checkpoint's one
    saved tensor, leaves the GPU."""
    offload = offload or ActivationOffload()
    forward = module.forward

    def offloaded_forward(*args, **kwargs):
        shared = [t for t in (*args[1:], *kwargs.values()) if isinstance(t, torch.Tensor)]
        offload.keep = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *shared)}
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
    if activation_offloading and compile_blocks:
        raise ValueError("activation offloading inside compiled blocks is not supported: choose one")
    offload = ActivationOffload() if activation_offloading else None
    for block in transformer_blocks(model):
        if activation_checkpointing:
            enable_activation_checkpointing(block)
        if offload is not None:
            enable_activation_offloading(block, offload)
        if compile_blocks:
            block.compile()
