"""Which pairs each rank sees, in a way that does not depend on the number of ranks.

Training: every epoch is one seeded permutation of the dataset; optimizer step s takes the
`global_batch` pairs perm[s * G : (s + 1) * G] and splits them into micro-batches, micro-batch m
of rank r being the `batch_size` pairs at offset (m * world_size + r) * batch_size. So one
process with 8 micro-batches and 4 processes with 2 micro-batches each train on the same pairs
in each step, and a resumed run continues from the saved (epoch, step) exactly.

Every batch carries `pair_index` (the pairs' dataset indices), which the precomputed reference
uses to look up cached log-probs.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from dpokit.errors import DpokitError


def collate_with_index(dataset: Sequence[dict], indices: Sequence[int], collate: Callable[[list[dict]], dict]) -> dict:
    batch = collate([dataset[i] for i in indices])
    batch["pair_index"] = torch.tensor(list(indices), dtype=torch.long)
    return batch


class GlobalBatchSampler:
    """Stateful, rank-aware source of training micro-batches (see the module docstring)."""

    def __init__(
        self, dataset: Sequence[dict], collate: Callable[[list[dict]], dict], *, batch_size: int,
        gradient_accumulation_steps: int, rank: int, world_size: int, seed: int,
    ):
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.accumulation = batch_size, gradient_accumulation_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = batch_size * gradient_accumulation_steps * world_size
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DpokitError(f"{len(dataset)} training pairs, fewer than one global batch of {self.global_batch} "
                              f"(batch_size x gradient_accumulation_steps x {world_size} ranks)")
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
            out.append(self._perm[offset: offset + self.batch_size].tolist())
        return out

    def next_step(self) -> list[dict]:
        """The collated micro-batches of the next optimizer step; advances the position."""
        batches = [collate_with_index(self.dataset, idx, self.collate) for idx in self.step_indices()]
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch, self._perm = self.epoch + 1, 0, None
        return batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "global_batch": self.global_batch, "num_pairs": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch", "num_pairs"):
            if state[key] != self.state_dict()[key]:
                raise DpokitError(f"checkpoint data position was saved with {key}={state[key]}, this run has "
                                  f"{self.state_dict()[key]}; exact resume needs the same value")
        self.epoch, self.step_in_epoch, self._perm = state["epoch"], state["step_in_epoch"], None


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
    dataset: Sequence[dict], collate: Callable[[list[dict]], dict], *, batch_size: int, rank: int, world_size: int,
) -> Iterator[dict]:
    """This rank's share of `dataset` in batches, each with `pair_index` and a boolean `valid`
    ([B], False on padding pairs that only keep the ranks in step)."""
    indices, valid = rank_shard(len(dataset), rank, world_size)
    for start in range(0, len(indices), batch_size):
        batch = collate_with_index(dataset, indices[start: start + batch_size], collate)
        batch["valid"] = torch.tensor(valid[start: start + batch_size])
        yield batch
