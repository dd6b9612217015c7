"""Preference metrics accumulated over pairs, and a JSONL metrics log."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch

from dpokit.distributed.group import all_reduce_sum
from dpokit.losses.types import PreferenceLossOutput


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair accuracy: 1 if the chosen reward is higher, 0 if lower, 0.5 on a tie.

    Ties count half so that a policy identical to its reference (all rewards 0, as at step 0)
    scores 0.5, the chance level, rather than 0.
    """
    margin = chosen_rewards - rejected_rewards
    return (margin > 0).float() + 0.5 * (margin == 0).float()


# What a validation (and a train step) reports per pair, as means: the names checkpoint.metric may use.
PAIR_METRICS = (
    "loss",
    "preference_loss",
    "sft_loss",
    "acc",
    "reward_margin",
    "rewards_chosen_mean",
    "rewards_rejected_mean",
    "logps_chosen",
    "logps_rejected",
)


class PairMetrics:
    """Sums per-pair quantities over micro-batches (and, in distributed recipes, ranks) so the
    reported means are over every pair of the step, whatever the micro-batch split."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.pairs = 0

    def add(self, out: PreferenceLossOutput, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> None:
        """`out` is any loss output; a `CombinedLossOutput` also reports its preference and SFT
        parts ("loss" is always the total that is optimised)."""
        per_pair = {
            "loss": out.losses.detach(),
            "preference_loss": getattr(out, "preference_losses", out.losses).detach(),
            "acc": preference_accuracy(out.chosen_rewards, out.rejected_rewards),
            "rewards_chosen_mean": out.chosen_rewards,
            "rewards_rejected_mean": out.rejected_rewards,
            "reward_margin": out.chosen_rewards - out.rejected_rewards,
            "logps_chosen": chosen_logps.detach(),
            "logps_rejected": rejected_logps.detach(),
        }
        if hasattr(out, "sft_losses"):
            per_pair["sft_loss"] = out.sft_losses.detach()
        for name, values in per_pair.items():
            self.sums[name] += values.float().sum().item()
        self.pairs += out.losses.numel()

    def means(self) -> dict[str, float]:
        if not self.pairs:
            raise ValueError("no pairs were added")
        return {name: total / self.pairs for name, total in self.sums.items()}


class JsonlLogger:
    """Writes one JSON object per line and flushes each, so a killed run keeps its log.
    A new run starts the file afresh; `append=True` continues it (resumed runs)."""

    def __init__(self, path: str | Path, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        """The records of a log (after `truncate_after`, every line is one); [] when there is none."""
        path = Path(path)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    @staticmethod
    def truncate_after(path: str | Path, step: int) -> int:
        """Drop the records an interrupted run logged after `step` (the step it resumes from), so
        the resumed run does not log those steps twice; a line cut off by the kill goes too.
        Rewritten atomically; returns how many lines were dropped."""
        path = Path(path)
        if not path.exists():
            return 0
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)
        return dropped

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def all_reduce_pair_metrics(metrics: PairMetrics) -> PairMetrics:
    """A `PairMetrics` holding the sums over every rank, so `means()` is the mean over all pairs
    of all ranks (not a mean of per-rank means, which would weight ranks with few pairs up)."""
    names = sorted(metrics.sums)
    # Every rank must reduce the same names in the same order.
    reduced = all_reduce_sum([metrics.sums[n] for n in names] + [metrics.pairs])
    out = PairMetrics()
    for name, value in zip(names, reduced[:-1]):
        out.sums[name] = value
    out.pairs = int(round(reduced[-1]))
    return out
