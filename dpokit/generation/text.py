"""Text in, text out: a chat (or a raw prompt) rendered by a tokenizer, decoded as it streams.

Tokens are decoded cumulatively and only the new text is emitted, holding back while the text
ends in an incomplete UTF-8 sequence (byte-level vocabularies split characters across tokens).
The template's end of turn stops a reply and is not part of its text.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from dpokit.generation.generate import stream_tokens
from dpokit.generation.sampling import GREEDY, Sampling

REPLACEMENT = "\ufffd"


def stop_ids(tokenizer) -> list[int]:
    """The ids that end a reply: the chat template's end of turn (the token a reply is trained to
    end with; `Tokenizer.encode_response`)."""
    return [tokenizer.eot_id]


def stream_text(
    model: nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[str]:
    """Yield the reply to `prompt_ids` piece by piece (concatenated: the decoded reply)."""
    stops = stop_ids(tokenizer)
    ids: list[int] = []
    shown = ""
    for step in stream_tokens(
        model,
        [list(prompt_ids)],
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=stops,
        use_cache=use_cache,
        generator=generator,
    ):
        token = step[0]
        if token is None or token in stops:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith(REPLACEMENT):  # wait for the rest of the character
            continue
        yield text[len(shown) :]
        shown = text
    text = tokenizer.decode(ids)
    if text != shown:
        yield text[len(shown) :]
