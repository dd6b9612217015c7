"""Process groups and cross-rank reductions for torchrun-launched recipes.

`init_distributed` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); launched without torchrun it starts a one-process group on localhost, so a
distributed recipe runs the same FSDP2 code path on one process. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dpokit.errors import DpokitError


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" -> cuda if available, else cpu; otherwise any torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DpokitError(f"device: {name!r} is not a device dpokit trains on; choose auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DpokitError(f"device {name!r} requested but CUDA is not available")
    return device


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", *, timeout_minutes: float = 30.0) -> DistributedEnv:
    """Initialise the default process group (once) and pick this rank's device."""
    if "RANK" not in os.environ:
        # Not launched by torchrun: a group of one on a free local port.
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if resolved.type == "cuda" else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
            device_id=resolved if resolved.type == "cuda" else None,
        )
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, resolved)


def destroy_distributed(*, wait_for_peers: bool = True) -> None:
    """Destroy the default group. With `wait_for_peers` (a run that ended normally) every rank
    reaches this point first, so no rank tears down its communicator while a peer still waits on
    it; after an error the peers may never come, so it does not wait."""
    if dist.is_initialized():
        if wait_for_peers and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_worker(code: int = 0) -> None:
    """End a worker process of a multi-process run now, after its output is flushed.

    The process group's C++ objects outlive `destroy_process_group` while FSDP modules and device
    meshes still reference them; torn down during interpreter shutdown, their threads abort the
    process now and then ("terminate called without an active exception", SIGABRT), turning a
    finished run into a crash. `os._exit` skips that teardown; files are closed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _reduction_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo reduces CPU tensors.
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums a list of numbers over every rank (float64, so counts and sums stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=_reduction_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_tensor(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on each rank), in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [tensor]
    device = _reduction_device()
    local = tensor.to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [t.to(tensor.device) for t in gathered]


def broadcast_object(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_together(error: str | None) -> None:
    """Collective: when any rank has an `error` (a message), every rank raises the first one as a
    `DpokitError`, so no rank is left waiting in the next collective for a peer that gave up."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise DpokitError(first)
