"""Decoding: a KV cache for every attention variant, greedy / temperature / top-k / top-p sampling."""

from dpokit.generation.cache import KVCache
from dpokit.generation.generate import generate, stream_tokens
from dpokit.generation.sampling import GREEDY, Sampling, filtered_probs, next_tokens
from dpokit.generation.text import stop_ids, stream_text

__all__ = [
    "GREEDY",
    "KVCache",
    "Sampling",
    "filtered_probs",
    "generate",
    "next_tokens",
    "stop_ids",
    "stream_text",
    "stream_tokens",
]
