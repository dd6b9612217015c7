"""Map-style preference dataset over JSONL: one pair per line.

Each line holds `prompt`, `chosen`, `rejected`. The prompt is a string (one user turn) or a list
of messages; a response is a string or a list holding one assistant message. The prompt is
tokenized once (ending with the assistant header), each response on its own, so a batch can put
chosen and rejected after the same prompt and train on response tokens only.

Every line is validated when the dataset is built; a bad line is an error naming file, line and
field (or, with `skip_invalid=True`, it is skipped and counted in `stats`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from dpokit.data.tokenizer import ROLES, Tokenizer
from dpokit.errors import DpokitError


class PreferenceDataError(DpokitError):
    """A malformed preference record; the message names file, line and field."""


@dataclass
class DatasetStats:
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated: int = 0

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{self.pairs} pairs, {skipped} skipped{f' ({detail})' if detail else ''}, {self.truncated} truncated"


def _messages(value: Any, where: str, *, response: bool) -> list[dict]:
    if isinstance(value, str):
        if response and not value:
            raise PreferenceDataError(f"{where}: empty response")
        return [{"role": "assistant" if response else "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise PreferenceDataError(f"{where}: expected a string or a non-empty list of messages, got {type(value).__name__}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise PreferenceDataError(f"{where}[{i}]: expected {{'role': str, 'content': str}}")
        if message.get("role") not in ROLES:
            raise PreferenceDataError(f"{where}[{i}].role: unknown role {message.get('role')!r}")
    if response:
        if len(value) != 1 or value[0]["role"] != "assistant":
            raise PreferenceDataError(f"{where}: a response must be one assistant message")
        if not value[0]["content"]:
            raise PreferenceDataError(f"{where}: empty response")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_preference_record(record: Any, where: str) -> dict:
    """Validate one JSON record -> {"prompt": messages, "chosen": str, "rejected": str}."""
    if not isinstance(record, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise PreferenceDataError(f"{where}: missing field {key!r}")
    prompt = _messages(record["prompt"], f"{where}: field 'prompt'", response=False)
    chosen = _messages(record["chosen"], f"{where}: field 'chosen'", response=True)[0]["content"]
    rejected = _messages(record["rejected"], f"{where}: field 'rejected'", response=True)[0]["content"]
    if chosen == rejected:
        raise PreferenceDataError(f"{where}: field 'rejected': identical to 'chosen'")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_jsonl(path: str | Path, *, skip_invalid: bool, stats: DatasetStats) -> list[dict]:
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise PreferenceDataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PreferenceDataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
                records.append(parse_preference_record(record, where))
            except PreferenceDataError as e:
                if not skip_invalid:
                    raise
                reason = str(e).split(": ", 1)[1]
                reason = reason.split(" (", 1)[0]
                stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
    return records


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_seq_len: int, max_prompt_len: int):
    """Fit prompt + each response into max_seq_len: cut the prompt first (keeping its end, down to
    `max_prompt_len`), then the responses (keeping their start). Responses never become empty."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_seq_len:
        return prompt, chosen, rejected, False
    keep_prompt = max(max_seq_len - longest, min(len(prompt), max_prompt_len))
    prompt = prompt[len(prompt) - keep_prompt:]
    room = max_seq_len - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


class PreferenceDataset(Dataset):
    """Tokenized preference pairs: item i = {"prompt_ids", "chosen_ids", "rejected_ids"}."""

    def __init__(
        self,
        path: str | Path,
        tokenizer: Tokenizer,
        *,
        max_seq_len: int,
        max_prompt_len: int | None = None,
        skip_invalid: bool = False,
    ):
        max_prompt_len = max_seq_len // 2 if max_prompt_len is None else max_prompt_len
        if not 0 < max_prompt_len < max_seq_len:
            raise ValueError(f"max_prompt_len must be in (0, max_seq_len={max_seq_len}), got {max_prompt_len}")
        self.path = Path(path)
        if not self.path.is_file():
            raise PreferenceDataError(f"{self.path}: preference data file not found")
        self.stats = DatasetStats()
        self.items = []
        for record in read_jsonl(self.path, skip_invalid=skip_invalid, stats=self.stats):
            prompt, chosen, rejected, truncated = truncate_pair(
                tokenizer.encode_prompt(record["prompt"]),
                tokenizer.encode_response(record["chosen"]),
                tokenizer.encode_response(record["rejected"]),
                max_seq_len,
                max_prompt_len,
            )
            self.stats.truncated += truncated
            self.items.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
        self.stats.pairs = len(self.items)
        if not self.items:
            raise PreferenceDataError(f"{self.path}: no valid preference pairs ({self.stats.summary()})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]
