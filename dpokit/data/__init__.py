"""Preference data: tokenizers, datasets, collation and the bundled synthetic task."""

from dpokit.data.collate import IGNORE_INDEX, collate_preference_pairs
from dpokit.data.preference import DatasetStats, PreferenceDataError, PreferenceDataset
from dpokit.data.synthetic import bundled_task_path
from dpokit.data.tokenizer import CHATML_TEMPLATE, LLAMA3_TEMPLATE, ChatTemplate, Tokenizer, byte_tokenizer


def bundled_preference_dataset(name: str, split: str, tokenizer: Tokenizer, **kwargs) -> PreferenceDataset:
    """A `PreferenceDataset` over a task shipped with dpokit (see `dpokit.data.synthetic`)."""
    return PreferenceDataset(bundled_task_path(name, split), tokenizer, **kwargs)


__all__ = [
    "CHATML_TEMPLATE", "ChatTemplate", "DatasetStats", "IGNORE_INDEX", "LLAMA3_TEMPLATE", "PreferenceDataError",
    "PreferenceDataset", "Tokenizer", "bundled_preference_dataset", "bundled_task_path", "byte_tokenizer",
    "collate_preference_pairs",
]
