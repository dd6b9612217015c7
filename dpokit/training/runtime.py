"""Small runtime helpers shared by recipes: device and dtype by name, seeding, batch streams."""

from __future__ import annotations

import random

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


def resolve_dtype(name: str, setting: str | None = None) -> torch.dtype:
    """`name` ("bf16", "fp32", ...) -> the torch dtype; `setting` names where it was set (a config
    key) in the error for an unknown name."""
    if name not in DTYPES:
        where = f"{setting}: " if setting else ""
        raise DpokitError(f"{where}unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def seed_everything(seed: int) -> torch.Generator:
    """Seeds python and torch; returns a generator for the data order."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
