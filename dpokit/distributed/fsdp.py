"""FSDP2 sharding of a decoder, and loading full tensors into the shards one tensor at a time.

The flow for a model too large for one device:

    with torch.device("meta"):
        model = builder()                        # shapes only, no memory
    shard_model(model, ...)                      # fully_shard per block + root (params -> DTensors)
    materialize(model, device)                   # allocate this rank's shards only
    load_into_shards(model, tensors)             # (key, full tensor) one at a time -> local slices

No rank ever holds more than one full tensor at a time: `tensors` yields them one by one (e.g.
from the safetensors files of a Hugging Face checkpoint) and each rank copies out its own slice.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from dpokit.errors import DpokitError
from dpokit.models.blocks import prepare_blocks, transformer_blocks


def shard_model(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    mesh=None,
) -> nn.Module:
    """`fully_shard` every transformer block, then the root (embedding, final norm, head).

    param_dtype: the dtype of the all-gathered parameters used in forward/backward (bf16 for
        mixed precision); the sharded master weights keep the model's dtype (fp32).
    reduce_dtype: the dtype gradients are reduce-scattered in (fp32 keeps the sum exact-ish).
    cpu_offload: sharded params, grads and optimizer state live on CPU (optimizer steps on CPU).

    Blocks reshard after forward; the root keeps its parameters (embedding, final norm, output
    head) unsharded from its forward to the end of the backward, as FSDP2 does by default. That
    is what lets the memory-lean log-prob path call `model.hidden_states(...)` (registered here as
    an FSDP forward method) and then project through `model.output_projection` chunk by chunk.
    A no-grad forward leaves the root unsharded: call `reshard(model)` before weights change
    under it (the state-dict swap reference does).
    """
    kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype))
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    prepare_blocks(model, activation_checkpointing=activation_checkpointing, compile_blocks=compile_blocks)
    for block in transformer_blocks(model):
        fully_shard(block, reshard_after_forward=True, **kwargs)
    fully_shard(model, **kwargs)
    if hasattr(model, "hidden_states"):
        register_fsdp_forward_method(model, "hidden_states")
    return model


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Free every unsharded parameter so the next forward all-gathers from the current shards."""
    for module in fsdp_modules(model):
        module.reshard()


def init_rope_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Recompute the decoder's RoPE table (a non-persistent buffer: it is in no checkpoint, and
    a meta-device build leaves it empty)."""
    if not hasattr(model, "reset_rope"):
        raise TypeError(f"{type(model).__name__} has no `reset_rope` to rebuild its RoPE table with")
    model.reset_rope(device)


def materialize(
    model: nn.Module, device: torch.device | str, *, buffer_device: torch.device | str | None = None
) -> nn.Module:
    """Allocate a meta-built (and usually sharded) model on `device`: each rank gets only its
    shards; values are garbage until `load_into_shards` fills them. `buffer_device`: where the
    RoPE table goes when it differs (CPU offload keeps shards on CPU, computes on the GPU)."""
    model.to_empty(device=device)
    init_rope_buffers(model, buffer_device or device)
    return model


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full` for a parameter laid out like `like` (a DTensor or a plain
    tensor). Shard(d) on a mesh dimension is `torch.chunk` along d, as DTensor defines it."""
    if not isinstance(like, DTensor):
        return full
    local = full
    mesh = like.device_mesh
    for mesh_dim, placement in enumerate(like.placements):
        if placement.is_shard():
            chunks = torch.chunk(local, mesh.size(mesh_dim), dim=placement.dim)
            index = mesh.get_local_rank(mesh_dim)
            local = chunks[index] if index < len(chunks) else local.narrow(placement.dim, 0, 0)
        elif not placement.is_replicate():
            raise NotImplementedError(f"cannot load into placement {placement}")
    return local


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def load_into_shards(
    model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, source: str = "checkpoint"
) -> int:
    """Copy each (key, full tensor) into this rank's shard of the same-named parameter or
    persistent buffer, casting to its dtype. Every key of the model must be filled exactly once
    and every tensor must name a key of the model. Returns the number of tensors loaded."""
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    persistent = set(model.state_dict().keys())
    targets = {k: v for k, v in targets.items() if k in persistent}
    seen: set[str] = set()
    for key, full in tensors:
        if key not in targets:
            raise DpokitError(f"{source}: tensor {key!r} matches no parameter of {type(model).__name__}")
        if key in seen:
            raise DpokitError(f"{source}: tensor {key!r} appears twice")
        target = targets[key]
        if tuple(full.shape) != tuple(target.shape):
            raise DpokitError(
                f"{source}: tensor {key!r} has shape {tuple(full.shape)}, the model expects {tuple(target.shape)}"
            )
        piece = local_slice(full, target)
        local_tensor(target).copy_(piece)
        seen.add(key)
    missing = sorted(set(targets) - seen)
    if missing:
        raise DpokitError(f"{source}: no tensor for {len(missing)} parameter(s) of the model, e.g. {missing[:3]}")
    return len(seen)


def state_dict_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) over a plain (unsharded) model's state dict: the loading seam for a model
    initialised in memory (random init for tiny configs and tests)."""
    yield from model.state_dict().items()


def full_tensors(model: nn.Module, *, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, full CPU tensor) for every state-dict entry of a sharded model, one at a time.

    Every rank must iterate (each DTensor is all-gathered); ranks other than 0 may drop the
    values at once."""
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        yield key, value.to("cpu")


def check_no_meta(model: nn.Module) -> None:
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if local_tensor(t).is_meta]
    if meta:
        raise RuntimeError(f"tensors still on the meta device after loading: {meta[:5]}")
