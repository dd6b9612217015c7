"""The two batch layouts the collators produce and the forward consumes.

Both hold the chosen sequences of `num_pairs` pairs, then their rejected sequences, with `labels`
aligned to `input_ids` (position t predicts labels[t]; IGNORE_INDEX where nothing is scored):

* `PaddedBatch`: one sequence per row, rows 0..B-1 chosen and B..2B-1 rejected, right-padded.
* `PackedBatch`: several sequences per row (FFD / first-fit-shuffle packs), optionally with the
  prompt stored once per pair (prefix sharing); `sequence_ids` names the sequence each labelled
  position belongs to (chosen of pair i = i, rejected = num_pairs + i), `document_ids` and
  `branch_ids` define who may attend to whom, `position_ids` restart per document.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dpokit.logprobs import IGNORE_INDEX


@dataclass(kw_only=True)
class PreferenceBatch:
    """What every layout carries. `pair_index` (dataset index of each pair; keys precomputed
    reference log-probs) and `valid` (bool [B], False for padding pairs that keep ranks in step)
    are set by the samplers; the rewards [B] only when every pair has ground-truth rewards (RPO)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    num_pairs: int
    num_tokens: int  # real (non-pad) tokens in the batch
    chosen_reward: torch.Tensor | None = None
    rejected_reward: torch.Tensor | None = None
    pair_index: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    def to(self, device: torch.device | str):
        """A copy with every tensor on `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def response_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Response token counts [B] of the chosen and of the rejected sequences."""
        raise NotImplementedError


@dataclass(kw_only=True)
class PaddedBatch(PreferenceBatch):
    def response_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts = (self.labels != IGNORE_INDEX).sum(-1)
        return counts[: self.num_pairs], counts[self.num_pairs :]


@dataclass(kw_only=True)
class PackedBatch(PreferenceBatch):
    position_ids: torch.Tensor
    document_ids: torch.Tensor  # -1 on padding
    branch_ids: torch.Tensor  # 0 = shared by both sequences of a document, 1 = chosen, 2 = rejected
    sequence_ids: torch.Tensor  # -1 where unlabelled
    prefix_sharing: bool = False

    def response_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        sequence_ids = self.sequence_ids.reshape(-1)
        counts = torch.bincount(sequence_ids[sequence_ids >= 0], minlength=2 * self.num_pairs)
        return counts[: self.num_pairs], counts[self.num_pairs :]


def pair_rewards(items: list[dict]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The pairs' ground-truth rewards [B] when every pair has them, else (None, None)."""
    if not items or not all("chosen_reward" in item for item in items):
        return None, None
    return (
        torch.tensor([item["chosen_reward"] for item in items], dtype=torch.float32),
        torch.tensor([item["rejected_reward"] for item in items], dtype=torch.float32),
    )
