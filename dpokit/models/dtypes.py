"""Floating-point dtypes by the names configs use ("bf16", "fp32", ...)."""

from __future__ import annotations

import torch

from dpokit.errors import DpokitError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype, setting: str | None = None) -> torch.dtype:
    """`name` ("bf16", "fp32", ... or a torch dtype) -> the torch dtype; `setting` names where it
    was set (a config key or argument) in the error for an unknown name."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        where = f"{setting}: " if setting else ""
        raise DpokitError(f"{where}unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]
