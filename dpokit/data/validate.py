"""Checking a preference file before training: every invalid record, token lengths and cost.

`validate_preference_file(path, tokenizer, ...)` reads the file exactly as training does
(`load_preference_records`: the same readers, format detection and field checks) but does not
stop at the first bad record: it keeps each one's one-line error, the same `file:line: field:
reason` message the strict reader raises. For the valid pairs, tokenized the way
`PreferenceDataset` tokenizes them, it reports

  - token-length percentiles (nearest rank) of prompt, chosen, rejected and the longer sequence;
  - how many pairs a max length would truncate (`truncate_pair`, as `PreferenceDataset` does);
  - duplicate pairs, and pairs whose chosen and rejected are the same tokens as trained (e.g.
    " yes" vs "yes " under a template that trims content): such a pair has no preference signal;
  - the tokens one step computes per pair when padded, packed (FFD) and prefix-shared packed,
    and the fraction of them that is padding;
  - the pairs whose text holds bytes the vocabulary lacks or special-token text (kept, each named).

`load_tokenizer(spec, template)` builds the tokenizer from a short description ("byte", a
tokenizer.json / tokenizer.model file or a checkpoint directory), as `dpokit validate` takes it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from dpokit.data.formats import PreferenceDataError
from dpokit.data.hf_tokenizer import detect_template, hf_tokenizer, llama3_tokenizer, tokenizer_from_json
from dpokit.data.packed import pack_preference_dataset, padded_pair_length, pair_length
from dpokit.data.preference import DatasetStats, load_preference_records, truncate_pair
from dpokit.data.tokenizer import TEMPLATES, Tokenizer, byte_tokenizer
from dpokit.errors import DpokitError

__all__ = ["LayoutCost", "ValidationReport", "load_tokenizer", "percentile", "validate_preference_file"]

PERCENTILES = (50, 90, 99)
LENGTH_FIELDS = ("prompt", "chosen", "rejected", "sequence")
# File-level problems that are the caller's to fix (a wrong path, a missing optional package), not defects
# of the data: they are raised, not reported.
NOT_DATA_DEFECTS = ("file not found", "unsupported")


# --- reading every record --------------------------------------------------------------------------


@dataclass
class CollectingStats(DatasetStats):
    """`DatasetStats` that also keeps every skipped record's error, in file order."""

    errors: list[PreferenceDataError] = field(default_factory=list)

    def skip(self, error: PreferenceDataError) -> None:
        super().skip(error)
        self.errors.append(error)


def collect_records(
    path: str | Path, *, format: str = "auto", keys: Mapping[str, str] | None = None
) -> tuple[list[dict], list[str], CollectingStats]:
    """(valid normalised records, their locations, stats holding every invalid record's error).

    A problem with the file as a whole (a `.json` file that is not one JSON array, a truncated
    `.gz`) is reported as one error; nothing in such a file is checked further."""
    stats, locations = CollectingStats(), []
    try:
        records = load_preference_records(
            path, format=format, keys=keys, skip_invalid=True, stats=stats, locations=locations
        )
    except PreferenceDataError as error:
        if error.reason in NOT_DATA_DEFECTS:
            raise
        stats.skip(error)
        records, locations = [], []
    except (OSError, EOFError) as error:  # e.g. a corrupt or truncated gzip file
        stats.skip(PreferenceDataError(f"{path}: cannot read the file ({error})", "unreadable file"))
        records, locations = [], []
    return records, locations, stats


# --- statistics -------------------------------------------------------------------------------------


def percentile(values: Sequence[int], q: int) -> int:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, -(-q * len(ordered) // 100))  # ceil(q * n / 100) in integers
    return ordered[rank - 1]


def length_summary(values: Sequence[int]) -> dict[str, int]:
    """{"p50", "p90", "p99", "max"} of token lengths."""
    return {**{f"p{q}": percentile(values, q) for q in PERCENTILES}, "max": max(values)}


@dataclass(frozen=True)
class LayoutCost:
    """What a batch layout costs for the pairs: tokens the model computes, padding included."""

    name: str
    pairs: int
    computed: int  # tokens of the padded rows / of the packs, padding included
    real: int  # tokens that are not padding

    @property
    def tokens_per_pair(self) -> float:
        return self.computed / self.pairs

    @property
    def padding(self) -> float:
        """Fraction of the computed tokens that are padding."""
        return 1 - self.real / self.computed

    def as_dict(self) -> dict:
        return {
            "pairs": self.pairs,
            "computed_tokens": self.computed,
            "real_tokens": self.real,
            "tokens_per_pair": self.tokens_per_pair,
            "padding": self.padding,
        }


def padded_cost(items: Sequence[dict], batch_size: int, *, seed: int = 0) -> LayoutCost:
    """Padded batches (`collate_preference_pairs`) of `batch_size` pairs drawn in a seeded shuffled
    order, as a shuffling DataLoader draws them; each batch is as wide as its longest sequence."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    computed = 0
    for start in range(0, len(order), batch_size):
        batch = [items[i] for i in order[start : start + batch_size]]
        computed += len(batch) * max(padded_pair_length(item) for item in batch)
    real = sum(pair_length(item) for item in items)
    return LayoutCost(f"padded ({batch_size} pairs per batch)", len(items), computed, real)


def packed_cost(items: Sequence[dict], pack_size: int, *, prefix_sharing: bool) -> LayoutCost:
    """Packs of `pack_size` tokens filled by first-fit-decreasing (`pack_preference_dataset`)."""
    stats = pack_preference_dataset(items, pack_size=pack_size, algorithm="ffd", prefix_sharing=prefix_sharing).stats
    name = f"{'prefix-shared' if prefix_sharing else 'packed'} FFD (packs of {pack_size})"
    return LayoutCost(name, stats.pairs, stats.packs * stats.capacity, stats.tokens)


def find_duplicates(records: Sequence[dict]) -> list[tuple[int, int]]:
    """(index, index of its first copy) for each record with the same prompt, chosen and rejected
    as an earlier one."""
    first_seen: dict[tuple, int] = {}
    duplicates = []
    for index, record in enumerate(records):
        key = (tuple((m["role"], m["content"]) for m in record["prompt"]), record["chosen"], record["rejected"])
        if key in first_seen:
            duplicates.append((index, first_seen[key]))
        else:
            first_seen[key] = index
    return duplicates


# --- the report -------------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    path: str
    stats: CollectingStats  # .errors: every invalid record; .pairs; .truncated; .format
    tokenizer: str
    template: str
    lengths: dict[str, dict[str, int]]  # LENGTH_FIELDS -> length_summary, before truncation
    max_length: int | None
    max_prompt_length: int | None
    duplicates: list[tuple[str, str]]  # (location, location of its first copy)
    identical_tokens: list[str]  # locations of pairs whose chosen and rejected ids are equal as trained
    layouts: list[LayoutCost]

    @property
    def errors(self) -> list[PreferenceDataError]:
        return self.stats.errors

    @property
    def ok(self) -> bool:
        """Every record valid, and at least one pair (training refuses a file with none)."""
        return not self.errors and self.stats.pairs > 0

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "format": self.stats.format,
            "records": self.stats.pairs + len(self.errors),
            "pairs": self.stats.pairs,
            "invalid": len(self.errors),
            "invalid_by_reason": dict(sorted(self.stats.skipped.items())),
            "errors": [{"message": str(e), "reason": e.reason} for e in self.errors],
            "tokenizer": self.tokenizer,
            "template": self.template,
            "lengths": self.lengths,
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "truncated": self.stats.truncated,
            "duplicates": [{"location": where, "first": first} for where, first in self.duplicates],
            "identical_after_tokenization": self.identical_tokens,
            "noted": {note: where for note, where in sorted(self.stats.noted.items())},
            "layouts": {layout.name: layout.as_dict() for layout in self.layouts},
        }

    def to_text(self, max_errors: int = 20) -> str:
        max_errors = max(0, max_errors)
        lines = [str(error) for error in self.errors[:max_errors]]
        if len(self.errors) > max_errors:
            lines.append(f"... and {len(self.errors) - max_errors} more invalid records (--json lists them all)")
        fmt = f", {self.stats.format} format" if self.stats.format else ""
        lines.append(
            f"{self.path}: {self.stats.pairs + len(self.errors)} records: {self.stats.pairs} valid pairs, "
            f"{len(self.errors)} invalid{fmt}"
        )
        for reason, count in sorted(self.stats.skipped.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {count:>8}  {reason}")
        if self.lengths:
            lines += self._length_lines() + self._duplicate_lines() + self._layout_lines()
        if self.ok:
            lines.append("OK: every record is valid")
        elif self.errors:
            lines.append(
                f"FAILED: {len(self.errors)} invalid record(s); training stops at the first unless the "
                f"dataset sets skip_invalid: true (then they are skipped and counted)"
            )
        else:
            lines.append("FAILED: no preference pairs")
        return "\n".join(lines)

    def _length_lines(self) -> list[str]:
        columns = [*(f"p{q}" for q in PERCENTILES), "max"]
        lines = [
            f"token lengths ({self.tokenizer}, {self.template} template)".ljust(44)
            + "".join(f"{c:>8}" for c in columns)
        ]
        labels = {"sequence": "sequence (prompt + longer response)"}
        for name in LENGTH_FIELDS:
            values = "".join(f"{self.lengths[name][c]:>8}" for c in columns)
            lines.append(f"  {labels.get(name, name)}".ljust(44) + values)
        if self.max_length is not None:
            lines.append(
                f"max length {self.max_length}: {self.stats.truncated} of {self.stats.pairs} pairs would be "
                f"truncated (prompt first, down to {self.max_prompt_length} tokens)"
            )
        return lines

    def _duplicate_lines(self, shown: int = 5) -> list[str]:
        lines = [f"duplicates: {len(self.duplicates)} pair(s) repeat an earlier one"]
        lines += [f"  {where}: same prompt, chosen and rejected as {first}" for where, first in self.duplicates[:shown]]
        if len(self.duplicates) > shown:
            lines.append(f"  ... and {len(self.duplicates) - shown} more")
        lines.append(f"identical chosen and rejected tokens (no preference signal): {len(self.identical_tokens)}")
        lines += [f"  {where}" for where in self.identical_tokens[:shown]]
        if len(self.identical_tokens) > shown:
            lines.append(f"  ... and {len(self.identical_tokens) - shown} more")
        for note, where in sorted(self.stats.noted.items()):
            lines.append(f"{len(where)} pair(s) {note}:")
            lines += [f"  {w}" for w in where[:shown]]
            if len(where) > shown:
                lines.append(f"  ... and {len(where) - shown} more (--json lists them all)")
        return lines

    def _layout_lines(self) -> list[str]:
        padded = self.layouts[0].tokens_per_pair
        lines = ["cost".ljust(44) + f"{'tokens/pair':>12}{'padding':>9}{'vs padded':>11}"]
        for layout in self.layouts:
            lines.append(
                f"  {layout.name}".ljust(44) + f"{layout.tokens_per_pair:>12.1f}{layout.padding:>9.1%}"
                f"{layout.tokens_per_pair / padded:>10.2f}x"
            )
        return lines


def validate_preference_file(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    format: str = "auto",
    keys: Mapping[str, str] | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    batch_size: int = 8,
    pack_size: int | None = None,
    seed: int = 0,
) -> ValidationReport:
    """Check every record of a preference file and measure its valid pairs (see the module docstring).

    max_length / max_prompt_length: as `PreferenceDataset`'s max_seq_len / max_prompt_len (default
    max_length // 2); when given, truncation is counted and the costs are of the truncated pairs.
    batch_size: pairs per padded batch. pack_size: default 2 x max_length, or without a max length
    2 x the longest sequence (the smallest pack every pair fits).
    """
    if max_length is not None:
        max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
        if not 0 < max_prompt_length < max_length:
            raise DpokitError(f"max prompt length must be in (0, max length={max_length}), got {max_prompt_length}")
    if batch_size <= 0:
        raise DpokitError(f"batch size must be positive, got {batch_size}")
    records, locations, stats = collect_records(path, format=format, keys=keys)
    for record, where in zip(records, locations):
        stats.note(tokenizer, record, where)
    tokenized = [
        (
            tokenizer.encode_prompt(r["prompt"]),
            tokenizer.encode_response(r["chosen"]),
            tokenizer.encode_response(r["rejected"]),
        )
        for r in records
    ]
    lengths = {}
    if tokenized:
        prompt, chosen, rejected = ([len(ids[i]) for ids in tokenized] for i in range(3))
        sequence = [p + max(c, r) for p, c, r in zip(prompt, chosen, rejected)]
        lengths = {
            name: length_summary(values) for name, values in zip(LENGTH_FIELDS, (prompt, chosen, rejected, sequence))
        }

    items = []  # the pairs as training sees them
    for prompt_ids, chosen_ids, rejected_ids in tokenized:
        if max_length is not None:
            prompt_ids, chosen_ids, rejected_ids, truncated = truncate_pair(
                prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length
            )
            stats.truncated += truncated
        items.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    stats.pairs = len(items)

    duplicates = find_duplicates(records)
    identical = [i for i, item in enumerate(items) if item["chosen_ids"] == item["rejected_ids"]]

    layouts = []
    if items:
        longest = max_length if max_length is not None else lengths["sequence"]["max"]
        pack_size = 2 * longest if pack_size is None else pack_size
        if pack_size < 2 * longest:
            raise DpokitError(
                f"pack size {pack_size} must be at least 2 x the "
                f"{'max length' if max_length is not None else 'longest sequence'} ({2 * longest})"
            )
        layouts = [
            padded_cost(items, batch_size, seed=seed),
            packed_cost(items, pack_size, prefix_sharing=False),
            packed_cost(items, pack_size, prefix_sharing=True),
        ]
    return ValidationReport(
        path=str(path),
        stats=stats,
        tokenizer=tokenizer.name,
        template=tokenizer.template.name,
        lengths=lengths,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        duplicates=[(locations[i], locations[first]) for i, first in duplicates],
        identical_tokens=[locations[i] for i in identical],
        layouts=layouts,
    )


# --- the tokenizer from a command-line description -----------------------------------------------


def load_tokenizer(spec: str, template: str | None = None) -> Tokenizer:
    """spec: "byte" (the built-in byte-level tokenizer), a `tokenizer.json`, a Llama 3
    `tokenizer.model`, or a Hugging Face checkpoint directory. template: a name in `TEMPLATES`;
    None means llama3 for "byte" and `.model`, else the one the checkpoint's tokenizer_config.json
    (beside the tokenizer.json) uses."""
    if template is not None and template not in TEMPLATES:
        raise DpokitError(f"unknown chat template {template!r}; choose from {sorted(TEMPLATES)}")
    path = Path(spec)
    try:
        if spec == "byte":
            return byte_tokenizer(TEMPLATES[template or "llama3"])
        if path.is_dir():
            return hf_tokenizer(path, template)
        if path.is_file() and path.suffix == ".json":
            return tokenizer_from_json(path, TEMPLATES[template] if template else detect_template(path.parent))
        if path.is_file() and path.suffix == ".model":
            return llama3_tokenizer(path, TEMPLATES[template or "llama3"])
    except ValueError as e:  # includes DpokitError; e.g. a template whose special tokens the vocabulary lacks
        raise DpokitError(f"tokenizer {spec!r}: {e}") from None
    raise DpokitError(
        f"tokenizer {spec!r}: expected 'byte', a tokenizer.json or tokenizer.model file, or a checkpoint directory"
    )
