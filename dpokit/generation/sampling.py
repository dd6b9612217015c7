"""The next token from the last position's logits: greedy, or sampled with temperature, top-k
and top-p (nucleus) filtering.

    p = softmax(z / temperature), restricted to the k most likely tokens (top_k > 0) and then to
    the smallest set of most likely tokens whose probability reaches top_p, renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def filtered_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[B, V] logits -> [B, V] fp32 probabilities after temperature, top-k and top-p."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = scores.topk(min(sampling.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        drop_sorted = before >= sampling.top_p  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] -> [B] token ids."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = filtered_probs(logits, sampling)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
