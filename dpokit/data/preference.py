"""Map-style preference dataset: any supported file format -> tokenized pairs.

The prompt is tokenized once (ending with the assistant header), each response on its own, so a
batch can put chosen and rejected after the same prompt (padded, packed or prefix-shared) and train
on response tokens only. Item i = {"prompt_ids", "chosen_ids", "rejected_ids"} plus
"chosen_reward" / "rejected_reward" when the file has rewards.

Every record is validated when the dataset is built; a bad record is an error naming file, line
and field (or, with `skip_invalid=True`, it is skipped and counted in `stats`).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from torch.utils.data import Dataset

from dpokit.data.formats import FORMATS, PreferenceDataError, detect_format, parse_record, resolve_keys
from dpokit.data.reader import Located, read_records
from dpokit.data.tokenizer import Tokenizer
from dpokit.errors import DpokitError

__all__ = [
    "SKIP_INVALID_EFFECT",
    "DatasetStats",
    "PreferenceDataError",
    "PreferenceDataset",
    "check_enough_pairs",
    "load_preference_records",
    "truncate_pair",
]


@dataclass
class DatasetStats:
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated: int = 0
    format: str | None = None
    # kept records whose text the tokenizer treats specially: note -> their locations (file:line)
    noted: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, error: PreferenceDataError) -> None:
        self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1

    def note(self, tokenizer: Tokenizer, record: dict, where: str) -> None:
        """Count a record whose text has bytes the vocabulary lacks or special-token text."""
        for note in text_notes(tokenizer, record):
            self.noted.setdefault(note, []).append(where)

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        fmt = f", {self.format} format" if self.format else ""
        noted = "".join(f", {len(where)} {note} (first: {where[0]})" for note, where in sorted(self.noted.items()))
        return (
            f"{self.pairs} pairs, {skipped} skipped{f' ({detail})' if detail else ''}, "
            f"{self.truncated} truncated{noted}{fmt}"
        )


# Appended to the error of the first invalid record when skipping is off: the fix it has.
SKIP_INVALID_EFFECT = "skips such records and counts them by reason"
DROPPED_BYTES = "with bytes the vocabulary has no token for (dropped, as HF tokenizers does)"
SPECIAL_TOKEN_TEXT = "with special-token text in a message (encoded as plain text, not as the control token)"


def text_notes(tokenizer: Tokenizer, record: dict) -> list[str]:
    """Which of DROPPED_BYTES / SPECIAL_TOKEN_TEXT apply to a normalised record's texts."""
    texts = [m["content"] for m in record["prompt"]] + [record["chosen"], record["rejected"]]
    notes = []
    if any(tokenizer.dropped_bytes(text) for text in texts):
        notes.append(DROPPED_BYTES)
    if any(tokenizer.special_token_text(text) for text in texts):
        notes.append(SPECIAL_TOKEN_TEXT)
    return notes


def _read_all(path: str | Path | Sequence[str | Path]) -> Iterator[Located]:
    """(where, record) of one file, or of several files in order (each record located in its own)."""
    if isinstance(path, (str, os.PathLike)):
        return read_records(path)
    return itertools.chain.from_iterable(read_records(p) for p in path)


def load_preference_records(
    path: str | Path | Sequence[str | Path],
    *,
    format: str = "auto",
    keys: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
    stats: DatasetStats | None = None,
    locations: list[str] | None = None,
) -> list[dict]:
    """Every valid normalised record of a file, or of several files read in order as one dataset
    (see `dpokit.data.formats`).

    `format="auto"` takes the format of the first record that looks like one and holds every
    later record to it. Invalid records raise, or with `skip_invalid` are counted in `stats`.
    `locations`, when given, receives each returned record's location ("file:LINE").
    """
    if format != "auto" and format not in FORMATS:
        raise DpokitError(f"unknown preference data format {format!r}; choose from {['auto', *FORMATS]}")
    keys = resolve_keys(keys)
    stats = DatasetStats() if stats is None else stats
    chosen_format = None if format == "auto" else format
    records = []
    for where, record in _read_all(path):
        try:
            if isinstance(record, PreferenceDataError):
                raise record
            if chosen_format is None:
                chosen_format = detect_format(record, keys)
                if chosen_format is None:
                    shown = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
                    raise PreferenceDataError(
                        f"{where}: cannot tell the preference format from fields {shown}; "
                        f"pass format= one of {list(FORMATS)} (and keys= for renamed fields)",
                        "unknown format",
                    )
            records.append(parse_record(record, where, chosen_format, keys))
            if locations is not None:
                locations.append(where)
        except PreferenceDataError as error:
            if not skip_invalid:
                raise PreferenceDataError(
                    str(error), error.reason, fix_param="skip_invalid", fix_effect=SKIP_INVALID_EFFECT
                ) from None
            stats.skip(error)
    stats.format = chosen_format
    return records


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_seq_len: int, max_prompt_len: int):
    """Fit prompt + each response into max_seq_len: cut the prompt first (keeping its end, down to
    `max_prompt_len`), then the responses (keeping their start). Responses never become empty
    because max_prompt_len < max_seq_len. Returns (prompt, chosen, rejected, truncated)."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_seq_len:
        return prompt, chosen, rejected, False
    keep_prompt = max(max_seq_len - longest, min(len(prompt), max_prompt_len))
    prompt = prompt[len(prompt) - keep_prompt :]
    room = max_seq_len - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


class PreferenceDataset(Dataset):
    """Tokenized preference pairs: item i = {"prompt_ids", "chosen_ids", "rejected_ids"[, rewards]}.

    path: a .jsonl / .jsonl.gz / .json / .parquet file in any format of `dpokit.data.formats`.
    hub: instead of path, a Hugging Face dataset repo id ("Anthropic/hh-rlhf"): the files of its
    `split` (default "train"), of the `subset` folder when given, at `revision`, are fetched into the
    HF cache (`dpokit.data.hub`) and read in order as one dataset. For a repo in
    `dpokit.data.hub.PRESETS` its format, keys, subset and train split apply unless given here.
    format: "auto" (default) or a format name; keys: renamed fields, e.g. {"prompt": "question"}.
    `files` lists the files read; `path` is the file, or for hub= the files, whose str() names the split.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        tokenizer: Tokenizer | None = None,
        *,
        max_seq_len: int,
        max_prompt_len: int | None = None,
        skip_invalid: bool = False,
        format: str = "auto",
        keys: Mapping[str, str] | None = None,
        hub: str | None = None,
        split: str | None = None,
        subset: str | None = None,
        revision: str | None = None,
    ):
        if tokenizer is None:
            raise TypeError("PreferenceDataset() missing required argument: 'tokenizer'")
        max_prompt_len = max_seq_len // 2 if max_prompt_len is None else max_prompt_len
        if not 0 < max_prompt_len < max_seq_len:
            raise ValueError(f"max_prompt_len must be in (0, max_seq_len={max_seq_len}), got {max_prompt_len}")
        if hub is None:
            _check_local_source(path, split, subset, revision)
            self.path = Path(path)
            self.files = [self.path]
        else:
            if path is not None:
                raise DpokitError(
                    f"PreferenceDataset: give path= (a local file) or hub= (a Hugging Face dataset repo), "
                    f"not both (got path={str(path)!r}, hub={hub!r})"
                )
            from dpokit.data.hub import resolve_hub_dataset  # huggingface_hub only for hub= datasets

            resolved = resolve_hub_dataset(hub, split=split, subset=subset, revision=revision, format=format, keys=keys)
            format, keys = resolved.format, resolved.keys
            self.path = resolved.files
            self.files = list(resolved.files)
        self.stats = DatasetStats()
        self.items = []
        locations = []
        records = load_preference_records(
            self.path, format=format, keys=keys, skip_invalid=skip_invalid, stats=self.stats, locations=locations
        )
        for record, where in zip(records, locations):
            self.stats.note(tokenizer, record, where)
            prompt, chosen, rejected, truncated = truncate_pair(
                tokenizer.encode_prompt(record["prompt"]),
                tokenizer.encode_response(record["chosen"]),
                tokenizer.encode_response(record["rejected"]),
                max_seq_len,
                max_prompt_len,
            )
            self.stats.truncated += truncated
            item = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
            for key in ("chosen_reward", "rejected_reward"):
                if key in record:
                    item[key] = record[key]
            self.items.append(item)
        self.stats.pairs = len(self.items)
        if not self.items:
            raise PreferenceDataError(f"{self.path}: no valid preference pairs ({self.stats.summary()})", "empty")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _check_local_source(path, split, subset, revision) -> None:
    """path= without hub=: a file must be named, and the Hub-only settings left unset."""
    if path is None:
        raise DpokitError(
            "PreferenceDataset: give path= (a local preference file) or hub= (a Hugging Face dataset repo id)"
        )
    hub_only = [
        name for name, value in (("split", split), ("subset", subset), ("revision", revision)) if value is not None
    ]
    if hub_only:
        raise DpokitError(
            f"PreferenceDataset: {', '.join(f'{n}=' for n in hub_only)} only apply with hub= "
            f"(a Hugging Face dataset repo); path= names one file"
        )


def check_enough_pairs(dataset, pairs_per_step: int, name: str = "dataset") -> None:
    """A dataset smaller than one global batch (pairs per optimizer step, all ranks) is an error."""
    if len(dataset) < pairs_per_step:
        where = getattr(dataset, "path", name)
        raise DpokitError(f"{where}: {len(dataset)} pairs, fewer than one global batch of {pairs_per_step} pairs")
