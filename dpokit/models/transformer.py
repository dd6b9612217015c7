"""A Llama-architecture decoder, and the few switches that make it Qwen, Mistral, Phi, Gemma or OLMo.

token embedding -> N x [RMSNorm -> grouped-query attention (RoPE, SDPA) -> residual,
RMSNorm -> gated MLP -> residual] -> RMSNorm -> output head (tied or untied).

Weights use the Hugging Face layout (`q_proj`, `gate_proj`, ... and the "rotate half" RoPE
convention), so an HF Llama/Qwen2 checkpoint loads with a pure rename of keys and no permutation.

`forward` takes optional `positions` and `attn_mask` so packed and prefix-shared batches
(several sequences in one row) use the same module: positions restart per sequence and the mask
keeps sequences apart. Without a mask attention is plain causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpokit.models.attention import attention, sliding_window_mask
from dpokit.models.moe import MoE, SparseMoE

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


@dataclass(frozen=True)
class LinearRopeScaling:
    """ "linear" RoPE scaling (position interpolation; Gemma 3's global layers): inv_freq / factor."""

    factor: float


@dataclass(frozen=True)
class LongRopeScaling:
    """ "longrope" RoPE (Phi-3 128k, Phi-3.5): per-frequency divisors, `short_factor` for batches whose
    positions all stay below `original_max_position_embeddings`, `long_factor` once any reaches it, and
    cos/sin multiplied by `attention_factor` (transformers' default: `default_attention_factor(L / original,
    original)` for a context of L positions)."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float = 1.0

    @staticmethod
    def default_attention_factor(factor: float, original_max_position_embeddings: int) -> float:
        """sqrt(1 + ln(factor) / ln(original)) for a context extended `factor` times (1 when factor <= 1)."""
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))


def rope_inverse_frequencies(
    head_dim: int,
    theta: float,
    scaling: RopeScaling | LinearRopeScaling | LongRopeScaling | None = None,
    *,
    long: bool = False,
) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/head_dim), optionally rescaled.

    Computed in float32 exactly as Meta's reference code and `transformers` do, so checkpoints see
    bit-identical rotation angles. With `RopeScaling` (Llama 3.1/3.2 "llama3" type), with
    wavelen = 2 pi / inv_freq and L = original_max_position_embeddings:
        wavelen < L / high_freq_factor: unchanged;  wavelen > L / low_freq_factor: inv_freq / factor;
        between: (1 - s) inv_freq / factor + s inv_freq,  s = (L / wavelen - low) / (high - low).
    With `LinearRopeScaling`: inv_freq / factor at every frequency. With `LongRopeScaling`:
    inv_freq[i] / short_factor[i] (`long`: / long_factor[i]).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if isinstance(scaling, LongRopeScaling):
        factors = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float32)
        return 1.0 / (factors * theta**exponents)
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScaling):
        return inv_freq / scaling.factor
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
    """x / rms(x) * scale, normalised in fp32 whatever the activation dtype.

    unit_offset (Gemma): the stored weight is scale - 1 (zero-initialised, scale = 1 + weight).
    scale_in_fp32 (Gemma, OLMo 2): the scale multiplies the fp32 normed values before the cast back,
    where Llama casts first; the same in fp32, a rounding apart in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-5, *, unit_offset: bool = False, scale_in_fp32: bool = False):
        super().__init__()
        self.eps, self.unit_offset, self.scale_in_fp32 = eps, unit_offset, scale_in_fp32 or unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scale_in_fp32:
            # torch's kernel normalises in fp32 and rounds once to x's dtype: the values of
            # (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype) in fewer passes over x (the .to()
            # rounds where autocast handed back fp32)
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps).to(x.dtype)
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = 1.0 + self.weight.float() if self.unit_offset else self.weight
        return (scale.float() * normed).to(x.dtype)


NormFactory = Callable[[int], RMSNorm]


class Attention(nn.Module):
    """Grouped-query attention with RoPE.

    fused_qkv (Phi-3): one `qkv_proj` whose output is [q | k | v] instead of three projections.
    qk_norm: "head" (Qwen3, Gemma 3) normalises each head's query and key, "projection" (OLMo 2)
        the whole q and k projections; both before RoPE.
    scale: the score scale (default 1/sqrt(head_dim); Gemma: query_pre_attn_scalar^-1/2).
    softcap: scores -> softcap * tanh(scores / softcap) (Gemma 2).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        linear: LinearFactory,
        norm: NormFactory,
        fused_qkv: bool = False,
        qk_norm: str | None = None,
        scale: float | None = None,
        softcap: float | None = None,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale, self.softcap = scale, softcap
        q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
        self.split = (q_size, kv_size, kv_size)
        if fused_qkv:
            self.qkv_proj = linear("qkv_proj", dim, q_size + 2 * kv_size, qkv_bias)
        else:
            self.q_proj = linear("q_proj", dim, q_size, qkv_bias)
            self.k_proj = linear("k_proj", dim, kv_size, qkv_bias)
            self.v_proj = linear("v_proj", dim, kv_size, qkv_bias)
        self.o_proj = linear("o_proj", q_size, dim, False)
        if qk_norm not in (None, "head", "projection"):
            raise ValueError(f"qk_norm must be None, 'head' or 'projection', got {qk_norm!r}")
        self.qk_norm = qk_norm
        if qk_norm is not None:
            self.q_norm = norm(head_dim if qk_norm == "head" else q_size)
            self.k_norm = norm(head_dim if qk_norm == "head" else kv_size)

    def project_qkv(self, x):
        if hasattr(self, "qkv_proj"):
            return self.qkv_proj(x).split(self.split, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, attn_mask, cache=None):
        batch, seq, _ = x.shape
        q, k, v = self.project_qkv(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # decoding: attend over every cached position (`dpokit.generation`)
            k, v = cache.update(k, v)
        # None = causal SDPA; a boolean tensor = masked SDPA; a FlexAttention BlockMask = flex (CUDA).
        out = attention(
            q, k, v, attn_mask, scale=self.scale, softcap=self.softcap, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with "silu" (Llama), GeGLU with "gelu_tanh" (Gemma).
    fused_gate_up (Phi-3): one `gate_up_proj` whose output is [gate | up]."""

    def __init__(
        self, dim: int, hidden_dim: int, linear: LinearFactory, activation: str = "silu", fused_gate_up: bool = False
    ):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        if fused_gate_up:
            self.gate_up_proj = linear("gate_up_proj", dim, 2 * hidden_dim, False)
        else:
            self.gate_proj = linear("gate_proj", dim, hidden_dim, False)
            self.up_proj = linear("up_proj", dim, hidden_dim, False)
        self.down_proj = linear("down_proj", hidden_dim, dim, False)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


# Where a block normalises (HF module names, so checkpoints load by a rename of the prefix):
#   "pre" (Llama):      x += attn(input_layernorm(x));   x += mlp(post_attention_layernorm(x))
#   "sandwich" (Gemma): x += post_attention_layernorm(attn(input_layernorm(x)));
#                       x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))
#   "post" (OLMo 2):    x += post_attention_layernorm(attn(x));  x += post_feedforward_layernorm(mlp(x))
NORM_PLACEMENTS = ("pre", "sandwich", "post")


class TransformerBlock(nn.Module):
    def __init__(self, attn: Attention, mlp: nn.Module, norm: NormFactory, dim: int, placement: str = "pre"):
        super().__init__()
        if placement not in NORM_PLACEMENTS:
            raise ValueError(f"norm placement must be one of {NORM_PLACEMENTS}, got {placement!r}")
        self.placement = placement
        if placement != "post":
            self.input_layernorm = norm(dim)
        self.self_attn = attn
        self.post_attention_layernorm = norm(dim)
        if placement == "sandwich":
            self.pre_feedforward_layernorm = norm(dim)
        if placement != "pre":
            self.post_feedforward_layernorm = norm(dim)
        self.mlp = mlp

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        if self.placement == "pre":
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
            return x + self.mlp(self.post_attention_layernorm(x))
        attn_in = self.input_layernorm(x) if self.placement == "sandwich" else x
        x = x + self.post_attention_layernorm(self.self_attn(attn_in, cos, sin, attn_mask, cache))
        mlp_in = self.pre_feedforward_layernorm(x) if self.placement == "sandwich" else x
        return x + self.post_feedforward_layernorm(self.mlp(mlp_in))


FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


class TransformerDecoder(nn.Module):
    """Decoder-only transformer. `forward` returns logits; `hidden_states` returns the normed
    final hidden states so the log-prob code can project them chunk by chunk.

    Beyond the Llama defaults (each a published family's choice, named after the HF field):
      head_dim, qkv_bias (Qwen2), qk_norm (Qwen3, Gemma 3, OLMo 2), fused_projections (Phi-3),
      norm_placement / unit_offset_norm / activation / embedding_scale / attn_scale (Gemma),
      attn_softcap / logit_softcap (Gemma 2), sliding_window + layer_types (Mistral, Gemma),
      local_rope_theta (Gemma 3: RoPE base of the sliding-window layers, unscaled),
      moe (Qwen3-MoE: the sparse layers' experts and router, `dpokit.models.moe.MoE`).
    """

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
        rope_scaling: RopeScaling | LinearRopeScaling | LongRopeScaling | None = None,
        norm_eps: float = 1e-5,
        qkv_bias: bool = False,
        qk_norm: str | None = None,
        tie_embeddings: bool = False,
        fused_projections: bool = False,
        norm_placement: str = "pre",
        unit_offset_norm: bool = False,
        norm_scale_in_fp32: bool = False,
        activation: str = "silu",
        embedding_scale: bool = False,
        attn_scale: float | None = None,
        attn_softcap: float | None = None,
        logit_softcap: float | None = None,
        sliding_window: int | None = None,
        layer_types: tuple[str, ...] | None = None,
        local_rope_theta: float | None = None,
        moe: MoE | None = None,
        linear: LinearFactory = plain_linear,
    ):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        head_dim = head_dim or dim // n_heads
        if layer_types is None:
            layer_types = (SLIDING_ATTENTION if sliding_window else FULL_ATTENTION,) * n_layers
        layer_types = tuple(layer_types)
        if len(layer_types) != n_layers or set(layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}:
            raise ValueError(f"layer_types must name {n_layers} layers as {FULL_ATTENTION!r} / {SLIDING_ATTENTION!r}")
        if SLIDING_ATTENTION in layer_types and not sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
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
            fused_projections=fused_projections,
            norm_placement=norm_placement,
            unit_offset_norm=unit_offset_norm,
            norm_scale_in_fp32=norm_scale_in_fp32,
            activation=activation,
            embedding_scale=embedding_scale,
            attn_scale=attn_scale,
            attn_softcap=attn_softcap,
            logit_softcap=logit_softcap,
            sliding_window=sliding_window,
            layer_types=layer_types,
            local_rope_theta=local_rope_theta,
            moe=moe,
        )
        self.tie_embeddings, self.embedding_scale, self.logit_softcap = tie_embeddings, embedding_scale, logit_softcap
        # Per layer: the window (None = full attention) and which RoPE table it rotates by.
        self.windows = [sliding_window if kind == SLIDING_ATTENTION else None for kind in layer_types]
        self.local_rope = [local_rope_theta is not None and kind == SLIDING_ATTENTION for kind in layer_types]

        def norm(size: int) -> RMSNorm:
            return RMSNorm(size, norm_eps, unit_offset=unit_offset_norm, scale_in_fp32=norm_scale_in_fp32)

        def expert_linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
            # Experts are never LoRA targets (their names match no target): frozen or NF4 under LoRA.
            return linear(f"expert_{name}", in_features, out_features, bias)

        def block(layer: int) -> TransformerBlock:
            attn = Attention(
                dim,
                n_heads,
                n_kv_heads,
                head_dim,
                qkv_bias=qkv_bias,
                linear=linear,
                norm=norm,
                fused_qkv=fused_projections,
                qk_norm=qk_norm,
                scale=attn_scale,
                softcap=attn_softcap,
            )
            if moe is not None and moe.is_sparse(layer):
                mlp = SparseMoE(dim, moe, partial(GatedMLP, dim, moe.expert_hidden_dim, expert_linear, activation))
            else:
                mlp = GatedMLP(dim, hidden_dim, linear, activation, fused_gate_up=fused_projections)
            return TransformerBlock(attn, mlp, norm, dim, norm_placement)

        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(block(i) for i in range(n_layers))
        self.norm = norm(dim)
        self.lm_head = None if tie_embeddings else linear("lm_head", dim, vocab_size, False)
        # Not buffers that are saved: derived from the config and rebuilt on every load.
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.register_buffer("local_inv_freq", torch.empty(head_dim // 2 if local_rope_theta else 0), persistent=False)
        longrope = isinstance(rope_scaling, LongRopeScaling)
        self.register_buffer("long_inv_freq", torch.empty(head_dim // 2 if longrope else 0), persistent=False)
        self.reset_rope()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE frequency tables: after a meta-device build or a move to `device`."""
        args = self.args
        device = device or self.inv_freq.device
        if torch.device(device).type == "meta":
            return
        self.inv_freq = rope_inverse_frequencies(args["head_dim"], args["rope_theta"], args["rope_scaling"]).to(device)
        local = args["local_rope_theta"]
        local_inv_freq = torch.empty(0) if local is None else rope_inverse_frequencies(args["head_dim"], local)
        self.local_inv_freq = local_inv_freq.to(device)
        scaling = args["rope_scaling"]
        long = isinstance(scaling, LongRopeScaling)
        long_inv_freq = (
            rope_inverse_frequencies(args["head_dim"], args["rope_theta"], scaling, long=True) if long else None
        )
        self.long_inv_freq = (torch.empty(0) if long_inv_freq is None else long_inv_freq).to(device)

    @property
    def output_weight(self) -> torch.Tensor:
        """The [vocab, dim] matrix of the output head (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @staticmethod
    def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
        angles = positions[:, None, :, None].float() * inv_freq.float()  # [B, 1, T, D/2]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if scale != 1.0:  # LongRoPE's attention factor, applied in fp32 before the cast as transformers does
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)

    @property
    def rope_switch_length(self) -> int | None:
        """The sequence length past which LongRoPE switches to its long factors (None: no switch)."""
        scaling = self.args["rope_scaling"]
        return scaling.original_max_position_embeddings if isinstance(scaling, LongRopeScaling) else None

    def global_rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(inv_freq, cos/sin scale) of the global RoPE table for a forward over `positions`.

        LongRoPE picks its long factors for the whole batch once the largest position id + 1
        exceeds original_max_position_embeddings (transformers' rule: a padded batch's padding
        counts, and one long sequence switches every row); torch.where keeps it free of a host sync.
        """
        scaling = self.args["rope_scaling"]
        if not isinstance(scaling, LongRopeScaling):
            return self.inv_freq, 1.0
        long = positions.max() + 1 > scaling.original_max_position_embeddings
        return torch.where(long, self.long_inv_freq, self.inv_freq), scaling.attention_factor

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """tokens [B, T] -> final normed hidden states [B, T, dim].

        positions: [B, T] position ids (default 0..T-1 in every row).
        attn_mask: what `attention` takes (None = causal); sliding-window layers get it narrowed to
        their window once per forward (`sliding_window_mask`).
        cache: a `dpokit.generation.KVCache` already advanced to these tokens: keys and values are
        stored in it and the queries attend over everything cached (its masks replace attn_mask).
        """
        batch, seq = tokens.shape
        if positions is None:
            positions = torch.arange(seq, device=tokens.device).expand(batch, seq)
        x = self.embed_tokens(tokens)
        if self.embedding_scale:  # Gemma: sqrt(dim), rounded to the activation dtype as HF does
            x = x * torch.tensor(self.dim**0.5, dtype=x.dtype)
        inv_freq, scale = self.global_rope(positions)
        tables = {False: self.rope_tables(inv_freq, positions, x.dtype, scale)}
        if any(self.local_rope):
            tables[True] = self.rope_tables(self.local_inv_freq, positions, x.dtype)
        if cache is not None:
            masks = {window: cache.mask(window) for window in set(self.windows)}
        else:
            masks = {None: attn_mask}
            for window in set(self.windows) - {None}:
                masks[window] = sliding_window_mask(attn_mask, positions, window) if window < seq else attn_mask
        for index, (layer, window, local) in enumerate(zip(self.layers, self.windows, self.local_rope)):
            layer_cache = None if cache is None else cache.layer(index)
            x = layer(x, *tables[local], masks[window], layer_cache)
        return self.norm(x)

    def output_projection(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden', weight) with hidden' @ weight^T equal to the head's logits before
        `logit_softcap`, so callers can project a chunk of rows at a time; None for a head that is
        not a bias-free matmul."""
        head = self.lm_head
        if head is None:
            return hidden, self.output_weight
        if getattr(head, "bias", None) is not None:
            return None
        if hasattr(head, "projection"):  # LoRA (adapter folded in) and NF4 layers
            return head.projection(hidden)
        return (hidden, head.weight) if isinstance(head, nn.Linear) else None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden @ self.output_weight.t() if self.lm_head is None else self.lm_head(hidden)
        if self.logit_softcap is not None:  # Gemma 2: logits -> cap * tanh(logits / cap)
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def forward(self, tokens, positions=None, attn_mask=None, cache=None) -> torch.Tensor:
        return self.project(self.hidden_states(tokens, positions, attn_mask, cache))
