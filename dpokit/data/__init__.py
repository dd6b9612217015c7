"""Preference data: tokenizers, file formats, datasets, collation, packing and the bundled task."""

from dpokit.data.batch import PackedBatch, PaddedBatch, PreferenceBatch
from dpokit.data.collate import IGNORE_INDEX, collate_preference_pairs
from dpokit.data.formats import FORMATS, PreferenceDataError, detect_format, parse_record
from dpokit.data.mixture import MixedPreferenceDataset, mix_preference_datasets, mixture_counts
from dpokit.data.packed import (
    PackedPreferenceDataset,
    collate_packed,
    load_packed_dataset,
    pack_preference_dataset,
    pair_length,
    training_set,
)
from dpokit.data.packing import PackingStats, first_fit_decreasing, first_fit_shuffle, pack_lengths, packing_stats
from dpokit.data.preference import (
    DatasetStats,
    PreferenceDataset,
    check_enough_pairs,
    load_preference_records,
    truncate_pair,
)
from dpokit.data.synthetic import bundled_task_path
from dpokit.data.tokenizer import CHATML_TEMPLATE, LLAMA3_TEMPLATE, ChatTemplate, Tokenizer, byte_tokenizer
from dpokit.data.validate import ValidationReport, validate_preference_file


def bundled_preference_dataset(name: str, split: str, tokenizer: Tokenizer, **kwargs) -> PreferenceDataset:
    """A `PreferenceDataset` over a task shipped with dpokit (see `dpokit.data.synthetic`)."""
    return PreferenceDataset(bundled_task_path(name, split), tokenizer, **kwargs)


__all__ = [
    "CHATML_TEMPLATE",
    "ChatTemplate",
    "DatasetStats",
    "FORMATS",
    "IGNORE_INDEX",
    "LLAMA3_TEMPLATE",
    "MixedPreferenceDataset",
    "PackedBatch",
    "PackedPreferenceDataset",
    "PackingStats",
    "PaddedBatch",
    "PreferenceBatch",
    "PreferenceDataError",
    "PreferenceDataset",
    "Tokenizer",
    "ValidationReport",
    "bundled_preference_dataset",
    "bundled_task_path",
    "byte_tokenizer",
    "check_enough_pairs",
    "collate_packed",
    "collate_preference_pairs",
    "detect_format",
    "first_fit_decreasing",
    "first_fit_shuffle",
    "load_packed_dataset",
    "load_preference_records",
    "mix_preference_datasets",
    "mixture_counts",
    "pack_lengths",
    "pack_preference_dataset",
    "packing_stats",
    "pair_length",
    "parse_record",
    "training_set",
    "truncate_pair",
    "validate_preference_file",
]
