"""Microsoft Phi-3 / Phi-4 (model_type phi3; values from the published config.json of each checkpoint).

The Llama block with fused projections (`qkv_proj` = [q | k | v], `gate_up_proj` = [gate | up]),
no biases, untied output head, RMSNorm eps 1e-5. Phi-3 uses the 32,064-token Llama-2-based
vocabulary and a sliding window of 2047 tokens over every layer in its 4K checkpoints (transformers
5 applies it: a query sees the 2047 latest positions, itself included); Phi-3-mini-128k extends RoPE
with "longrope" (short factors up to 4,096 positions, long factors beyond, attention factor
sqrt(1 + ln 32 / ln 4096)). Phi-4: 100,352-token vocabulary, 16K context, RoPE theta 250,000, no window.

LoRA twins default to `qkv_proj` (the fused counterpart of q_proj + v_proj); the other targets
are o_proj, gate_up_proj, down_proj and lm_head.
"""

from __future__ import annotations

from typing import Sequence

from dpokit.models.builders import lora_llama, preset_builders
from dpokit.models.transformer import LongRopeScaling

_PHI3 = dict(vocab_size=32_064, rope_theta=10_000.0, norm_eps=1e-5, fused_projections=True)
_MINI = dict(_PHI3, dim=3072, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=8192)
_MEDIUM = dict(_PHI3, dim=5120, n_layers=40, n_heads=40, n_kv_heads=10, hidden_dim=17_920)

# Phi-3-mini-128k-instruct's longrope factors, as its config.json has them (../shared/hf-real, a
# copy written by transformers 4.40.2; a later Hub revision may carry other lists: a checkpoint
# folder loaded with `load_hf_checkpoint` always uses its own).
_MINI_128K_SHORT = (
    *(1.1, 1.1, 1.1, 1.3000000000000003, 1.3500000000000003, 1.3500000000000003),
    *(1.4000000000000004, 1.5500000000000005),
    *(2.000000000000001,) * 17,
    *(2.0500000000000007,) * 6,
    *(2.1000000000000005, 2.1000000000000005, 2.1500000000000004),
    *(2.25,) * 5,
    *(2.3999999999999995, 2.4499999999999993, 2.499999999999999, 2.6999999999999984, 2.6999999999999984),
    *(2.7499999999999982, 2.799999999999998, 2.8999999999999977, 3.049999999999997),
)
_MINI_128K_LONG = (
    *(1.0700000524520874, 1.1200000047683716, 1.149999976158142, 1.4199999570846558, 1.5699999332427979),
    *(1.7999999523162842, 2.129999876022339, 2.129999876022339, 3.009999990463257, 5.910000324249268),
    *(6.950000286102295, 9.070000648498535, 9.930000305175781, 10.710000038146973, 11.130000114440918),
    *(14.609999656677246, 15.409998893737793, 19.809999465942383, 37.279998779296875, 38.279998779296875),
    *(38.599998474121094, 40.12000274658203, 46.20000457763672, 50.940006256103516, 53.66000747680664),
    *(54.9373893737793, 56.89738845825195, 57.28738784790039, 59.98738479614258, 60.86738586425781),
    *(60.887386322021484, 61.71739196777344, 62.91739273071289, 62.957393646240234, 63.41739273071289),
    *(63.8173942565918, 63.83739471435547, 63.897396087646484, 63.93739700317383, 64.06739807128906),
    *(64.11434936523438, 64.12435150146484, 64.15435028076172, 64.19435119628906, 64.24435424804688),
    *(64.57435607910156, 64.69000244140625, 64.76000213623047),
)
_MINI_128K_ROPE = LongRopeScaling(
    short_factor=_MINI_128K_SHORT,
    long_factor=_MINI_128K_LONG,
    original_max_position_embeddings=4096,
    attention_factor=LongRopeScaling.default_attention_factor(131_072 / 4096, 4096),
)

PHI3_MINI_4K = dict(_MINI, max_seq_len=4096, sliding_window=2047)
PHI3_MINI_128K = dict(_MINI, max_seq_len=131_072, sliding_window=262_144, rope_scaling=_MINI_128K_ROPE)
PHI3_MEDIUM_4K = dict(_MEDIUM, max_seq_len=4096, sliding_window=2047)
PHI4 = dict(
    vocab_size=100_352,
    dim=5120,
    n_layers=40,
    n_heads=40,
    n_kv_heads=10,
    hidden_dim=17_920,
    max_seq_len=16_384,
    rope_theta=250_000.0,
    norm_eps=1e-5,
    fused_projections=True,
)

DEFAULT_LORA_TARGETS = ("qkv_proj",)


def _builders(name: str, arch: dict, description: str):
    """`preset_builders`, with the LoRA twin's default targets on the fused projections (q_proj /
    v_proj do not exist in this layout)."""
    base, _ = preset_builders(name, arch, description)

    def lora(
        *,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        quantize_base: bool = False,
    ):
        return lora_llama(
            lora_targets=lora_targets,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            quantize_base=quantize_base,
            **arch,
        )

    lora.__name__ = lora.__qualname__ = f"lora_{name}"
    lora.__doc__ = f"{description} with LoRA adapters (`quantize_base=True`: QLoRA, NF4 base weights)."
    return base, lora


phi3_mini_4k, lora_phi3_mini_4k = _builders("phi3_mini_4k", PHI3_MINI_4K, "Phi-3-mini-4k (3.8B)")
phi3_mini_128k, lora_phi3_mini_128k = _builders("phi3_mini_128k", PHI3_MINI_128K, "Phi-3-mini-128k (3.8B, longrope)")
phi3_medium_4k, lora_phi3_medium_4k = _builders("phi3_medium_4k", PHI3_MEDIUM_4K, "Phi-3-medium-4k (14B)")
phi4, lora_phi4 = _builders("phi4", PHI4, "Phi-4 (14.7B)")

ARCHITECTURES = {
    "phi3_mini_4k": PHI3_MINI_4K,
    "phi3_mini_128k": PHI3_MINI_128K,
    "phi3_medium_4k": PHI3_MEDIUM_4K,
    "phi4": PHI4,
}
