"""Meta Llama 3, 3.1 and 3.2 (values from the published config.json of each checkpoint).

3.1 and 3.2 extend the context to 128K with "llama3" RoPE frequency scaling (factor 8 for 3.1,
32 for 3.2, from an original 8K context); 3.2 1B/3B tie the output head to the embedding.
"""

from __future__ import annotations

from dpokit.models.builders import preset_builders
from dpokit.models.transformer import RopeScaling

_VOCAB = 128_256
_COMMON = dict(vocab_size=_VOCAB, rope_theta=500_000.0, norm_eps=1e-5)
_ROPE_3_1 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_ROPE_3_2 = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

LLAMA3_8B = dict(_COMMON, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14_336, max_seq_len=8192)
LLAMA3_70B = dict(_COMMON, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28_672, max_seq_len=8192)
LLAMA3_1_8B = dict(LLAMA3_8B, max_seq_len=131_072, rope_scaling=_ROPE_3_1)
LLAMA3_1_70B = dict(LLAMA3_70B, max_seq_len=131_072, rope_scaling=_ROPE_3_1)
LLAMA3_1_405B = dict(
    _COMMON,
    dim=16_384,
    n_layers=126,
    n_heads=128,
    n_kv_heads=8,
    hidden_dim=53_248,
    max_seq_len=131_072,
    rope_scaling=_ROPE_3_1,
)
LLAMA3_2_1B = dict(
    _COMMON,
    dim=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    hidden_dim=8192,
    max_seq_len=131_072,
    rope_scaling=_ROPE_3_2,
    tie_embeddings=True,
)
LLAMA3_2_3B = dict(
    _COMMON,
    dim=3072,
    n_layers=28,
    n_heads=24,
    n_kv_heads=8,
    head_dim=128,
    hidden_dim=8192,
    max_seq_len=131_072,
    rope_scaling=_ROPE_3_2,
    tie_embeddings=True,
)

llama3_8b, lora_llama3_8b = preset_builders("llama3_8b", LLAMA3_8B, "Llama 3 8B")
llama3_70b, lora_llama3_70b = preset_builders("llama3_70b", LLAMA3_70B, "Llama 3 70B")
llama3_1_8b, lora_llama3_1_8b = preset_builders("llama3_1_8b", LLAMA3_1_8B, "Llama 3.1 8B")
llama3_1_70b, lora_llama3_1_70b = preset_builders("llama3_1_70b", LLAMA3_1_70B, "Llama 3.1 70B")
llama3_1_405b, lora_llama3_1_405b = preset_builders("llama3_1_405b", LLAMA3_1_405B, "Llama 3.1 405B")
llama3_2_1b, lora_llama3_2_1b = preset_builders("llama3_2_1b", LLAMA3_2_1B, "Llama 3.2 1B")
llama3_2_3b, lora_llama3_2_3b = preset_builders("llama3_2_3b", LLAMA3_2_3B, "Llama 3.2 3B")

ARCHITECTURES = {
    "llama3_8b": LLAMA3_8B,
    "llama3_70b": LLAMA3_70B,
    "llama3_1_8b": LLAMA3_1_8B,
    "llama3_1_70b": LLAMA3_1_70B,
    "llama3_1_405b": LLAMA3_1_405B,
    "llama3_2_1b": LLAMA3_2_1B,
    "llama3_2_3b": LLAMA3_2_3B,
}
