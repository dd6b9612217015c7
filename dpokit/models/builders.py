"""The generic builders every preset calls: a plain decoder, or the same decoder with LoRA."""

from __future__ import annotations

from typing import Sequence

from dpokit.models.lora import lora_linear_factory, set_trainable_params
from dpokit.models.transformer import RopeScaling, TransformerDecoder


def llama(
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
) -> TransformerDecoder:
    """A Llama-architecture decoder (also Qwen2 with `qkv_bias=True`, Qwen3 with `qk_norm=True`,
    SmolLM2 with ties)."""
    return TransformerDecoder(
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


def lora_llama(
    *,
    lora_targets: Sequence[str] = ("q_proj", "v_proj"),
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    **llama_kwargs,
) -> TransformerDecoder:
    """`llama(...)` with LoRALinear on the projections named in `lora_targets`.

    Only the adapters are trainable. Targets: q_proj k_proj v_proj o_proj gate_proj up_proj
    down_proj lm_head (lm_head is refused when embeddings are tied: it is the embedding).
    `quantize_base=True` is QLoRA: every frozen projection weight is stored in NF4 (torchao).
    """
    if llama_kwargs.get("tie_embeddings") and "lm_head" in lora_targets:
        raise ValueError("cannot put LoRA on lm_head: this model ties its output head to the embedding")
    linear = lora_linear_factory(lora_targets, lora_rank, lora_alpha, lora_dropout, quantize_base)
    model = TransformerDecoder(linear=linear, **llama_kwargs)
    set_trainable_params(model)
    return model


def preset_builders(name: str, arch: dict, description: str):
    """The zero-argument builder `name()` and its LoRA twin `lora_name(...)` for one architecture.

    Every family module (llama3.py, qwen2_5.py, smollm2.py) declares its architectures as dicts of
    `llama()` arguments and gets its public builders from here, so they cannot drift apart.
    """

    def base() -> TransformerDecoder:
        return llama(**arch)

    def lora(
        *,
        lora_targets: Sequence[str] = ("q_proj", "v_proj"),
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        quantize_base: bool = False,
    ) -> TransformerDecoder:
        return lora_llama(
            lora_targets=lora_targets,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            quantize_base=quantize_base,
            **arch,
        )

    base.__name__ = base.__qualname__ = name
    base.__doc__ = f"{description} (plain decoder, random init; load weights with `load_hf_checkpoint`)."
    lora.__name__ = lora.__qualname__ = f"lora_{name}"
    lora.__doc__ = f"{description} with LoRA adapters (`quantize_base=True`: QLoRA, NF4 base weights)."
    return base, lora
