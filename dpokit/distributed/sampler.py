"""Which pairs each rank sees, in a way that does not depend on the number of ranks.

Training: every epoch is one seeded permutation of the dataset; optimizer step s takes the
`global_batch` pairs perm[s * G : (s + 1) * G] and splits them into micro-batches, micro-batch m
of rank r being the `batch_size` pairs at offset (m * world_size + r) * batch_size. So one
process with 8 micro-batches and 4 processes with 2 micro-batches each train on the same pairs
in each step, and a resumed run continues from the saved (epoch, step) exactly.

Every batch carries `pair_index` (the pairs' dataset indices), which the precomputed reference
uses to look up cached log-probs.

Packed training (`PackedGlobalBatchSampler`): the dataset is packed once up front (the packer is
deterministic given its seed) and the same dealing is applied to *packs*: step s takes packs
perm[s * G : (s + 1) * G], G = packs per micro-batch x accumulation x ranks, so the global set of
pairs of a step is again independent of the number of ranks. Packs hold different numbers of
pairs, so ranks (and micro-batches) get unequal pair counts; `preference_step.accumulate_gradients`
normalises by the all-reduced pair count of the step, which keeps the gradient the per-pair mean.
A packed batch's `pair_index` lists its pairs' indices in the pair dataset in the batch's pair
order (pack by pack), so the precomputed reference works unchanged.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from typing import Callable, Iterator, Sequence

import torch

from dpokit.data import PackedPreferenceDataset, PreferenceBatch, collate_packed, collate_preference_pairs
from dpokit.errors import DpokitError


def collate_with_index(
    dataset: Sequence[dict], indices: Sequence[int], collate: Callable[[list[dict]], PreferenceBatch]
) -> PreferenceBatch:
    batch = collate([dataset[i] for i in indices])
    batch.pair_index = torch.tensor(list(indices), dtype=torch.long)
    return batch


class GlobalBatchSampler:
    """Stateful, rank-aware source of training micro-batches (see the module docstring). The
    items dealt are pairs; `PackedGlobalBatchSampler` deals packs of pairs the same way."""

    unit = "pairs"  # what one dealt item is, for messages

    def __init__(
        self,
        dataset: Sequence[dict],
        collate: Callable[[list[dict]], PreferenceBatch],
        *,
        batch_size: int,
        gradient_accumulation_steps: int,
        rank: int,
        world_size: int,
        seed: int,
    ):
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.accumulation = batch_size, gradient_accumulation_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = batch_size * gradient_accumulation_steps * world_size
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DpokitError(
                f"{len(dataset)} training {self.unit}, fewer than one global batch of "
                f"{self.global_batch} (batch_size x gradient_accumulation_steps x {world_size} ranks)"
            )
        self.epoch, self.step_in_epoch = 0, 0
        self._perm = None

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=generator)

    def step_indices(self) -> list[list[int]]:
        """This rank's micro-batches (dataset indices) for the current step, without advancing."""
        if self._perm is None:
            self._perm = self.permutation(self.epoch)
        start = self.step_in_epoch * self.global_batch
        out = []
        for micro in range(self.accumulation):
            offset = start + (micro * self.world_size + self.rank) * self.batch_size
            out.append(self._perm[offset : offset + self.batch_size].tolist())
        return out

    @property
    def unused_per_epoch(self) -> int:
        """Items of an epoch beyond its last full global batch (a different seeded few each epoch)."""
        return len(self.dataset) - self.steps_per_epoch * self.global_batch

    def collate_items(self, indices: list[int]) -> PreferenceBatch:
        """One micro-batch of the dataset items `indices`, with `pair_index`."""
        return collate_with_index(self.dataset, indices, self.collate)

    def next_step(self) -> list[PreferenceBatch]:
        """The collated micro-batches of the next optimizer step; advances the position."""
        batches = [self.collate_items(idx) for idx in self.step_indices()]
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch, self._perm = self.epoch + 1, 0, None
        return batches

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "num_pairs": len(self.dataset),
            # A weighted mixture (dpokit.data.mixture): its weights, seed and table, not just its size.
            **({"mixture": self.dataset.table_fingerprint} if hasattr(self.dataset, "table_fingerprint") else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. Everything that defines the data stream (seed, global
        batch, dataset size and, when packed, the packs) must match, or the error names what differs."""
        mine = self.state_dict()
        for key in sorted((set(mine) | set(state)) - {"epoch", "step_in_epoch"}):
            if state.get(key) != mine.get(key):
                raise DpokitError(
                    f"checkpoint data position was saved with {key}={state.get(key, 'absent')}, this "
                    f"run has {mine.get(key, 'absent')}; exact resume needs the same value "
                    f"(and the same packing setting)"
                )
        self.epoch, self.step_in_epoch, self._perm = state["epoch"], state["step_in_epoch"], None


def packs_fingerprint(packed: PackedPreferenceDataset) -> str:
    """Hash of the packing (pack size, layout, and which pairs are in which pack, in order)."""
    payload = json.dumps(
        {"pack_size": packed.pack_size, "prefix_sharing": packed.prefix_sharing, "packs": packed.packs}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class PackedGlobalBatchSampler(GlobalBatchSampler):
    """`GlobalBatchSampler` over the packs of a `PackedPreferenceDataset` (module docstring):
    `batch_size` is packs per micro-batch per rank; every micro-batch is `collate_packed` at the
    fixed `pack_size` width. The packs are made once; each epoch visits them in a new seeded order."""

    unit = "packs"

    def __init__(
        self,
        packed: PackedPreferenceDataset,
        *,
        pad_id: int,
        batch_size: int,
        gradient_accumulation_steps: int,
        rank: int,
        world_size: int,
        seed: int,
    ):
        collate = partial(
            collate_packed, pad_id=pad_id, pack_size=packed.pack_size, prefix_sharing=packed.prefix_sharing
        )
        super().__init__(
            packed,
            collate,
            batch_size=batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            rank=rank,
            world_size=world_size,
            seed=seed,
        )
        self.fingerprint = packs_fingerprint(packed)

    def collate_items(self, indices: list[int]) -> PreferenceBatch:
        batch = self.collate([self.dataset[i] for i in indices])
        pair_index = [pair for i in indices for pair in self.dataset.packs[i]]  # collate_packed's pair order
        batch.pair_index = torch.tensor(pair_index, dtype=torch.long)
        return batch

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "num_pairs": len(self.dataset.pairs),
            "num_packs": len(self.dataset),
            "packing": self.fingerprint,
        }


def training_sampler(
    dataset, *, pad_id: int, batch_size: int, gradient_accumulation_steps: int, rank: int, world_size: int, seed: int
) -> GlobalBatchSampler:
    """The sampler for a training set: packs for a `PackedPreferenceDataset` (online packing or a
    `dpokit pack` file), padded pairs otherwise."""
    settings = dict(
        batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    if isinstance(dataset, PackedPreferenceDataset):
        return PackedGlobalBatchSampler(dataset, pad_id=pad_id, **settings)
    return GlobalBatchSampler(dataset, partial(collate_preference_pairs, pad_id=pad_id), **settings)


def rank_shard(num_items: int, rank: int, world_size: int) -> tuple[list[int], list[bool]]:
    """Items rank, rank + W, rank + 2W, ... padded (by repeating item 0) to the same count on
    every rank, since FSDP2 needs every rank to run the same number of forwards. Returns the
    indices and a mask that is False on padding."""
    per_rank = -(-num_items // world_size)
    indices, valid = [], []
    for k in range(per_rank):
        i = k * world_size + rank
        indices.append(i if i < num_items else 0)
        valid.append(i < num_items)
    return indices, valid


def eval_batches(
    dataset: Sequence[dict],
    collate: Callable[[list[dict]], PreferenceBatch],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
) -> Iterator[PreferenceBatch]:
    """This rank's share of `dataset` in batches, each with `pair_index` and a boolean `valid`
    ([B], False on padding pairs that only keep the ranks in step)."""
    indices, valid = rank_shard(len(dataset), rank, world_size)
    for start in range(0, len(indices), batch_size):
        batch = collate_with_index(dataset, indices[start : start + batch_size], collate)
        batch.valid = torch.tensor(valid[start : start + batch_size])
        yield batch
