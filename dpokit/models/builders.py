"""The generic builders every preset calls: a plain decoder, or the same decoder with LoRA."""

from __future__ import annotations

from typing import Sequence

from dpokit.models.lora import MLP_PROJECTIONS, check_targets_exist, lora_linear_factory, set_trainable_params
from dpokit.models.transformer import TransformerDecoder


def llama(**arch) -> TransformerDecoder:
    """A decoder of the architecture `arch` describes: `TransformerDecoder`'s keyword arguments
    (vocab_size, dim, n_layers, n_heads, n_kv_heads, hidden_dim, max_seq_len, and the family
    switches: qkv_bias for Qwen2, qk_norm for Qwen3, fused_projections for Phi-3, ...)."""
    return TransformerDecoder(**arch)


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
    down_proj lm_head (lm_head is refused when embeddings are tied: it is the embedding; MLP
    projections are refused for MoE models, whose experts and router are never adapted).
    `quantize_base=True` is QLoRA: every frozen projection weight is stored in NF4 (torchao).
    """
    if llama_kwargs.get("tie_embeddings") and "lm_head" in lora_targets:
        raise ValueError("cannot put LoRA on lm_head: this model ties its output head to the embedding")
    if llama_kwargs.get("moe") is not None and set(lora_targets) & set(MLP_PROJECTIONS):
        # Experts and router stay without adapters; PEFT maps MLP targets onto the experts.
        raise ValueError(
            f"LoRA on MLP projections {sorted(set(lora_targets) & set(MLP_PROJECTIONS))} is not supported for "
            "MoE models: PEFT would adapt the experts with them; target the attention projections (and lm_head)"
        )
    linear = lora_linear_factory(lora_targets, lora_rank, lora_alpha, lora_dropout, quantize_base)
    model = TransformerDecoder(linear=linear, **llama_kwargs)
    check_targets_exist(model, lora_targets)
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
