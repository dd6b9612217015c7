"""OLMo 2 base/instruct (Ai2; values from the published config.json of each checkpoint).

Post-norm blocks: no input norms, the attention and MLP outputs are RMS-normed before their
residual add (`norm_placement="post"`); q and k are RMS-normed over the whole projection before
the head split and RoPE (`qk_norm="projection"`); the norms scale in fp32. No biases, untied head,
RMSNorm eps 1e-6, RoPE theta 500,000, 4,096 positions, vocabulary 100,352 (the Dolma 2 tokenizer,
padded). 1B (0425), 7B and 13B (1124) use multi-head attention, 32B (0325) 8 KV heads.
"""

from __future__ import annotations

from dpokit.models.builders import preset_builders

_COMMON = dict(
    vocab_size=100_352,
    rope_theta=500_000.0,
    norm_eps=1e-6,
    max_seq_len=4096,
    norm_placement="post",
    qk_norm="projection",
    norm_scale_in_fp32=True,
)

OLMO2_1B = dict(_COMMON, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, hidden_dim=8192)
OLMO2_7B = dict(_COMMON, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11_008)
OLMO2_13B = dict(_COMMON, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13_824)
OLMO2_32B = dict(_COMMON, dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, hidden_dim=27_648)

olmo2_1b, lora_olmo2_1b = preset_builders("olmo2_1b", OLMO2_1B, "OLMo 2 1B (OLMo-2-0425-1B)")
olmo2_7b, lora_olmo2_7b = preset_builders("olmo2_7b", OLMO2_7B, "OLMo 2 7B (OLMo-2-1124-7B)")
olmo2_13b, lora_olmo2_13b = preset_builders("olmo2_13b", OLMO2_13B, "OLMo 2 13B (OLMo-2-1124-13B)")
olmo2_32b, lora_olmo2_32b = preset_builders("olmo2_32b", OLMO2_32B, "OLMo 2 32B (OLMo-2-0325-32B)")

ARCHITECTURES = {
    "olmo2_1b": OLMO2_1B,
    "olmo2_7b": OLMO2_7B,
    "olmo2_13b": OLMO2_13B,
    "olmo2_32b": OLMO2_32B,
}
