"""The key/value cache of a batch being decoded: one preallocated buffer per layer, filled a few
positions at a time, and the attention masks of the new queries over everything cached so far.

Rows may be left-padded (prompts of different lengths): `valid` marks the real tokens, and a query
may attend to key k iff

    valid[k]  and  position[k] <= position[q]  and  position[q] - position[k] < window

(the last term only on sliding-window layers). Positions, not slots, measure distance, so a
padded row computes exactly what it would alone. A padding query attends to itself only, so no row
of scores is empty (an empty row is NaN in SDPA, and NaN would reach the real tokens through v).
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache:
    def __init__(
        self,
        *,
        n_layers: int,
        batch: int,
        capacity: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device | str,
    ):
        # Allocated at the first write, in the dtype the attention computes in (under FSDP2 mixed
        # precision that is the all-gathered bf16, not the sharded fp32 parameters').
        self.shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.keys = self.values = None
        self.positions = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity, self.start, self.length = capacity, 0, 0

    @classmethod
    def for_model(cls, model: nn.Module, *, batch: int, capacity: int):
        """A cache shaped for `model` (a TransformerDecoder), on its parameters' device."""
        args = model.args
        weight = model.embed_tokens.weight
        return cls(
            n_layers=args["n_layers"],
            batch=batch,
            capacity=capacity,
            n_kv_heads=args["n_kv_heads"],
            head_dim=args["head_dim"],
            device=weight.device,
        )

    def advance(self, positions: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Make room for the next forward's tokens: positions [B, T] (and which are real, default
        all); the layers then write their keys and values into these T slots."""
        steps = positions.shape[1]
        if self.length + steps > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {steps} tokens > capacity {self.capacity}")
        self.start, self.length = self.length, self.length + steps
        self.positions[:, self.start : self.length] = positions
        self.valid[:, self.start : self.length] = True if valid is None else valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's k, v [B, Hkv, T, D] for `layer`; return every cached k, v so far."""
        if self.keys is None:
            self.keys = k.new_zeros(self.shape)
            self.values = v.new_zeros(self.shape)
        self.keys[layer, :, :, self.start : self.length] = k
        self.values[layer, :, :, self.start : self.length] = v
        return self.keys[layer, :, :, : self.length], self.values[layer, :, :, : self.length]

    def mask(self, window: int | None = None) -> torch.Tensor:
        """Boolean [B, 1, T_new, T_cached] (True = may attend) for this forward's queries."""
        query = self.positions[:, self.start : self.length, None]
        key = self.positions[:, None, : self.length]
        allowed = self.valid[:, None, : self.length] & (key <= query)
        if window is not None:
            allowed &= query - key < window
        new = torch.arange(self.start, self.length, device=query.device)
        allowed[:, torch.arange(len(new)), new] |= ~self.valid[:, self.start : self.length]
        return allowed.unsqueeze(1)

    def layer(self, index: int) -> "LayerCache":
        return LayerCache(self, index)


class LayerCache:
    """One layer's view of a `KVCache` (what an attention module is given)."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.index, k, v)
