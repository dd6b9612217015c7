"""Pair-preserving bin packing of preference pairs into fixed-capacity packs.

A pair is packed as ONE item whose length is the tokens of both its sequences (prompt+chosen and
prompt+rejected, or prompt+chosen+rejected+1 with prefix sharing, see `dpokit.data.packed`), so
chosen and rejected always land in the same pack.

Both packers are first fit: each item goes into the lowest-numbered pack with room for it.
  first_fit_decreasing  items longest first (fewest packs; packs correlate long with long);
  first_fit_shuffle     items in a seeded random order (packs mix lengths; NeMo's default).

First fit is O(N log N) here: a max segment tree over the packs' remaining capacity finds the
leftmost pack with room in one root-to-leaf walk, instead of scanning every open pack (O(N * packs)).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Sequence

from dpokit.errors import DpokitError


def _check_lengths(lengths: Sequence[int], capacity: int) -> list[int]:
    lengths = [int(n) for n in lengths]
    if capacity <= 0:
        raise ValueError(f"pack capacity must be positive, got {capacity}")
    for i, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"pair {i} has length {n}; lengths must be positive")
        if n > capacity:
            raise DpokitError(
                f"pair {i} needs {n} tokens, more than the pack size {capacity}; "
                f"use a pack size of at least 2 x max_seq_len"
            )
    return lengths


def first_fit(order: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Place items in `order` into the first pack with room. Returns packs as lists of item indices.

    The segment tree's leaves are the packs' remaining capacities (unopened packs hold `capacity`,
    so the walk always ends at an open pack or the next one to open); inner nodes hold the max of
    their children. First fit never leaves two packs at most half full, so at most
    2 * total / capacity + 1 packs exist: that bounds the leaves.
    """
    lengths = _check_lengths(lengths, capacity)
    if not order:
        return []
    max_packs = min(len(order), 2 * sum(lengths[i] for i in order) // capacity + 2)
    size = 1 << (max_packs - 1).bit_length()
    tree = [capacity] * (2 * size)
    packs: list[list[int]] = []
    for item in order:
        need = lengths[item]
        node = 1
        while node < size:  # walk down to the leftmost leaf with room
            node <<= 1
            if tree[node] < need:
                node += 1
        pack = node - size
        if pack == len(packs):
            packs.append([item])
        else:
            packs[pack].append(item)
        tree[node] -= need
        node >>= 1
        while node:  # restore the max on the way up; stop once a node is unchanged
            left, right = tree[2 * node], tree[2 * node + 1]
            best = left if left > right else right
            if tree[node] == best:
                break
            tree[node] = best
            node >>= 1
    return packs


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First fit over items sorted longest first (ties by index, so the result is deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return first_fit(order, lengths, capacity)


def first_fit_shuffle(lengths: Sequence[int], capacity: int, *, seed: int = 0) -> list[list[int]]:
    """First fit over items in a random order drawn from `seed`."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return first_fit(order, lengths, capacity)


PACKERS = {"ffd": first_fit_decreasing, "ffs": first_fit_shuffle}


def pack_lengths(lengths: Sequence[int], capacity: int, algorithm: str = "ffd", *, seed: int = 0) -> list[list[int]]:
    if algorithm == "ffd":
        return first_fit_decreasing(lengths, capacity)
    if algorithm == "ffs":
        return first_fit_shuffle(lengths, capacity, seed=seed)
    raise DpokitError(f"unknown packing algorithm {algorithm!r}; choose from {sorted(PACKERS)}")


@dataclass(frozen=True)
class PackingStats:
    packs: int
    pairs: int
    capacity: int
    tokens: int  # real tokens over all packs

    @property
    def occupancy(self) -> float:
        """Real tokens / pack capacity over all packs (1.0 = no padding)."""
        return self.tokens / (self.packs * self.capacity) if self.packs else 0.0

    @property
    def pairs_per_pack(self) -> float:
        return self.pairs / self.packs if self.packs else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "occupancy": self.occupancy, "pairs_per_pack": self.pairs_per_pack}

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs in {self.packs} packs of {self.capacity} tokens: occupancy "
            f"{self.occupancy:.3f}, {self.pairs_per_pack:.2f} pairs per pack"
        )


def packing_stats(packs: Sequence[Sequence[int]], lengths: Sequence[int], capacity: int) -> PackingStats:
    return PackingStats(
        packs=len(packs),
        pairs=sum(len(p) for p in packs),
        capacity=capacity,
        tokens=sum(int(lengths[i]) for p in packs for i in p),
    )
