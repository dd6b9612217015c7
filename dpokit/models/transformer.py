"""A Llama-architecture decoder on one page.

token embedding -> N x [RMSNorm -> grouped-query attention (RoPE, SDPA) -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output head (tied or untied).

Weights use the Hugging Face layout (`q_proj`, `gate_proj`, ... and the "rotate half" RoPE
convention), so an HF Llama/Qwen2 checkpoint loads with a pure rename of keys and no permutation.

`forward` takes optional `positions` and `attn_mask` so packed and prefix-shared batches
(several sequences in one row) use the same module: positions restart per sequence and the mask
keeps sequences apart. Without a mask attention is plain causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpokit.models.attention import attention

# Builds the q/k/v/o and MLP projections; LoRA builders pass a factory that returns LoRALinear
# for the projections they adapt, so the model code itself never knows about adapters.
LinearFactory = Callable[[str, int, int, bool], nn.Module]


def plain_linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 "llama3" frequency scaling of RoPE (long-context extension)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/head_dim), optionally rescaled as Llama 3.1 does.

    Computed in float32 exactly as Meta's reference code and `transformers` do, so checkpoints see
    bit-identical rotation angles. With `scaling` (Llama 3.1/3.2 "llama3" type), with
    wavelen = 2 pi / inv_freq and L = original_max_position_embeddings:
        wavelen < L / high_freq_factor: unchanged;  wavelen > L / low_freq_factor: inv_freq / factor;
        between: (1 - s) inv_freq / factor + s inv_freq,  s = (L / wavelen - low) / (high - low).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept; the band between is blended.
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, 1, T, D]. The "rotate half" form used by HF checkpoints."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as the reference implementations do.
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        linear: LinearFactory,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = linear("q_proj", dim, n_heads * head_dim, qkv_bias)
        self.k_proj = linear("k_proj", dim, n_kv_heads * head_dim, qkv_bias)
        self.v_proj = linear("v_proj", dim, n_kv_heads * head_dim, qkv_bias)
        self.o_proj = linear("o_proj", n_heads * head_dim, dim, False)
        # Qwen3 / OLMo 2 style: RMSNorm over each head's query and key, before RoPE.
        qk_norm = qk_norm_eps is not None
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm else None

    def forward(self, x, cos, sin, attn_mask):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # None = causal SDPA; a boolean tensor = masked SDPA; a FlexAttention BlockMask = flex (CUDA).
        out = attention(q, k, v, attn_mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, linear: LinearFactory):
        super().__init__()
        self.gate_proj = linear("gate_proj", dim, hidden_dim, False)
        self.up_proj = linear("up_proj", dim, hidden_dim, False)
        self.down_proj = linear("down_proj", hidden_dim, dim, False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(
        self, dim, n_heads, n_kv_heads, head_dim, hidden_dim, norm_eps, qkv_bias, linear: LinearFactory, qk_norm=False
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, norm_eps)
        qk_norm_eps = norm_eps if qk_norm else None
        self.self_attn = Attention(dim, n_heads, n_kv_heads, head_dim, qkv_bias, linear, qk_norm_eps)
        self.post_attention_layernorm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, hidden_dim, linear)

    def forward(self, x, cos, sin, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerDecoder(nn.Module):
    """Decoder-only transformer. `forward` returns logits; `hidden_states` returns the normed
    final hidden states so the log-prob code can project them chunk by chunk."""

    def __init__(
        self,
        *,
        vocab_size: int,
        dim: int,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int,
        hidden_dim: int,
        max_seq_len: int,
        head_dim: int | None = None,
        rope_theta: float = 500_000.0,
        rope_scaling: RopeScaling | None = None,
        norm_eps: float = 1e-5,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        tie_embeddings: bool = False,
        linear: LinearFactory = plain_linear,
    ):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        head_dim = head_dim or dim // n_heads
        self.vocab_size, self.dim, self.max_seq_len = vocab_size, dim, max_seq_len
        # The architecture as plain values: what `dpokit.models.hf_config` writes to config.json.
        self.args = dict(
            vocab_size=vocab_size,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            hidden_dim=hidden_dim,
            max_seq_len=max_seq_len,
            head_dim=head_dim,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            norm_eps=norm_eps,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            tie_embeddings=tie_embeddings,
        )
        self.tie_embeddings = tie_embeddings
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, n_heads, n_kv_heads, head_dim, hidden_dim, norm_eps, qkv_bias, linear, qk_norm)
            for _ in range(n_layers)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.lm_head = None if tie_embeddings else linear("lm_head", dim, vocab_size, False)
        # Not a buffer that is saved: it is derived from the config and rebuilt on every load.
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, rope_theta, rope_scaling), persistent=False)

    @property
    def output_weight(self) -> torch.Tensor:
        """The [vocab, dim] matrix of the output head (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        angles = positions[:, None, :, None].float() * self.inv_freq.float()  # [B, 1, T, D/2]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] -> final normed hidden states [B, T, dim].

        positions: [B, T] position ids (default 0..T-1 in every row).
        attn_mask: boolean [B, 1, T, T] (True = may attend) or None for causal attention.
        """
        batch, seq = tokens.shape
        if positions is None:
            positions = torch.arange(seq, device=tokens.device).expand(batch, seq)
        x = self.embed_tokens(tokens)
        cos, sin = self.rope_tables(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask)
        return self.norm(x)

    def output_projection(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden', weight) with hidden' @ weight^T equal to `project(hidden)`, so callers can
        project a chunk of rows at a time; None for a head that is not a bias-free matmul."""
        head = self.lm_head
        if head is None:
            return hidden, self.output_weight
        if getattr(head, "bias", None) is not None:
            return None
        if hasattr(head, "projection"):  # LoRA (adapter folded in) and NF4 layers
            return head.projection(hidden)
        return (hidden, head.weight) if isinstance(head, nn.Linear) else None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.output_weight.t() if self.lm_head is None else self.lm_head(hidden)

    def forward(self, tokens, positions=None, attn_mask=None) -> torch.Tensor:
        return self.project(self.hidden_states(tokens, positions, attn_mask))
