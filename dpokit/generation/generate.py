"""Autoregressive decoding of a batch of prompts with a decoder from `dpokit.models`.

    prefill: one forward over the left-padded prompts fills the KV cache;
    then per step: pick the next token of each row from its last logits, stop rows that produced
    a stop token, feed the new tokens (one position each) through the model with the cache.

Without the cache every step re-runs the whole sequence (the reference the cache is tested
against). LoRA models decode with their adapters on; `disable_adapter(model)` around the call
decodes the base (the DPO reference).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from dpokit.generation.cache import KVCache
from dpokit.generation.sampling import GREEDY, Sampling, next_tokens


def _left_padded(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        valid[row, width - len(prompt) :] = True
    return tokens, valid


def _full_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, 1, T, T]: causal over real tokens; a padding query sees only itself."""
    seq = valid.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=valid.device).tril()
    allowed = causal & valid[:, None, :]
    allowed |= torch.eye(seq, dtype=torch.bool, device=valid.device) & ~valid[:, :, None]
    return allowed.unsqueeze(1)


@torch.no_grad()
def stream_tokens(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, each row's new token (None once a row has stopped). A row stops
    after producing one of `stop_ids` (that token is yielded) or after `max_new_tokens`."""
    device = model.embed_tokens.weight.device
    tokens, valid = _left_padded(prompts, device)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        capacity = tokens.shape[1] + max_new_tokens
        # LongRoPE (Phi-3) rotates by other factors past this length: the cached keys are then
        # recomputed once with them, as transformers does when generation crosses it.
        switch = getattr(model, "rope_switch_length", None)

        def prefill():
            if not use_cache:
                return None, model(tokens, positions, _full_mask(valid))[:, -1]
            cache = KVCache.for_model(model, batch=len(prompts), capacity=capacity)
            cache.advance(positions, valid)
            return cache, model(tokens, positions, cache=cache)[:, -1]

        cache, logits = prefill()
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            new = next_tokens(logits, sampling, generator)
            yield [None if done else token for token, done in zip(new.tolist(), finished.tolist())]
            finished |= torch.isin(new, stops)
            if bool(finished.all()) or step + 1 == max_new_tokens:
                return
            next_position = positions[:, -1:] + 1
            crossing = switch is not None and int(positions.max()) + 1 <= switch < int(next_position.max()) + 1
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
            positions = torch.cat([positions, next_position], dim=1)
            if use_cache and not crossing:
                cache.advance(next_position)
                logits = model(new[:, None], next_position, cache=cache)[:, -1]
            else:
                cache, logits = prefill()
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (a stop token, when one ended the row, included)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream_tokens(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=stop_ids,
        use_cache=use_cache,
        generator=generator,
    ):
        for row, token in enumerate(step):
            if token is not None:
                out[row].append(token)
    return out
