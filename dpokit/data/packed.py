"""Packed and prefix-shared preference batches, packed datasets (online) and packed files (offline).

Layouts of one pair (p = prompt, c = chosen, r = rejected token ids):

  unshared        [p c] [p r]                two documents, positions 0.. in each
  prefix-shared   [p[:-1]] [p[-1] c] [p[-1] r]  one document; the prompt is computed once.

In the prefix-shared layout the rejected branch attends to the shared prompt and to itself, never
to the chosen branch, and its positions continue from the end of the prompt. The last prompt token
heads both branches (same token, same position, same visible context, so the same hidden state):
the chosen copy predicts c[0], the rejected copy r[0]. That keeps one label per position at the
cost of one extra token per pair, and neither branch sees that token twice (a duplicated key would
change the attention weights).

A packed batch is a list of packs, each a list of pairs laid out back to back. Per position:

  input_ids     token ids (pad_id after the last document of a pack)
  position_ids  RoPE positions, restarting at 0 per document
  document_ids  which document the token belongs to (-1 for padding, which attends only to padding)
  branch_ids    0 = shared by both sequences of the document, 1 = chosen branch, 2 = rejected branch
  labels        the token this position predicts when it is a response token, else IGNORE_INDEX
  sequence_ids  the sequence whose log-prob a labelled position adds to: pair j's chosen is j, its
                rejected is num_pairs + j (pairs numbered in batch order); -1 where unlabelled

Token q may attend to token k iff  document[q] == document[k], k <= q and branch[k] in {0, branch[q]}
(see `dpokit.models.attention`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from dpokit.data.batch import PackedBatch, pair_rewards
from dpokit.data.packing import PackingStats, pack_lengths, packing_stats
from dpokit.data.preference import PreferenceDataError
from dpokit.errors import DpokitError
from dpokit.fileio import atomic_file
from dpokit.logprobs import IGNORE_INDEX

CHOSEN, REJECTED = 1, 2


def pair_length(item: dict, *, prefix_sharing: bool = False) -> int:
    """Tokens a pair occupies in a pack."""
    p, c, r = len(item["prompt_ids"]), len(item["chosen_ids"]), len(item["rejected_ids"])
    return p + c + r + 1 if prefix_sharing else 2 * p + c + r


def padded_pair_length(item: dict) -> int:
    """Tokens a pair occupies in a padded batch before padding: 2 x (prompt + longer response)."""
    return 2 * (len(item["prompt_ids"]) + max(len(item["chosen_ids"]), len(item["rejected_ids"])))


def _layout_pair(item: dict, pair: int, num_pairs: int, document: int, prefix_sharing: bool) -> list[tuple]:
    """Segments (tokens, positions, document, branch, labels, sequence) of one pair."""
    prompt, chosen, rejected = item["prompt_ids"], item["chosen_ids"], item["rejected_ids"]
    p = len(prompt)

    def response_labels(response: list[int]) -> list[int]:
        # The position before each response token predicts it; the response's last token predicts nothing.
        return response[1:] + [IGNORE_INDEX]

    if not prefix_sharing:
        segments = []
        for offset, (response, sequence) in enumerate(((chosen, pair), (rejected, num_pairs + pair))):
            tokens = prompt + response
            labels = [IGNORE_INDEX] * (p - 1) + [response[0]] + response_labels(response)
            seq = [-1] * (p - 1) + [sequence] * (len(response) + 1)
            seq[-1] = -1
            segments.append((tokens, list(range(len(tokens))), document + offset, [0] * len(tokens), labels, seq))
        return segments
    chosen_seq, rejected_seq = pair, num_pairs + pair
    tokens = prompt + chosen + [prompt[-1]] + rejected
    positions = list(range(p + len(chosen))) + list(range(p - 1, p + len(rejected)))
    # The last prompt token heads each branch, so neither branch sees it twice (see the docstring).
    branches = [0] * (p - 1) + [CHOSEN] * (len(chosen) + 1) + [REJECTED] * (len(rejected) + 1)
    labels = (
        [IGNORE_INDEX] * (p - 1) + [chosen[0]] + response_labels(chosen) + [rejected[0]] + response_labels(rejected)
    )
    seq = [-1] * (p - 1) + [chosen_seq] * len(chosen) + [-1] + [rejected_seq] * len(rejected) + [-1]
    return [(tokens, positions, document, branches, labels, seq)]


def collate_packed(
    packs: Sequence[Sequence[dict]],
    *,
    pad_id: int,
    pack_size: int | None = None,
    prefix_sharing: bool = False,
    pad_to_multiple_of: int = 1,
) -> PackedBatch:
    """packs (lists of pair items) -> one `PackedBatch`, a row per pack (see the module docstring).

    pack_size fixes the row width (static shapes); None uses the longest pack, rounded up to
    `pad_to_multiple_of`. Also returns num_pairs, num_tokens (real tokens) and, when every pair
    has them, chosen_reward / rejected_reward [num_pairs].
    """
    num_pairs = sum(len(pack) for pack in packs)
    rows, pair, items = [], 0, []
    for pack in packs:
        columns = [[], [], [], [], [], []]
        for item in pack:
            for segment in _layout_pair(item, pair, num_pairs, 2 * pair, prefix_sharing):
                for column, values in zip(columns, segment):
                    column.extend(values if isinstance(values, list) else [values] * len(segment[0]))
            pair += 1
            items.append(item)
        rows.append(columns)
    longest = max(len(r[0]) for r in rows)
    if pack_size is not None and longest > pack_size:
        raise ValueError(f"a pack holds {longest} tokens, more than pack_size={pack_size}")
    width = pack_size or -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    fills = (pad_id, 0, -1, 0, IGNORE_INDEX, -1)
    names = ("input_ids", "position_ids", "document_ids", "branch_ids", "labels", "sequence_ids")
    tensors = {name: torch.full((len(rows), width), fill, dtype=torch.long) for name, fill in zip(names, fills)}
    for r, columns in enumerate(rows):
        for name, values in zip(names, columns):
            tensors[name][r, : len(values)] = torch.tensor(values, dtype=torch.long)
    chosen_reward, rejected_reward = pair_rewards(items)
    return PackedBatch(
        **tensors,
        num_pairs=num_pairs,
        num_tokens=sum(len(r[0]) for r in rows),
        prefix_sharing=prefix_sharing,
        chosen_reward=chosen_reward,
        rejected_reward=rejected_reward,
    )


class PackedPreferenceDataset(Dataset):
    """Packs of pairs from a tokenized preference dataset (online packing): item i = a list of pairs.

    Use with `DataLoader(packed, batch_size=packs_per_batch, shuffle=True,
    collate_fn=partial(collate_packed, pad_id=..., pack_size=packed.pack_size,
    prefix_sharing=packed.prefix_sharing))`. With "ffs", `set_epoch(e)` repacks in a new order.
    """

    def __init__(
        self,
        pairs: Sequence[dict],
        *,
        pack_size: int,
        algorithm: str = "ffd",
        prefix_sharing: bool = False,
        seed: int = 0,
        packs: list[list[int]] | None = None,
    ):
        self.pairs, self.pack_size, self.algorithm = pairs, pack_size, algorithm
        self.prefix_sharing, self.seed = prefix_sharing, seed
        self.lengths = [pair_length(pairs[i], prefix_sharing=prefix_sharing) for i in range(len(pairs))]
        self.path = getattr(pairs, "path", None)
        self.packs = packs if packs is not None else pack_lengths(self.lengths, pack_size, algorithm, seed=seed)
        self.stats: PackingStats = packing_stats(self.packs, self.lengths, pack_size)

    def set_epoch(self, epoch: int) -> None:
        if self.algorithm == "ffs":
            self.packs = pack_lengths(self.lengths, self.pack_size, "ffs", seed=self.seed + epoch)
            self.stats = packing_stats(self.packs, self.lengths, self.pack_size)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.pairs[i] for i in self.packs[index]]

    def save(self, path: str | Path, **metadata) -> tuple[Path, Path]:
        """Write the packs (JSONL, one pack per line: {"pairs": [...]}) and `<path>.stats.json`."""
        path = Path(path)
        with atomic_file(path, "the packed dataset") as f:  # no truncated file on a full disk or a kill
            for pack in self.packs:
                f.write(json.dumps({"pairs": [self.pairs[i] for i in pack]}) + "\n")
        stats_path = stats_path_for(path)
        stats = {
            "pack_size": self.pack_size,
            "algorithm": self.algorithm,
            "prefix_sharing": self.prefix_sharing,
            "seed": self.seed,
            **self.stats.as_dict(),
            **metadata,
        }
        with atomic_file(stats_path, "the pack statistics") as f:
            f.write(json.dumps(stats, indent=2) + "\n")
        return path, stats_path


def stats_path_for(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".stats.json")


def pack_preference_dataset(
    pairs: Sequence[dict], *, pack_size: int, algorithm: str = "ffd", prefix_sharing: bool = False, seed: int = 0
) -> PackedPreferenceDataset:
    """Online packing of a tokenized dataset (e.g. a `PreferenceDataset`)."""
    return PackedPreferenceDataset(
        pairs, pack_size=pack_size, algorithm=algorithm, prefix_sharing=prefix_sharing, seed=seed
    )


def training_set(
    dataset: Dataset,
    *,
    packer: Callable[[Dataset], PackedPreferenceDataset] | None = None,
    ld_alpha: float | None = None,
) -> tuple[Dataset, bool]:
    """(the set to train on, packed?): `packer(dataset)` when a packer is given (e.g.
    `pack_preference_dataset` with its settings bound), else `dataset` as read (a `dpokit pack` file
    is packed already).

    Refused, each with one line: packing an already packed set; `ld_alpha` (LD-DPO) outside [0, 1],
    or with packed data (it weights each response's tokens past the shorter response of its pair,
    which needs every response in its own row)."""
    if ld_alpha is not None and (
        isinstance(ld_alpha, bool) or not isinstance(ld_alpha, (int, float)) or not 0.0 <= ld_alpha <= 1.0
    ):
        raise DpokitError(f"ld_alpha: {ld_alpha!r} is not a number in [0, 1] (null turns LD-DPO off)")
    if packer is not None:
        if isinstance(dataset, PackedPreferenceDataset):
            raise DpokitError(
                "packing is set but train_dataset is already packed (a `dpokit pack` file): set packing: null"
            )
        dataset = packer(dataset)
    packed = isinstance(dataset, PackedPreferenceDataset)
    if packed and ld_alpha is not None:
        raise DpokitError(
            "ld_alpha is set but the training data is packed (packing, or a packed train_dataset): "
            "LD-DPO needs unpacked batches; set ld_alpha: null or packing: null"
        )
    return dataset, packed


def _ids(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v >= 0 for v in value):
        raise PreferenceDataError(f"{where}: expected a non-empty list of token ids", "mistyped field")
    return value


def load_packed_dataset(path: str | Path, tokenizer=None) -> PackedPreferenceDataset:
    """Read a file written by `dpokit pack` (or `PackedPreferenceDataset.save`) and its stats.

    With `tokenizer`, every token id is checked to lie in its vocabulary (a file packed with another
    tokenizer is an error, not a silently different dataset)."""
    path = Path(path)
    stats_path = stats_path_for(path)
    for p in (path, stats_path):
        if not p.is_file():
            raise PreferenceDataError(f"{p}: packed dataset file not found", "file not found")
    try:
        stats = json.loads(stats_path.read_text())
        pack_size, prefix_sharing = int(stats["pack_size"]), bool(stats["prefix_sharing"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PreferenceDataError(f"{stats_path}: not a packed-dataset stats file ({e})", "bad stats") from None
    pairs, packs = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreferenceDataError(
                    f"{where}: invalid JSON ({e.msg}, column {e.colno})", "invalid JSON"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("pairs"), list) or not record["pairs"]:
                raise PreferenceDataError(f"{where}: missing field 'pairs' (a non-empty list)", "missing field")
            pack = []
            for k, item in enumerate(record["pairs"]):
                field_where = f"{where}: field 'pairs[{k}]'"
                if not isinstance(item, dict):
                    raise PreferenceDataError(f"{field_where}: expected an object", "mistyped field")
                pair = {
                    key: _ids(item.get(key), f"{field_where}.{key}")
                    for key in ("prompt_ids", "chosen_ids", "rejected_ids")
                }
                for key in ("chosen_reward", "rejected_reward"):
                    if key in item:
                        pair[key] = float(item[key])
                pack.append(len(pairs))
                pairs.append(pair)
            used = sum(pair_length(pairs[i], prefix_sharing=prefix_sharing) for i in pack)
            if used > pack_size:
                raise PreferenceDataError(
                    f"{where}: field 'pairs': {used} tokens, more than the pack size {pack_size} in {stats_path.name}",
                    "pack too long",
                )
            if tokenizer is not None:
                for i in pack:
                    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                        if max(pairs[i][key]) >= tokenizer.vocab_size:
                            raise PreferenceDataError(
                                f"{where}: field '{key}': token id {max(pairs[i][key])} is outside the tokenizer's "
                                f"vocabulary ({tokenizer.vocab_size}); was it packed with another tokenizer?",
                                "token id out of range",
                            )
            packs.append(pack)
    return PackedPreferenceDataset(
        pairs,
        pack_size=pack_size,
        algorithm=stats.get("algorithm", "ffd"),
        prefix_sharing=prefix_sharing,
        seed=stats.get("seed", 0),
        packs=packs,
    )
