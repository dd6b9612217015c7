"""Qwen2.5 base/instruct (values from the published config.json of each checkpoint).

Llama architecture plus biases on q/k/v; RMSNorm eps 1e-6, RoPE theta 1e6, 32K native context.
0.5B, 1.5B and 3B tie the output head to the embedding (vocabulary 151,936); 7B and up do not
(vocabulary 152,064). Sliding-window attention is off in every released checkpoint.
"""

from __future__ import annotations

from dpokit.models.builders import preset_builders

_COMMON = dict(rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True, max_seq_len=32_768)
_SMALL = dict(_COMMON, vocab_size=151_936, tie_embeddings=True)
_LARGE = dict(_COMMON, vocab_size=152_064)

QWEN2_5_0_5B = dict(_SMALL, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864)
QWEN2_5_1_5B = dict(_SMALL, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, hidden_dim=8960)
QWEN2_5_3B = dict(_SMALL, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, hidden_dim=11_008)
QWEN2_5_7B = dict(_LARGE, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18_944)
QWEN2_5_14B = dict(_LARGE, dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, hidden_dim=13_824)
QWEN2_5_32B = dict(_LARGE, dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, hidden_dim=27_648)
QWEN2_5_72B = dict(_LARGE, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=29_568)

qwen2_5_0_5b, lora_qwen2_5_0_5b = preset_builders("qwen2_5_0_5b", QWEN2_5_0_5B, "Qwen2.5 0.5B")
qwen2_5_1_5b, lora_qwen2_5_1_5b = preset_builders("qwen2_5_1_5b", QWEN2_5_1_5B, "Qwen2.5 1.5B")
qwen2_5_3b, lora_qwen2_5_3b = preset_builders("qwen2_5_3b", QWEN2_5_3B, "Qwen2.5 3B")
qwen2_5_7b, lora_qwen2_5_7b = preset_builders("qwen2_5_7b", QWEN2_5_7B, "Qwen2.5 7B")
qwen2_5_14b, lora_qwen2_5_14b = preset_builders("qwen2_5_14b", QWEN2_5_14B, "Qwen2.5 14B")
qwen2_5_32b, lora_qwen2_5_32b = preset_builders("qwen2_5_32b", QWEN2_5_32B, "Qwen2.5 32B")
qwen2_5_72b, lora_qwen2_5_72b = preset_builders("qwen2_5_72b", QWEN2_5_72B, "Qwen2.5 72B")

ARCHITECTURES = {
    "qwen2_5_0_5b": QWEN2_5_0_5B,
    "qwen2_5_1_5b": QWEN2_5_1_5B,
    "qwen2_5_3b": QWEN2_5_3B,
    "qwen2_5_7b": QWEN2_5_7B,
    "qwen2_5_14b": QWEN2_5_14B,
    "qwen2_5_32b": QWEN2_5_32B,
    "qwen2_5_72b": QWEN2_5_72B,
}
