"""What recipes do to a decoder's repeated blocks before training, on one device or under FSDP2:
recompute their activations in the backward, compile them one by one (regional compilation: one
compiled graph reused by every block of the same shape)."""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint


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


def prepare_blocks(model: nn.Module, *, activation_checkpointing: bool = False, compile_blocks: bool = False) -> None:
    """Activation checkpointing and / or `torch.compile` on every transformer block, in that order
    (the compiled graph then holds the recomputation boundary)."""
    for block in transformer_blocks(model):
        if activation_checkpointing:
            enable_activation_checkpointing(block)
        if compile_blocks:
            block.compile()
