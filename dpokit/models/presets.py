"""Zero-argument model presets (and their LoRA twins) on top of the generic builders."""

from __future__ import annotations

from functools import partial

from dpokit.models.builders import llama, lora_llama
from dpokit.models.transformer import TransformerDecoder

# A 4-layer, ~0.2M-parameter decoder over the byte-level tokenizer (256 bytes + 16 specials):
# small enough that a DPO run on a laptop CPU finishes in about a minute.
TINY = dict(
    vocab_size=272, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=172, max_seq_len=256,
    rope_theta=10_000.0,
)

LLAMA3_8B = dict(
    vocab_size=128_256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14_336,
    max_seq_len=8192, rope_theta=500_000.0, norm_eps=1e-5,
)


def tiny() -> TransformerDecoder:
    return llama(**TINY)


def lora_tiny(*, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), lora_rank=8, lora_alpha=16.0,
              lora_dropout=0.0) -> TransformerDecoder:
    return lora_llama(lora_targets=lora_targets, lora_rank=lora_rank, lora_alpha=lora_alpha,
                      lora_dropout=lora_dropout, **TINY)


def llama3_8b() -> TransformerDecoder:
    return llama(**LLAMA3_8B)


def lora_llama3_8b(*, lora_targets=("q_proj", "v_proj"), lora_rank=8, lora_alpha=16.0,
                   lora_dropout=0.0) -> TransformerDecoder:
    return lora_llama(lora_targets=lora_targets, lora_rank=lora_rank, lora_alpha=lora_alpha,
                      lora_dropout=lora_dropout, **LLAMA3_8B)
