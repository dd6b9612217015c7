"""Per-token and per-sequence log-probabilities of labelled tokens: from logits (`token_logps`,
`sequence_logps`, `length_desensitized_logps`) or straight from hidden states and the output head
without materialising the logits (`chunked_token_logps`). Labels equal to IGNORE_INDEX are not scored."""

from dpokit.logprobs.chunked import DEFAULT_CHUNK_SIZE, chunked_token_logps
from dpokit.logprobs.from_logits import IGNORE_INDEX, length_desensitized_logps, sequence_logps, token_logps

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IGNORE_INDEX",
    "chunked_token_logps",
    "length_desensitized_logps",
    "sequence_logps",
    "token_logps",
]
