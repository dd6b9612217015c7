"""Seeding a run: python's and torch's global generators, and a generator for the data order."""

from __future__ import annotations

import random

import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seeds python and torch; returns a generator for the data order."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
