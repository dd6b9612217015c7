"""Qwen3 dense base/instruct (values from the published config.json of each checkpoint).

Llama architecture without biases, plus an RMSNorm over each head's query and key before RoPE
(`qk_norm`); head_dim 128 at every size (so not hidden / heads for 0.6B, 1.7B and 4B); RMSNorm eps
1e-6, RoPE theta 1e6, 40,960 positions; vocabulary 151,936. 0.6B, 1.7B and 4B tie the output head
to the embedding. Sliding-window attention is off in every released checkpoint.
"""

from __future__ import annotations

from dpokit.models.builders import preset_builders

_COMMON = dict(
    vocab_size=151_936, head_dim=128, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm="head", max_seq_len=40_960
)
_TIED = dict(_COMMON, tie_embeddings=True)

QWEN3_0_6B = dict(_TIED, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=3072)
QWEN3_1_7B = dict(_TIED, dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=6144)
QWEN3_4B = dict(_TIED, dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=9728)
QWEN3_8B = dict(_COMMON, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=12_288)
QWEN3_14B = dict(_COMMON, dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, hidden_dim=17_408)
QWEN3_32B = dict(_COMMON, dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, hidden_dim=25_600)

qwen3_0_6b, lora_qwen3_0_6b = preset_builders("qwen3_0_6b", QWEN3_0_6B, "Qwen3 0.6B")
qwen3_1_7b, lora_qwen3_1_7b = preset_builders("qwen3_1_7b", QWEN3_1_7B, "Qwen3 1.7B")
qwen3_4b, lora_qwen3_4b = preset_builders("qwen3_4b", QWEN3_4B, "Qwen3 4B")
qwen3_8b, lora_qwen3_8b = preset_builders("qwen3_8b", QWEN3_8B, "Qwen3 8B")
qwen3_14b, lora_qwen3_14b = preset_builders("qwen3_14b", QWEN3_14B, "Qwen3 14B")
qwen3_32b, lora_qwen3_32b = preset_builders("qwen3_32b", QWEN3_32B, "Qwen3 32B")

ARCHITECTURES = {
    "qwen3_0_6b": QWEN3_0_6B,
    "qwen3_1_7b": QWEN3_1_7B,
    "qwen3_4b": QWEN3_4B,
    "qwen3_8b": QWEN3_8B,
    "qwen3_14b": QWEN3_14B,
    "qwen3_32b": QWEN3_32B,
}
