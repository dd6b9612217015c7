"""Gemma 2 and Gemma 3 text decoders (values from the published config.json of each checkpoint).

Both: sandwich RMSNorms storing scale - 1, GeGLU (tanh GELU), embeddings times sqrt(hidden_size),
scores scaled by query_pre_attn_scalar^-1/2, the head tied to the embedding, RMSNorm eps 1e-6.
Gemma 2: layers alternate sliding (4,096-token window, layer 0 first) and full attention; scores
soft-capped at 50 and logits at 30; RoPE theta 10,000; 8,192 positions; vocabulary 256,000.
Gemma 3: q/k norms per head, five sliding layers per full one, no soft-caps; the sliding layers
rotate by an unscaled RoPE table (theta 10,000), the full layers by theta 1e6 (linear scaling
x8 from 4B up); 4B-27B are the text decoders of the multimodal checkpoints (vision tower not built).
"""

from __future__ import annotations

from dpokit.models.builders import preset_builders
from dpokit.models.transformer import LinearRopeScaling

_GEMMA = dict(
    norm_placement="sandwich",
    unit_offset_norm=True,
    activation="gelu_tanh",
    embedding_scale=True,
    tie_embeddings=True,
    norm_eps=1e-6,
)


def _layer_types(n_layers: int, pattern: int) -> tuple[str, ...]:
    """Every `pattern`-th layer attends globally, the others through the sliding window."""
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers))


def _gemma2(n_layers: int, head_dim: int, query_pre_attn_scalar: int, **shape) -> dict:
    return dict(
        _GEMMA,
        vocab_size=256_000,
        max_seq_len=8192,
        rope_theta=10_000.0,
        n_layers=n_layers,
        head_dim=head_dim,
        attn_scale=query_pre_attn_scalar**-0.5,
        attn_softcap=50.0,
        logit_softcap=30.0,
        sliding_window=4096,
        layer_types=_layer_types(n_layers, 2),
        **shape,
    )


def _gemma3(n_layers: int, head_dim: int, query_pre_attn_scalar: int, **shape) -> dict:
    arch = dict(
        _GEMMA,
        vocab_size=262_208,
        max_seq_len=131_072,
        rope_theta=1_000_000.0,
        rope_scaling=LinearRopeScaling(8.0),
        local_rope_theta=10_000.0,
        qk_norm="head",
        n_layers=n_layers,
        head_dim=head_dim,
        attn_scale=query_pre_attn_scalar**-0.5,
        sliding_window=1024,
        layer_types=_layer_types(n_layers, 6),
    )
    return {**arch, **shape}


GEMMA2_2B = _gemma2(26, 256, 256, dim=2304, n_heads=8, n_kv_heads=4, hidden_dim=9216)
GEMMA2_9B = _gemma2(42, 256, 256, dim=3584, n_heads=16, n_kv_heads=8, hidden_dim=14_336)
GEMMA2_27B = _gemma2(46, 128, 144, dim=4608, n_heads=32, n_kv_heads=16, hidden_dim=36_864)
# Gemma 3 1B is text-only: its own vocabulary, 32k positions, a 512-token window, no RoPE scaling.
GEMMA3_1B = _gemma3(
    26,
    256,
    256,
    dim=1152,
    n_heads=4,
    n_kv_heads=1,
    hidden_dim=6912,
    vocab_size=262_144,
    max_seq_len=32_768,
    sliding_window=512,
    rope_scaling=None,
)
GEMMA3_4B = _gemma3(34, 256, 256, dim=2560, n_heads=8, n_kv_heads=4, hidden_dim=10_240)
GEMMA3_12B = _gemma3(48, 256, 256, dim=3840, n_heads=16, n_kv_heads=8, hidden_dim=15_360)
GEMMA3_27B = _gemma3(62, 128, 168, dim=5376, n_heads=32, n_kv_heads=16, hidden_dim=21_504)

gemma2_2b, lora_gemma2_2b = preset_builders("gemma2_2b", GEMMA2_2B, "Gemma 2 2B")
gemma2_9b, lora_gemma2_9b = preset_builders("gemma2_9b", GEMMA2_9B, "Gemma 2 9B")
gemma2_27b, lora_gemma2_27b = preset_builders("gemma2_27b", GEMMA2_27B, "Gemma 2 27B")
gemma3_1b, lora_gemma3_1b = preset_builders("gemma3_1b", GEMMA3_1B, "Gemma 3 1B")
gemma3_4b, lora_gemma3_4b = preset_builders("gemma3_4b", GEMMA3_4B, "Gemma 3 4B (text decoder)")
gemma3_12b, lora_gemma3_12b = preset_builders("gemma3_12b", GEMMA3_12B, "Gemma 3 12B (text decoder)")
gemma3_27b, lora_gemma3_27b = preset_builders("gemma3_27b", GEMMA3_27B, "Gemma 3 27B (text decoder)")

ARCHITECTURES = {
    "gemma2_2b": GEMMA2_2B,
    "gemma2_9b": GEMMA2_9B,
    "gemma2_27b": GEMMA2_27B,
    "gemma3_1b": GEMMA3_1B,
    "gemma3_4b": GEMMA3_4B,
    "gemma3_12b": GEMMA3_12B,
    "gemma3_27b": GEMMA3_27B,
}
