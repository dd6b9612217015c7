"""Completions of a few fixed prompts at each validation, from the policy and from the reference,
so a run shows what the model learned, not only its metrics.

A prompt is a user message (a string) or a message list; each is rendered with the tokenizer's
chat template and its generation prompt, decoded until the template's end of turn or
`max_new_tokens`. Sampling (temperature > 0) uses a generator seeded per validation, so every rank
(which must run the same forwards under FSDP) and a resumed run draw the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from dpokit.data.tokenizer import Message
from dpokit.distributed.fsdp import reshard
from dpokit.errors import DpokitError
from dpokit.generation import Sampling, generate, stop_ids


@dataclass(frozen=True)
class SamplePrompts:
    prompts: Sequence[str | Sequence[Message]] = ()
    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0

    @staticmethod
    def messages(prompt: str | Sequence[Message]) -> list[Message]:
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def encode_prompts(tokenizer, spec: SamplePrompts) -> list[list[int]]:
    """Each prompt rendered with the chat template and its generation prompt; a prompt the template
    refuses (e.g. a system message for Mistral) is a DpokitError naming samples.prompts[i]."""
    encoded = []
    for i, prompt in enumerate(spec.prompts):
        try:
            encoded.append(tokenizer.encode_prompt(spec.messages(prompt)))
        except (ValueError, KeyError, TypeError) as e:
            raise DpokitError(f"samples.prompts[{i}]: {e}") from None
    return encoded


def sample_completions(model: nn.Module, reference, tokenizer, spec: SamplePrompts, *, step: int) -> list[dict]:
    """[{"prompt", "policy", "reference"}] for every prompt of `spec`; "reference" is what
    `reference.generating()` decodes (None when there is no reference model: precomputed log-probs
    or a reference-free loss in the full recipe; the LoRA recipes always pass the base)."""
    conversations = [spec.messages(p) for p in spec.prompts]
    prompt_ids = encode_prompts(tokenizer, spec)
    stops = stop_ids(tokenizer)
    settings = dict(max_new_tokens=spec.max_new_tokens, sampling=spec.sampling, stop_ids=stops)

    def decode(module: nn.Module) -> list[str]:
        generator = torch.Generator(device=module.embed_tokens.weight.device).manual_seed(spec.seed + step)
        outs = generate(module, prompt_ids, generator=generator, **settings)
        return [tokenizer.decode([t for t in out if t not in stops]) for out in outs]

    policy = decode(model)
    reshard(model)  # no backward follows this forward
    with reference.generating() as reference_model:
        from_reference = decode(reference_model) if reference_model is not None else [None] * len(policy)
    return [
        {"prompt": c[-1]["content"], "policy": p, "reference": r}
        for c, p, r in zip(conversations, policy, from_reference)
    ]
