"""Qwen3 MoE base/instruct (values from the published config.json of each checkpoint).

Qwen3's attention (q/k norms per head, head_dim 128, no biases, RMSNorm eps 1e-6, RoPE theta 1e6,
40,960 positions, vocabulary 151,936, untied head) with every layer sparse: 128 SwiGLU experts,
8 routed per token with renormalised top-8 weights (norm_topk_prob), router_aux_loss_coef 0.001.
30B-A3B: 30.5B parameters, 3.3B active per token; 235B-A22B: 235B, 22B active.
LoRA twins adapt attention projections (and lm_head) only: experts and router stay frozen.
"""

from __future__ import annotations

from dpokit.models.builders import preset_builders
from dpokit.models.moe import MoE

_COMMON = dict(
    vocab_size=151_936, head_dim=128, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm="head", max_seq_len=40_960
)

QWEN3_30B_A3B = dict(
    _COMMON,
    dim=2048,
    n_layers=48,
    n_heads=32,
    n_kv_heads=4,
    hidden_dim=6144,
    moe=MoE(n_experts=128, top_k=8, expert_hidden_dim=768, norm_topk_prob=True),
)
QWEN3_235B_A22B = dict(
    _COMMON,
    dim=4096,
    n_layers=94,
    n_heads=64,
    n_kv_heads=4,
    hidden_dim=12_288,
    moe=MoE(n_experts=128, top_k=8, expert_hidden_dim=1536, norm_topk_prob=True),
)

qwen3_30b_a3b, lora_qwen3_30b_a3b = preset_builders("qwen3_30b_a3b", QWEN3_30B_A3B, "Qwen3 30B-A3B (MoE)")
qwen3_235b_a22b, lora_qwen3_235b_a22b = preset_builders("qwen3_235b_a22b", QWEN3_235B_A22B, "Qwen3 235B-A22B (MoE)")

ARCHITECTURES = {"qwen3_30b_a3b": QWEN3_30B_A3B, "qwen3_235b_a22b": QWEN3_235B_A22B}
