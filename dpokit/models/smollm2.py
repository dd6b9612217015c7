"""Hugging Face SmolLM2 (values from the published config.json of each checkpoint).

Plain Llama architecture with tied embeddings, a 49,152-token vocabulary and an 8K context.
"""

from __future__ import annotations

from dpokit.models.builders import preset_builders

_COMMON = dict(vocab_size=49_152, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True)

SMOLLM2_135M = dict(_COMMON, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, rope_theta=100_000.0)
SMOLLM2_360M = dict(_COMMON, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560, rope_theta=100_000.0)
SMOLLM2_1_7B = dict(_COMMON, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192, rope_theta=130_000.0)

smollm2_135m, lora_smollm2_135m = preset_builders("smollm2_135m", SMOLLM2_135M, "SmolLM2 135M")
smollm2_360m, lora_smollm2_360m = preset_builders("smollm2_360m", SMOLLM2_360M, "SmolLM2 360M")
smollm2_1_7b, lora_smollm2_1_7b = preset_builders("smollm2_1_7b", SMOLLM2_1_7B, "SmolLM2 1.7B")

ARCHITECTURES = {"smollm2_135m": SMOLLM2_135M, "smollm2_360m": SMOLLM2_360M, "smollm2_1_7b": SMOLLM2_1_7B}
