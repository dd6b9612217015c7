"""Weighted mixtures of preference training sets: one fixed map-style dataset over several.

`mix_preference_datasets({"hh": hh, "uf": uf}, {"hh": 0.7, "uf": 0.3}, seed=0)` builds a table of
`size` (source, index) entries once, deterministically from its inputs and seed: source i
contributes n_i = its share of `size` by weight (largest remainder, so the n_i sum to `size`),
taken from seeded permutations of the source without replacement, a fresh permutation per pass
when n_i exceeds the source (upsampling); a seeded shuffle interleaves the sources.
Item i of the mixture is its source's item, so the mixture trains, packs, fingerprints and
resumes like a single `PreferenceDataset`: the sampler's position indexes this fixed table.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from numbers import Rational, Real
from typing import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from dpokit.data.packed import PackedPreferenceDataset
from dpokit.errors import DpokitError

__all__ = ["MixedPreferenceDataset", "MixtureSource", "MixtureStats", "mix_preference_datasets", "mixture_counts"]

CONFIG_KEY = "train_datasets"  # where the mixture's settings live in a recipe config, for messages


@dataclass(frozen=True)
class MixtureSource:
    """One source of a mixture: its weight as given, its length and the items the mixture takes."""

    name: str
    weight: float
    length: int
    count: int

    @property
    def ratio(self) -> float:
        """Items taken per source item: < 1 downsamples, > 1 upsamples."""
        return self.count / self.length if self.length else 0.0

    def summary(self) -> str:
        return f"{self.name} {self.count:,} (weight {self.weight:g}, {_times(self.ratio)}x of {self.length:,})"


@dataclass
class MixtureStats:
    """`stats` of a mixture: `pairs` like `DatasetStats`, and a `summary()` naming each source."""

    pairs: int
    sources: list[MixtureSource]
    source_stats: dict[str, object] = field(default_factory=dict)  # name -> the source's own stats

    def summary(self) -> str:
        parts = ", ".join(source.summary() for source in self.sources)
        own = "; ".join(
            f"{name}: {stats.summary()}" for name, stats in self.source_stats.items() if hasattr(stats, "summary")
        )
        return f"mixture of {len(self.sources)} sets: {parts}" + (f" ({own})" if own else "")


def _times(ratio: float) -> str:
    """0.4375 -> "0.44", 1.5 -> "1.5", 2.0 -> "2"; tiny ratios keep two significant digits."""
    if 0 < ratio < 0.01:
        return f"{ratio:.2g}"
    return f"{ratio:.2f}".rstrip("0").rstrip(".")


def _check_datasets(datasets: Mapping[str, Sequence[dict]]) -> None:
    """At least one dataset, and none packed (a mixture is of pairs; packing comes after mixing)."""
    if not datasets:
        raise DpokitError(f"{CONFIG_KEY}: no datasets to mix")
    for name, data in datasets.items():
        if isinstance(data, PackedPreferenceDataset):
            raise DpokitError(
                f"{CONFIG_KEY}.{name}.dataset: is packed (a `dpokit pack` file); mix unpacked datasets "
                f"and set packing to pack the mixture"
            )


def _check_weights(names: Sequence[str], weights: Mapping[str, float]) -> None:
    """Every dataset has a finite weight > 0, and every weight a dataset."""
    for name in weights:
        if name not in names:
            raise DpokitError(
                f"{CONFIG_KEY}.{name}: has a weight but no dataset (datasets: {', '.join(map(str, names))})"
            )
    for name in names:
        if name not in weights:
            raise DpokitError(f"{CONFIG_KEY}.{name}.weight: missing (a number > 0)")
        weight = weights[name]
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight <= 0:
            raise DpokitError(f"{CONFIG_KEY}.{name}.weight: {weight!r} is not a number > 0")


def _exact(weight: Real) -> Fraction:
    """A weight as the decimal it prints as (0.7 -> 7/10), so that shares come out as written."""
    return Fraction(weight) if isinstance(weight, Rational) else Fraction(str(float(weight)))


def _check_seed_and_size(seed: int, size: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DpokitError(f"{CONFIG_KEY}: seed {seed!r} is not a whole number")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise DpokitError(f"{CONFIG_KEY}: size {size!r} is not a whole number > 0")


def mixture_counts(weights: Mapping[str, Real], size: int) -> dict[str, int]:
    """Items per source: each its share of `size` by weight, rounded by largest remainder (the
    floors, then one more to each of the sources with the largest fractional parts, earlier
    sources first on ties), so the counts sum to `size` exactly."""
    exact = {name: _exact(w) for name, w in weights.items()}
    total = sum(exact.values())
    quotas = {name: w * size / total for name, w in exact.items()}
    counts = {name: math.floor(q) for name, q in quotas.items()}
    short = size - sum(counts.values())
    by_remainder = sorted(quotas, key=lambda name: quotas[name] - counts[name], reverse=True)  # stable: ties in order
    for name in by_remainder[:short]:
        counts[name] += 1
    return counts


def _generator(seed: int, salt: str) -> torch.Generator:
    """A local generator per (seed, purpose): one source's draw does not depend on the others'."""
    digest = hashlib.sha256(f"{seed}/{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _draw(length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` indices into a source of `length` items: whole seeded permutations back to back, so
    every item appears once per pass before any appears again."""
    if count == 0:
        return torch.empty(0, dtype=torch.long)
    passes = -(-count // length)
    return torch.cat([torch.randperm(length, generator=generator) for _ in range(passes)])[:count]


def _mixture_table(lengths: dict[str, int], counts: dict[str, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source position, index in that source) of every mixture item. A seeded shuffle decides which
    source each slot holds; a source's slots, in order, take its draw in order, so the mixture
    meets every item of an upsampled source once before it meets any twice."""
    labels = torch.cat([torch.full((counts[name],), p, dtype=torch.long) for p, name in enumerate(lengths)])
    labels = labels[torch.randperm(len(labels), generator=_generator(seed, "order"))]
    indices = torch.empty(len(labels), dtype=torch.long)
    for position, (name, length) in enumerate(lengths.items()):
        if counts[name] and not length:
            raise DpokitError(f"{CONFIG_KEY}.{name}: an empty dataset cannot supply {counts[name]} pairs")
        indices[labels == position] = _draw(length, counts[name], _generator(seed, f"source:{name}"))
    return labels, indices


def _item_digest(dataset: Sequence[dict]) -> str:
    """Hash of every item of a dataset (token ids and rewards), in order."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        digest.update(json.dumps(dataset[i], sort_keys=True).encode())
    return digest.hexdigest()


class MixedPreferenceDataset(Dataset):
    """A fixed weighted mixture of preference datasets (see the module docstring); build it with
    `mix_preference_datasets`. Item i is `datasets[source(i)][locate(i)[1]]`.

    Reads like a `PreferenceDataset`: `len`, indexing, iteration, `stats.summary()`, `stats.pairs`,
    `path` (a label naming the sources) and `files` (every source's files). Also `composition`
    (name -> items taken), `weights`, `seed`, `size` and `fingerprint`.
    """

    def __init__(self, datasets: Mapping[str, Sequence[dict]], weights: Mapping[str, float], *, seed: int, size: int):
        self.datasets, self.seed, self.size = dict(datasets), seed, size
        self.names = list(self.datasets)
        _check_datasets(self.datasets)
        _check_weights(self.names, weights)
        _check_seed_and_size(seed, size)
        self.weights = {name: weights[name] for name in self.names}
        self.composition = mixture_counts(self.weights, size)
        lengths = {name: len(data) for name, data in self.datasets.items()}
        self._sources, self._indices = _mixture_table(lengths, self.composition, seed)
        sources = [
            MixtureSource(name, float(self.weights[name]), lengths[name], self.composition[name]) for name in self.names
        ]
        own_stats = {name: getattr(data, "stats", None) for name, data in self.datasets.items()}
        self.stats = MixtureStats(size, sources, {n: s for n, s in own_stats.items() if s is not None})
        self.path = f"mixture of {', '.join(map(str, self.names))}"
        self.files = [f for data in self.datasets.values() for f in getattr(data, "files", [])]

    def __len__(self) -> int:
        return self.size

    def locate(self, index: int) -> tuple[str, int]:
        """(source name, index in that source) of mixture item `index`."""
        if not -self.size <= index < self.size:
            raise IndexError(f"mixture index {index} out of range for {self.size} items")
        return self.names[int(self._sources[index])], int(self._indices[index])

    def source(self, index: int) -> str:
        """The name of the source mixture item `index` comes from."""
        return self.locate(index)[0]

    def __getitem__(self, index: int) -> dict:
        name, source_index = self.locate(index)
        return self.datasets[name][source_index]

    def __iter__(self) -> Iterator[dict]:
        for position, source_index in zip(self._sources.tolist(), self._indices.tolist()):
            yield self.datasets[self.names[position]][source_index]

    @cached_property
    def table_fingerprint(self) -> str:
        """Hash of the weights, seed, size and the index table (no pass over the items): what the
        sampler's resume check compares, so a resumed run refuses a different mixture."""
        spec = {"weights": {str(n): str(_exact(w)) for n, w in self.weights.items()}, "seed": self.seed}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        digest.update(self._sources.numpy().tobytes() + self._indices.numpy().tobytes())
        return digest.hexdigest()[:16]

    @cached_property
    def fingerprint(self) -> str:
        """Hash of what defines the mixture: every source's items, the weights, seed, size and the
        resulting table. Computed on first use (one pass over the sources' items)."""
        digest = hashlib.sha256()
        spec = {
            "weights": {str(n): str(_exact(w)) for n, w in self.weights.items()},
            "seed": self.seed,
            "size": self.size,
        }
        digest.update(json.dumps(spec, sort_keys=True).encode())
        for name in self.names:
            digest.update(f"|{name}|{_item_digest(self.datasets[name])}".encode())
        digest.update(self._sources.numpy().tobytes() + self._indices.numpy().tobytes())
        return digest.hexdigest()[:16]


def mix_preference_datasets(
    datasets: Mapping[str, Sequence[dict]],
    weights: Mapping[str, float],
    *,
    seed: int = 0,
    size: int | None = None,
) -> MixedPreferenceDataset:
    """A `MixedPreferenceDataset` of `size` items (default: the sources' lengths summed) drawn from
    `datasets` in proportion to `weights` (relative, any numbers > 0; see the module docstring).
    The same datasets, weights, seed and size give the same table in every process."""
    if size is None:
        size = sum(len(data) for data in datasets.values())
    return MixedPreferenceDataset(datasets, weights, seed=seed, size=size)
