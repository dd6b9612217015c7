"""Hugging Face `config.json` <-> our builder arguments, and the per-family key tables.

Everything family-specific about HF checkpoints lives in `FAMILIES` (one entry per `model_type`):
the `architectures` name, the translation of our parameter names into HF names, and the config
fields that must hold a given value for our decoder to compute the same function. A config
field we do not understand is an error, never silently ignored: building a model that differs
from the checkpoint without saying so is the one outcome this module exists to prevent.

    model_from_hf_config("path/to/config.json")                 # plain decoder, random init
    model_from_hf_config(cfg_dict, lora={"lora_rank": 16})      # LoRA twin (QLoRA: quantize_base)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from dpokit.errors import DpokitError
from dpokit.models.builders import llama, lora_llama
from dpokit.models.moe import MoE
from dpokit.models.transformer import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    LinearRopeScaling,
    LongRopeScaling,
    RopeScaling,
    TransformerDecoder,
)


class CheckpointError(DpokitError):
    """A Hugging Face checkpoint or config we cannot load exactly."""


# Our parameter name -> the HF name; "{}" is the layer index. Our names are the HF names of the
# decoder body without the `model.` prefix, so the tables are explicit rather than clever.
_LLAMA_KEYS = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.self_attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.self_attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.self_attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.self_attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_QWEN2_KEYS = {
    **_LLAMA_KEYS,
    "layers.{}.self_attn.q_proj.bias": "model.layers.{}.self_attn.q_proj.bias",
    "layers.{}.self_attn.k_proj.bias": "model.layers.{}.self_attn.k_proj.bias",
    "layers.{}.self_attn.v_proj.bias": "model.layers.{}.self_attn.v_proj.bias",
}
_QWEN3_KEYS = {
    **_LLAMA_KEYS,
    "layers.{}.self_attn.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "layers.{}.self_attn.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
}

# Config fields that never change the function the network computes, each with the reason. Any
# `PretrainedConfig` may carry these (transformers' own `to_dict()` writes many of them); a field
# that is absent here and changes the arithmetic is refused instead.
_IGNORED_FIELDS = {
    **dict.fromkeys(
        (
            "architectures",
            "model_type",
            "transformers_version",
            "_name_or_path",
            "_model_name_or_path",
            "_commit_hash",
            "_attn_implementation_autoset",
            "is_llama_config",
            "tokenizer_class",
            "name_or_path",
        ),
        "identity and provenance",
    ),
    **dict.fromkeys(
        ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "decoder_start_token_id"),
        "token ids for tokenizers and generation, not the forward",
    ),
    **dict.fromkeys(("torch_dtype", "dtype"), "storage dtype; the recipe chooses the compute dtype"),
    **dict.fromkeys(
        ("use_cache", "output_attentions", "output_hidden_states", "return_dict", "torchscript", "use_return_dict"),
        "what the HF forward returns or caches, not its values",
    ),
    "initializer_range": "initialisation of new weights; checkpoints bring theirs",
    "pretraining_tp": "HF splits the matmuls into tp slices: same math",
    **dict.fromkeys(
        ("id2label", "label2id", "num_labels", "problem_type", "finetuning_task"),
        "heads for classification models, absent from a causal LM",
    ),
    "chunk_size_feed_forward": "HF computes the MLP in chunks: same math",
    **dict.fromkeys(
        (
            "is_encoder_decoder",
            "is_decoder",
            "add_cross_attention",
            "cross_attention_hidden_size",
            "tie_encoder_decoder",
        ),
        "encoder-decoder options; false or unused for a causal LM",
    ),
    **dict.fromkeys(("transformers.js_config", "quantization_config_ignore"), "hints for other runtimes"),
    **dict.fromkeys(
        (
            "prefix",
            "task_specific_params",
            "tf_legacy_loss",
            "use_bfloat16",
            "pruned_heads",
            "torch_compile",
            "generation_config",
        ),
        "legacy or generation-time settings",
    ),
}
_METADATA_FIELDS = frozenset(_IGNORED_FIELDS)
# Carried from the source config.json into an exported one (the rest of `_IGNORED_FIELDS` is not).
_KEPT_ON_EXPORT = frozenset(
    {
        "architectures",
        "model_type",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_cache",
        "initializer_range",
        "_name_or_path",
        "is_llama_config",
        "pretraining_tp",
        "tokenizer_class",
        "_commit_hash",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


# The decoder's family switches (`TransformerDecoder` arguments beyond the Llama shape) at their
# Llama values. A family names the ones it sets; every other one must stay at this value for the
# family to describe a model (`Family.describes`).
SWITCH_DEFAULTS = dict(
    qkv_bias=False,
    qk_norm=None,
    fused_projections=False,
    norm_placement="pre",
    unit_offset_norm=False,
    norm_scale_in_fp32=False,
    activation="silu",
    embedding_scale=False,
    attn_scale=None,
    attn_softcap=None,
    logit_softcap=None,
    sliding_window=None,
    local_rope_theta=None,
    moe=None,
)


def _switches(*, free: tuple[str, ...] = (), **fixed) -> Callable[[Mapping], bool]:
    """A `Family.describes` predicate: the switches in `fixed` hold those values, those in `free`
    may hold anything (e.g. a soft-cap value), every other switch is at its Llama default."""
    unknown = (set(fixed) | set(free)) - set(SWITCH_DEFAULTS)
    if unknown:
        raise ValueError(f"not decoder switches: {sorted(unknown)}")

    def describes(args: Mapping) -> bool:
        for name, default in SWITCH_DEFAULTS.items():
            if name in free:
                continue
            if args.get(name, default) != fixed.get(name, default):
                return False
        return True

    return describes


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    keys: Mapping[str, str]  # our name -> HF name
    qkv_bias: bool
    qk_norm: bool = False  # RMSNorm over each head's q and k (Qwen3)
    # field -> the only value we implement (absent fields take HF's default, which is this value)
    required: Mapping[str, Any] = field(default_factory=dict)
    # fields understood only as long as `required` holds (e.g. the window size when windows are off)
    tolerated: frozenset = frozenset()
    # Whether this family lays out a decoder with these `args` (its switches); default: the plain
    # Llama switches plus this family's qkv_bias / qk_norm.
    describes: Callable[[Mapping], bool] | None = None
    # Config fields read by `to_kwargs` beyond the common architecture fields (`_ARCH_FIELDS`).
    fields: frozenset = frozenset()
    # config.json (dict, source for errors) -> decoder switches this family sets (may refuse).
    to_kwargs: Callable[[Mapping, str], dict] | None = None
    # decoder args -> the family's own config.json fields on export.
    to_config: Callable[[Mapping], dict] | None = None
    # config.json (dict, source) -> (rope_theta, rope_scaling), for families whose RoPE fields differ
    # from the common ones (default: `_rope`).
    rope: Callable[[Mapping, str], tuple] | None = None

    def matches(self, args: Mapping) -> bool:
        if self.describes is not None:
            return self.describes(args)
        return _switches(qkv_bias=self.qkv_bias, qk_norm="head" if self.qk_norm else None)(args)

    def hf_key(self, key: str) -> str | None:
        return _translate(key, self.keys)

    def our_key(self, hf_key: str) -> str | None:
        return _translate(hf_key, {v: k for k, v in self.keys.items()})


_LAYER = re.compile(r"(?<=layers\.)(\d+)(?=\.)")


_EXPERT = re.compile(r"(?<=\.experts\.)(\d+)(?=\.)")


def _translate(key: str, table: Mapping[str, str]) -> str | None:
    match = _LAYER.search(key)
    template = _LAYER.sub("{}", key, count=1) if match else key
    expert = _EXPERT.search(template)  # MoE: "{e}" in a table entry is the expert index
    if expert:
        template = _EXPERT.sub("{e}", template, count=1)
    target = table.get(template)
    if target is None:
        return None
    if expert:
        target = target.replace("{e}", expert.group(1))
    return target.format(match.group(1)) if match else target


# ---- Qwen3-MoE: Qwen3 attention, sparse expert MLPs (`dpokit.models.moe`) ------------------------
_QWEN3_MOE_KEYS = {
    **_QWEN3_KEYS,
    "layers.{}.mlp.gate.weight": "model.layers.{}.mlp.gate.weight",
    # the per-expert layout of the Hub checkpoints and of transformers' save_pretrained
    **{
        f"layers.{{}}.mlp.experts.{{e}}.{name}.weight": f"model.layers.{{}}.mlp.experts.{{e}}.{name}.weight"
        for name in ("gate_proj", "up_proj", "down_proj")
    },
}
_QWEN3_MOE_FIELDS = frozenset(
    {
        "num_experts",
        "num_local_experts",  # what transformers 5 writes for num_experts
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
        "router_aux_loss_coef",
        "output_router_logits",  # whether HF's forward returns router logits; our training always uses them
    }
)


def _qwen3_moe_kwargs(config: Mapping, source: str) -> dict:
    experts = {config[k] for k in ("num_experts", "num_local_experts") if k in config}
    if len(experts) > 1:
        raise CheckpointError(f"{source}: num_experts and num_local_experts disagree ({sorted(experts)})")
    n_experts = experts.pop() if experts else 128
    integers = dict(
        n_experts=n_experts,
        top_k=config.get("num_experts_per_tok", 8),
        expert_hidden_dim=config.get("moe_intermediate_size", 768),
        decoder_sparse_step=config.get("decoder_sparse_step", 1),
    )
    for name, value in integers.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{source}: {name} must be a positive integer, got {value!r}")
    if not integers["top_k"] <= n_experts:
        raise CheckpointError(f"{source}: num_experts_per_tok={integers['top_k']} > num_experts={n_experts}")
    n_layers = config["num_hidden_layers"]
    dense = config.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and 0 <= i < n_layers for i in dense):
        raise CheckpointError(f"{source}: mlp_only_layers must list layer indices below {n_layers}, got {dense!r}")
    norm_topk = config.get("norm_topk_prob", False)
    coef = config.get("router_aux_loss_coef", 0.001)
    if not isinstance(norm_topk, bool):
        raise CheckpointError(f"{source}: norm_topk_prob must be true or false, got {norm_topk!r}")
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or coef < 0:
        raise CheckpointError(f"{source}: router_aux_loss_coef must be a number >= 0, got {coef!r}")
    moe = MoE(**integers, norm_topk_prob=norm_topk, mlp_only_layers=tuple(dense), router_aux_loss_coef=float(coef))
    if not any(moe.is_sparse(i) for i in range(n_layers)):
        raise CheckpointError(f"{source}: no layer is sparse (decoder_sparse_step / mlp_only_layers): load it as qwen3")
    return {"moe": moe}


def _qwen3_moe_config(args: Mapping) -> dict:
    moe = args["moe"]
    return dict(
        num_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.expert_hidden_dim,
        norm_topk_prob=moe.norm_topk_prob,
        decoder_sparse_step=moe.decoder_sparse_step,
        mlp_only_layers=list(moe.mlp_only_layers),
        router_aux_loss_coef=moe.router_aux_loss_coef,
        use_sliding_window=False,
        sliding_window=None,
    )


def _describes_qwen3_moe(args: Mapping) -> bool:
    return args.get("moe") is not None and _switches(qk_norm="head", free=("moe",))(args)


# -------------------------------------------------------------------------------------------------

MISTRAL_DEFAULT_WINDOW = 4096  # transformers' MistralConfig default when config.json has no sliding_window


def _checked_window(window, source: str):
    """A config's `sliding_window`: a positive integer, or None (full attention)."""
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise CheckpointError(f"{source}: sliding_window must be a positive integer or null, got {window!r}")
    return window


def _mistral_kwargs(config: Mapping, source: str) -> dict:
    """Mistral's `sliding_window` (absent: transformers' default, 4096) on every layer; null is full
    attention. transformers masks key k for query q unless 0 <= q - k < window, as our decoder does."""
    window = _checked_window(config.get("sliding_window", MISTRAL_DEFAULT_WINDOW), source)
    return {} if window is None else {"sliding_window": window}


def _mistral_describes(args: Mapping) -> bool:
    """The Llama switches with any window, as long as it is on every layer (or off)."""
    if not _switches(free=("sliding_window",))(args):
        return False
    return args.get("sliding_window") is None or set(args["layer_types"]) == {SLIDING_ATTENTION}


def _mistral_config(args: Mapping) -> dict:
    # Always written, null included: an absent field would mean transformers' default window.
    return {"sliding_window": args["sliding_window"]}


_QWEN_WINDOW_FIELDS = frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})


def _qwen_window_kwargs(config: Mapping, source: str) -> dict:
    """Qwen2 / Qwen3 windows, as transformers reads them: off unless `use_sliding_window`; then
    `sliding_window` (default 4096) on the layers `layer_types` names, or by default on layers
    max_window_layers (default 28) and up."""
    use, window, layer_types = config.get("use_sliding_window", False), config.get("sliding_window", 4096), None
    if use not in (True, False, None):
        raise CheckpointError(f"{source}: use_sliding_window must be true or false, got {use!r}")
    if use and _checked_window(window, source) is not None:
        layer_types = config.get("layer_types")
        if layer_types is None:
            first = config.get("max_window_layers", 28)
            if not isinstance(first, int) or isinstance(first, bool):
                raise CheckpointError(f"{source}: max_window_layers must be an integer, got {first!r}")
            layer_types = [
                SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(config["num_hidden_layers"])
            ]
    else:
        window = None
    given = config.get("layer_types") if layer_types is None else layer_types
    kinds = {FULL_ATTENTION} if window is None else {FULL_ATTENTION, SLIDING_ATTENTION}
    if given is not None and (not isinstance(given, list) or not set(given) <= kinds):
        # transformers gives sliding_attention layers no window when use_sliding_window is off
        raise CheckpointError(f"{source}: layer_types {given!r}: only {sorted(kinds)} with this sliding_window")
    if given is not None and len(given) != config["num_hidden_layers"]:
        raise CheckpointError(f"{source}: layer_types names {len(given)} layers, not num_hidden_layers")
    if window is None or SLIDING_ATTENTION not in layer_types:
        return {}
    return dict(sliding_window=window, layer_types=tuple(layer_types))


def _qwen_window_config(args: Mapping) -> dict:
    window = args["sliding_window"]
    if window is None or SLIDING_ATTENTION not in args["layer_types"]:
        return {"use_sliding_window": False}
    layer_types = list(args["layer_types"])
    return {
        "use_sliding_window": True,
        "sliding_window": window,
        "max_window_layers": layer_types.index(SLIDING_ATTENTION),
        "layer_types": layer_types,
    }


# ------------------------------------------------------------------ Gemma 2 / Gemma 3 (text)
# Sandwich norms ((1 + w) RMSNorm, zero-initialised), GeGLU (tanh GELU), embeddings scaled by
# sqrt(hidden_size), score scale query_pre_attn_scalar^-1/2, sliding-window layers (layer_types),
# tied head. Gemma 2 soft-caps scores and logits; Gemma 3 adds per-head q/k norms and a second,
# unscaled RoPE table (rope_local_base_freq) for its sliding layers.
_GEMMA2_KEYS = {
    **_LLAMA_KEYS,
    "layers.{}.pre_feedforward_layernorm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "layers.{}.post_feedforward_layernorm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}
_GEMMA3_KEYS = {**_GEMMA2_KEYS, **{k: v for k, v in _QWEN3_KEYS.items() if "_norm." in k}}
_GEMMA_REQUIRED = {
    "hidden_activation": "gelu_pytorch_tanh",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_bidirectional_attention": False,
}
_GEMMA_FIELDS = frozenset(
    {
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "sliding_window",
        "layer_types",
        "cache_implementation",  # generation: which KV cache to build ("hybrid"), not the forward
        "hidden_act",  # Gemma 1's activation field, still in Gemma 2 configs; transformers reads hidden_activation
    }
)
_GEMMA3_FIELDS = _GEMMA_FIELDS | {"rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern"}
_GEMMA_SWITCHES = dict(norm_placement="sandwich", unit_offset_norm=True, activation="gelu_tanh", embedding_scale=True)
_GEMMA_FREE = ("attn_scale", "attn_softcap", "logit_softcap", "sliding_window", "norm_scale_in_fp32")


def _gemma_layer_types(config: Mapping, source: str, pattern: int) -> tuple[str, ...]:
    """layer_types as written, else transformers' rule: every `pattern`-th layer is global (full
    attention), the others slide (Gemma 2: pattern 2, layer 0 slides; Gemma 3: 6)."""
    n_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types")
    if layer_types is None:
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers))
    if len(layer_types) != n_layers or set(layer_types) - {"full_attention", "sliding_attention"}:
        raise CheckpointError(
            f"{source}: layer_types must name {n_layers} layers as full_attention / sliding_attention, "
            f"got {list(layer_types)!r}"
        )
    return tuple(layer_types)


def _gemma_kwargs(config: Mapping, source: str, layer_types: tuple[str, ...], softcaps: tuple) -> dict:
    """The switches Gemma 2 and 3 share; `softcaps`: transformers' defaults (attention, logits)."""
    window = config.get("sliding_window", 4096)
    if "sliding_attention" in layer_types and not (isinstance(window, int) and window > 0):
        raise CheckpointError(f"{source}: sliding_window={window!r}: sliding_attention layers need a positive window")
    if config.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise CheckpointError(
            f"{source}: hidden_act={config['hidden_act']!r} is not supported (only 'gelu_pytorch_tanh')"
        )
    caps = []
    for name, default in zip(("attn_logit_softcapping", "final_logit_softcapping"), softcaps):
        cap = config.get(name, default)
        if cap is not None and not (isinstance(cap, (int, float)) and cap > 0):
            raise CheckpointError(f"{source}: {name}={cap!r} must be a positive number or null")
        caps.append(None if cap is None else float(cap))
    scalar = config.get("query_pre_attn_scalar", 256)
    if not (isinstance(scalar, (int, float)) and scalar > 0):
        raise CheckpointError(f"{source}: query_pre_attn_scalar={scalar!r} must be a positive number")
    n_heads = config["num_attention_heads"]
    return dict(
        _GEMMA_SWITCHES,
        # transformers' Gemma defaults where config.json leaves a field out
        head_dim=config.get("head_dim", 256) or config["hidden_size"] // n_heads,
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        attn_scale=scalar**-0.5,
        attn_softcap=caps[0],
        logit_softcap=caps[1],
        sliding_window=window if "sliding_attention" in layer_types else None,
        layer_types=layer_types,
    )


def _gemma2_kwargs(config: Mapping, source: str) -> dict:
    kwargs = _gemma_kwargs(config, source, _gemma_layer_types(config, source, 2), softcaps=(50.0, 30.0))
    return dict(kwargs, max_seq_len=config.get("max_position_embeddings", 8192))


def _gemma3_window_pattern(config: Mapping, source: str) -> int:
    pattern = config.get("sliding_window_pattern", 6)
    legacy = config.get("_sliding_window_pattern")
    # transformers 5 reads only `sliding_window_pattern`; older versions wrote `_sliding_window_pattern`
    if config.get("layer_types") is None and legacy is not None and legacy != pattern:
        raise CheckpointError(
            f"{source}: _sliding_window_pattern={legacy!r} without layer_types: transformers 5 would use "
            f"sliding_window_pattern={pattern!r} instead; write layer_types to say which layers slide"
        )
    if not (isinstance(pattern, int) and pattern > 0):
        raise CheckpointError(f"{source}: sliding_window_pattern={pattern!r} must be a positive integer")
    return pattern


def _gemma3_rope_sets(config: Mapping, source: str) -> tuple[dict, dict]:
    """(global, local) RoPE parameters as transformers resolves them: `rope_parameters` per layer
    type (what transformers 5 writes), completed by the legacy rope_scaling / rope_theta (global
    layers) and rope_local_base_freq (sliding layers) that published checkpoints carry."""
    params = config.get("rope_parameters") or {}
    if set(params) - {"full_attention", "sliding_attention"}:
        raise CheckpointError(
            f"{source}: rope_parameters must be per layer type (full_attention / sliding_attention), "
            f"got keys {sorted(params)}"
        )
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    full.update(config.get("rope_scaling") or {})
    full.setdefault("rope_theta", config.get("rope_theta", 1_000_000.0))
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    local.setdefault("rope_theta", config.get("rope_local_base_freq", 10_000.0))
    return full, local


def _gemma3_rope(config: Mapping, source: str) -> tuple[float, RopeScaling | LinearRopeScaling | None]:
    """The global layers' RoPE: default, linear (Gemma 3 4B-27B: factor 8) or llama3."""
    full, _ = _gemma3_rope_sets(config, source)
    if full.get("rope_type", full.get("type")) == "linear":
        extra = set(full) - {"rope_type", "type", "rope_theta", "factor"}
        if extra or not isinstance(full.get("factor"), (int, float)) or full["factor"] <= 0:
            raise CheckpointError(
                f"{source}: linear rope scaling needs a positive factor and nothing else, got {full!r}"
            )
        return float(full["rope_theta"]), LinearRopeScaling(float(full["factor"]))
    return _rope({"rope_parameters": full}, f"{source} (full_attention rope)")


def _gemma3_kwargs(config: Mapping, source: str) -> dict:
    layer_types = _gemma_layer_types(config, source, _gemma3_window_pattern(config, source))
    kwargs = _gemma_kwargs(config, source, layer_types, softcaps=(None, None))
    _, local = _gemma3_rope_sets(config, source)
    extra = set(local) - {"rope_type", "type", "rope_theta"}
    if local.get("rope_type", local.get("type", "default")) != "default" or extra:
        raise CheckpointError(f"{source}: rope scaling of the sliding layers is not implemented, got {local!r}")
    return dict(
        kwargs,
        max_seq_len=config.get("max_position_embeddings", 131_072),
        qk_norm="head",
        local_rope_theta=float(local["rope_theta"]),
    )


def _query_pre_attn_scalar(args: Mapping) -> float:
    """The scalar s with s^-1/2 == attn_scale exactly (an integer where one is: 256, 168, 144)."""
    scale = args["attn_scale"] if args["attn_scale"] is not None else args["head_dim"] ** -0.5
    exact = round(scale**-2)
    return exact if exact > 0 and exact**-0.5 == scale else scale**-2


def _gemma_config(args: Mapping) -> dict:
    layer_types = list(args["layer_types"])
    return dict(
        query_pre_attn_scalar=_query_pre_attn_scalar(args),
        attn_logit_softcapping=args["attn_softcap"],
        final_logit_softcapping=args["logit_softcap"],
        layer_types=layer_types,
        # a model without sliding layers keeps transformers' default window out of its masks
        sliding_window=args["sliding_window"] if "sliding_attention" in layer_types else None,
    )


def _gemma3_config(args: Mapping) -> dict:
    """Gemma 3's export in the published (legacy) form: rope_theta / rope_scaling for the global
    layers, rope_local_base_freq for the sliding ones (transformers 5 turns them into
    rope_parameters per layer type)."""
    local = args["local_rope_theta"]
    return dict(_gemma_config(args), rope_local_base_freq=args["rope_theta"] if local is None else local)


def _gemma3_describes(args: Mapping) -> bool:
    # sliding layers rotate by their own unscaled table, so a model whose sliding layers use the
    # global one (local_rope_theta None) is Gemma 3 only without sliding layers
    slides = "sliding_attention" in tuple(args.get("layer_types") or ())
    return _switches(free=(*_GEMMA_FREE, "local_rope_theta"), qk_norm="head", **_GEMMA_SWITCHES)(args) and (
        args.get("local_rope_theta") is not None or not slides
    )


_GEMMA3_MULTIMODAL_FIELDS = frozenset(
    {
        "text_config",
        "vision_config",
        "mm_tokens_per_image",
        "boi_token_index",
        "eoi_token_index",
        "image_token_index",
        "tie_word_embeddings",
    }
)


def _gemma3_text_config(config: Mapping, source: str) -> tuple[dict, str]:
    """Gemma3ForConditionalGeneration (model_type gemma3) -> its text decoder's config
    (text_config as a gemma3_text config). The vision tower is not built."""
    unknown = set(config) - _GEMMA3_MULTIMODAL_FIELDS - _METADATA_FIELDS
    if unknown:
        raise CheckpointError(f"{source}: config field(s) {sorted(unknown)} not understood for model_type 'gemma3'")
    text = dict(config.get("text_config") or {})
    text.setdefault("model_type", "gemma3_text")
    if text["model_type"] != "gemma3_text":
        raise CheckpointError(f"{source}: text_config.model_type={text['model_type']!r}, expected 'gemma3_text'")
    tied = config.get("tie_word_embeddings", True)
    if text.get("tie_word_embeddings", tied) != tied:
        raise CheckpointError(
            f"{source}: tie_word_embeddings={tied!r} but text_config.tie_word_embeddings="
            f"{text['tie_word_embeddings']!r}"
        )
    text["tie_word_embeddings"] = tied
    return text, f"{source} (text_config)"


def refuse_multimodal_weights(checkpoint_dir: str | Path) -> None:
    """A multimodal checkpoint's config builds its text decoder, but its weights are not loaded:
    the vision tower would be neither trained nor saved back, so the folder is refused by name."""
    config, source = read_hf_config(checkpoint_dir)
    if config.get("model_type") in MULTIMODAL_TEXT_CONFIGS:
        architecture = (config.get("architectures") or [config["model_type"]])[0]
        raise CheckpointError(
            f"{source}: a {architecture} checkpoint (text decoder + vision tower): dpokit loads text decoders "
            "only; save its text decoder as a Gemma3ForCausalLM folder first (config.json: its text_config; "
            "weights: its language_model.model.* tensors named model.*) and load that"
        )


# model_type of a multimodal wrapper -> (config, source) -> (its text decoder's config, source)
MULTIMODAL_TEXT_CONFIGS: dict[str, Callable[[Mapping, str], tuple[dict, str]]] = {"gemma3": _gemma3_text_config}


FAMILIES: dict[str, Family] = {
    "llama": Family(
        model_type="llama",
        architecture="LlamaForCausalLM",
        keys=_LLAMA_KEYS,
        qkv_bias=False,
        required={
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "rope_interleaved": False,
        },
    ),
    "qwen2": Family(
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        keys=_QWEN2_KEYS,
        qkv_bias=True,
        required={"hidden_act": "silu", "attention_dropout": 0.0, "use_mrope": False},
        describes=_switches(qkv_bias=True, free=("sliding_window",)),
        fields=_QWEN_WINDOW_FIELDS,
        to_kwargs=_qwen_window_kwargs,
        to_config=_qwen_window_config,
    ),
    # Mistral 7B v0.1 - v0.3, Nemo, Small: the Llama layout, every layer attending within
    # `sliding_window` tokens (null: full attention).
    "mistral": Family(
        model_type="mistral",
        architecture="MistralForCausalLM",
        keys=_LLAMA_KEYS,
        qkv_bias=False,
        required={"hidden_act": "silu", "attention_dropout": 0.0},
        describes=_mistral_describes,
        fields=frozenset({"sliding_window"}),
        to_kwargs=_mistral_kwargs,
        to_config=_mistral_config,
    ),
    "qwen3": Family(
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        keys=_QWEN3_KEYS,
        qkv_bias=False,
        qk_norm=True,
        required={"hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0},
        describes=_switches(qk_norm="head", free=("sliding_window",)),
        fields=_QWEN_WINDOW_FIELDS,
        to_kwargs=_qwen_window_kwargs,
        to_config=_qwen_window_config,
    ),
    "qwen3_moe": Family(
        model_type="qwen3_moe",
        architecture="Qwen3MoeForCausalLM",
        keys=_QWEN3_MOE_KEYS,
        qkv_bias=False,
        qk_norm=True,
        required={"hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False},
        tolerated=frozenset({"sliding_window", "max_window_layers", "layer_types"}),
        describes=_describes_qwen3_moe,
        fields=_QWEN3_MOE_FIELDS,
        to_kwargs=_qwen3_moe_kwargs,
        to_config=_qwen3_moe_config,
    ),
    "gemma2": Family(
        model_type="gemma2",
        architecture="Gemma2ForCausalLM",
        keys=_GEMMA2_KEYS,
        qkv_bias=False,
        required=_GEMMA_REQUIRED,
        describes=_switches(free=_GEMMA_FREE, **_GEMMA_SWITCHES),
        fields=_GEMMA_FIELDS,
        to_kwargs=_gemma2_kwargs,
        to_config=_gemma_config,
    ),
    "gemma3_text": Family(
        model_type="gemma3_text",
        architecture="Gemma3ForCausalLM",
        keys=_GEMMA3_KEYS,
        qkv_bias=False,
        required=_GEMMA_REQUIRED,
        describes=_gemma3_describes,
        fields=_GEMMA3_FIELDS,
        to_kwargs=_gemma3_kwargs,
        to_config=_gemma3_config,
        rope=_gemma3_rope,
    ),
}


# ------------------------------------------------------------------------------- Phi-3 / Phi-4
# Phi-3-mini/medium, Phi-3.5-mini and Phi-4 (all model_type phi3): the Llama block with fused
# `qkv_proj` ([q | k | v]) and `gate_up_proj` ([gate | up]); an optional sliding window over every
# layer; RoPE default or "longrope" (128k checkpoints).
_PHI3_KEYS = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.self_attn.qkv_proj.weight": "model.layers.{}.self_attn.qkv_proj.weight",
    "layers.{}.self_attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.mlp.gate_up_proj.weight": "model.layers.{}.mlp.gate_up_proj.weight",
    "layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
PHI3_DEFAULT_CONTEXT = 4096  # Phi3Config's max_position_embeddings and original_max_position_embeddings
_PHI3_ROPE_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_PHI3_LONGROPE_FIELDS = {
    "short_factor",
    "long_factor",
    "factor",
    "attention_factor",
    "original_max_position_embeddings",
}


def _phi3_rope(config: Mapping, source: str) -> tuple[float, LongRopeScaling | None]:
    """Phi3Config's reading of the RoPE fields: the legacy `rope_scaling` dict wins over
    `rope_parameters`, theta inside the dict over the top-level one, "su" / "yarn" mean longrope,
    and the top-level original_max_position_embeddings (default 4096) is the one used."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10_000.0)))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor={partial!r} is not supported (only 1.0)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type
    if rope_type == "default":
        extra = set(params) - _PHI3_ROPE_COMMON
        if extra:
            raise CheckpointError(f"{source}: rope parameters {sorted(extra)} are not supported with default RoPE")
        return theta, None
    if rope_type != "longrope":
        raise CheckpointError(
            f"{source}: rope scaling type {rope_type!r} is not implemented for phi3 (supported: default, longrope)"
        )
    extra = set(params) - _PHI3_ROPE_COMMON - _PHI3_LONGROPE_FIELDS
    if extra:
        raise CheckpointError(f"{source}: longrope rope parameters {sorted(extra)} are not supported")
    half = (config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]) // 2
    factors = {}
    for name in ("short_factor", "long_factor"):
        value = params.get(name)
        numbers = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        if not numbers or len(value) != half:
            raise CheckpointError(f"{source}: longrope {name} must be a list of {half} numbers (head_dim / 2)")
        factors[name] = tuple(float(v) for v in value)
    original = config.get("original_max_position_embeddings", PHI3_DEFAULT_CONTEXT)
    if not isinstance(original, int) or original < 2:
        raise CheckpointError(f"{source}: original_max_position_embeddings must be an integer > 1, got {original!r}")
    inner = params.get("original_max_position_embeddings", original)
    if inner != original:  # transformers silently takes the top-level one
        raise CheckpointError(
            f"{source}: rope original_max_position_embeddings={inner!r} differs from the top-level {original}"
        )
    attention = params.get("attention_factor")
    if attention is None:
        factor = params.get("factor")
        if factor is None:
            factor = config.get("max_position_embeddings", PHI3_DEFAULT_CONTEXT) / original
        attention = LongRopeScaling.default_attention_factor(factor, original)
    return theta, LongRopeScaling(**factors, original_max_position_embeddings=original, attention_factor=attention)


def _phi3_to_kwargs(config: Mapping, source: str) -> dict:
    window = _checked_window(config.get("sliding_window"), source)
    # transformers 5 keeps key k for query q when q - k < sliding_window (Phi-3-mini-4k: 2047 of
    # 4096), which is our window rule; a window of at least the context never masks anything.
    return dict(
        fused_projections=True,
        sliding_window=window,
        max_seq_len=config.get("max_position_embeddings", PHI3_DEFAULT_CONTEXT),
    )


def _phi3_describes(args: Mapping) -> bool:
    window, layer_types = args.get("sliding_window"), args.get("layer_types")
    one_kind = layer_types is None or set(layer_types) == {SLIDING_ATTENTION if window else "full_attention"}
    rope = args.get("rope_scaling") is None or isinstance(args.get("rope_scaling"), LongRopeScaling)
    return one_kind and rope and _switches(fused_projections=True, free=("sliding_window",))(args)


def _phi3_to_config(args: Mapping) -> dict:
    scaling, context = args["rope_scaling"], args["max_seq_len"]
    config = dict(sliding_window=args["sliding_window"], original_max_position_embeddings=context)
    if isinstance(scaling, LongRopeScaling):
        original = scaling.original_max_position_embeddings
        rope = {
            "type": "longrope",
            "short_factor": list(scaling.short_factor),
            "long_factor": list(scaling.long_factor),
        }
        # Written only when it is not what transformers derives from the two context lengths.
        if scaling.attention_factor != LongRopeScaling.default_attention_factor(context / original, original):
            rope["attention_factor"] = scaling.attention_factor
        config.update(rope_scaling=rope, original_max_position_embeddings=original)
    return config


FAMILIES["phi3"] = Family(
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    keys=_PHI3_KEYS,
    qkv_bias=False,
    # Dropout: refused unless 0 (every published Phi-3 / Phi-4 config). dpokit trains without
    # dropout, as DPO should (policy and reference log-probs must be the same deterministic function
    # at the start; TRL's DPOTrainer disables dropout by default), and export writes 0.0 back.
    required={
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
    },
    describes=_phi3_describes,
    # auto_map: the remote-code classes of older Phi-3 folders; transformers 5 builds its own Phi3
    # (same weights, same function) and never runs them, and neither do we.
    fields=frozenset({"original_max_position_embeddings", "sliding_window", "partial_rotary_factor", "auto_map"}),
    to_kwargs=_phi3_to_kwargs,
    to_config=_phi3_to_config,
    rope=_phi3_rope,
)
# ---------------------------------------------------------------------------------------- OLMo 2
# OLMo 2 (Olmo2ForCausalLM): no input norms; the attention and MLP outputs are normed before
# their residual add (norm_placement "post"); q and k are RMS-normed over the whole projection
# (all heads together) before the head split and RoPE; every RMSNorm scales in fp32 before the
# cast back. No biases anywhere (attention_bias would also put one on o_proj).
_OLMO2_KEYS = {
    **{k: v for k, v in _LLAMA_KEYS.items() if "input_layernorm" not in k},
    "layers.{}.self_attn.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "layers.{}.self_attn.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "layers.{}.post_feedforward_layernorm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}
_OLMO2_SWITCHES = dict(norm_placement="post", qk_norm="projection", norm_scale_in_fp32=True)


def _olmo2_kwargs(config: Mapping, source: str) -> dict:
    """OLMo 2's fixed switches; OLMo 1's q/k/v clipping (`clip_qkv`) is refused unless null."""
    if config.get("clip_qkv") is not None:
        raise CheckpointError(f"{source}: clip_qkv={config['clip_qkv']!r} is not supported (only null)")
    return dict(_OLMO2_SWITCHES)


FAMILIES["olmo2"] = Family(
    model_type="olmo2",
    architecture="Olmo2ForCausalLM",
    keys=_OLMO2_KEYS,
    qkv_bias=False,
    required={"hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0},
    describes=_switches(**_OLMO2_SWITCHES),
    fields=frozenset({"clip_qkv"}),
    to_kwargs=_olmo2_kwargs,
)
# -------------------------------------------------------------------------------- end of OLMo 2


_ARCH_FIELDS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "head_dim",
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
    }
)
_LLAMA3_ROPE_FIELDS = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}


def read_hf_config(config: Mapping | str | Path) -> tuple[dict, str]:
    """A config dict, a config.json path or a checkpoint directory -> (dict, where it came from)."""
    if isinstance(config, Mapping):
        return dict(config), "config"
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def family_of(config: Mapping, source: str = "config") -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def _rope(config: Mapping, source: str) -> tuple[float, RopeScaling | None]:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = config.get("rope_theta", params.get("rope_theta", 10_000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        extra = set(scaling) - {"rope_type", "type", "rope_theta"}
        if extra:
            raise CheckpointError(f"{source}: rope parameters {sorted(extra)} are not supported with default RoPE")
        return float(theta), None
    if rope_type != "llama3":
        raise CheckpointError(
            f"{source}: rope scaling type {rope_type!r} is not implemented (supported: default, llama3)"
        )
    extra = set(scaling) - _LLAMA3_ROPE_FIELDS - {"rope_type", "type", "rope_theta"}
    missing = _LLAMA3_ROPE_FIELDS - set(scaling)
    if extra or missing:
        raise CheckpointError(f"{source}: llama3 rope scaling: missing {sorted(missing)}, unsupported {sorted(extra)}")
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def hf_config_to_kwargs(config: Mapping | str | Path) -> tuple[Family, dict]:
    """config.json -> (family, `llama()` keyword arguments). Refuses what we would not reproduce."""
    config, source = read_hf_config(config)
    if config.get("model_type") in MULTIMODAL_TEXT_CONFIGS:  # e.g. Gemma 3 4B-27B: the text decoder
        config, source = MULTIMODAL_TEXT_CONFIGS[config["model_type"]](config, source)
    family = family_of(config, source)
    unknown = set(config) - _ARCH_FIELDS - _METADATA_FIELDS - set(family.required) - family.tolerated - family.fields
    if unknown:
        raise CheckpointError(
            f"{source}: config field(s) {sorted(unknown)} not understood for model_type {family.model_type!r}; "
            "refusing rather than building a possibly different model"
        )
    for name, value in family.required.items():
        if name in config and config[name] != value and not (config[name] is None and value is False):
            raise CheckpointError(f"{source}: {name}={config[name]!r} is not supported (only {value!r})")
    layer_types = config.get("layer_types")
    # A family that lists layer_types in `fields` reads (and checks) them in its to_kwargs.
    if layer_types is not None and set(layer_types) != {"full_attention"} and "layer_types" not in family.fields:
        raise CheckpointError(f"{source}: layer_types {sorted(set(layer_types))}: only full attention is supported")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(config.get(name), int):
            raise CheckpointError(f"{source}: {name} must be an integer, got {config.get(name)!r}")
    theta, scaling = (family.rope or _rope)(config, source)
    n_heads = config["num_attention_heads"]
    kwargs = dict(
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        hidden_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        qkv_bias=family.qkv_bias,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    if family.qk_norm:
        kwargs["qk_norm"] = "head"
    if family.to_kwargs is not None:
        kwargs.update(family.to_kwargs(config, source))
    return family, kwargs


def model_from_hf_config(
    config: Mapping | str | Path, *, lora: Mapping | bool | None = None, quantize_base: bool = False
) -> TransformerDecoder:
    """Build the decoder a checkpoint's config.json describes (random init; weights are loaded by
    `dpokit.models.hf_checkpoint`). `lora`: True or a dict of `lora_llama` arguments
    (lora_targets, lora_rank, lora_alpha, lora_dropout); `quantize_base`: QLoRA (needs `lora`)."""
    _, kwargs = hf_config_to_kwargs(config)
    if lora is None or lora is False:
        if quantize_base:
            raise ValueError("quantize_base (QLoRA) needs LoRA adapters: pass lora=True or lora={...}")
        return llama(**kwargs)
    lora_kwargs = {} if lora is True else dict(lora)
    if "lora_targets" in lora_kwargs:
        lora_kwargs["lora_targets"] = tuple(lora_kwargs["lora_targets"])
    return lora_llama(quantize_base=quantize_base, **lora_kwargs, **kwargs)


def family_for_model(model: TransformerDecoder, base: Mapping | None = None) -> Family:
    """The HF family a decoder saves as: the source checkpoint's (`base`, its config.json) when that
    family lays out this model (a Mistral stays Mistral), else the first family of `FAMILIES` that
    does (q/k norms make it Qwen3, q/k/v biases Qwen2, the plain switches Llama)."""
    named = FAMILIES.get((base or {}).get("model_type"))
    if named is not None and named.matches(model.args):
        return named
    for family in FAMILIES.values():
        if family.matches(model.args):
            return family
    switches = {k: model.args.get(k) for k, default in SWITCH_DEFAULTS.items() if model.args.get(k, default) != default}
    raise CheckpointError(f"no Hugging Face family lays out this model (its architecture switches: {switches})")


def hf_config_from_model(model: TransformerDecoder, dtype: torch.dtype, base: Mapping | None = None) -> dict:
    """The config.json of `model` (legacy `rope_theta`/`rope_scaling` fields, which every
    transformers version and vLLM read). Metadata such as token ids is kept from `base`."""
    args, family = model.args, family_for_model(model, base)
    config = {k: v for k, v in (base or {}).items() if k in _KEPT_ON_EXPORT}
    scaling = args["rope_scaling"]
    config.update(
        architectures=[family.architecture],
        model_type=family.model_type,
        vocab_size=args["vocab_size"],
        hidden_size=args["dim"],
        intermediate_size=args["hidden_dim"],
        num_hidden_layers=args["n_layers"],
        num_attention_heads=args["n_heads"],
        num_key_value_heads=args["n_kv_heads"],
        head_dim=args["head_dim"],
        max_position_embeddings=args["max_seq_len"],
        rms_norm_eps=args["norm_eps"],
        rope_theta=args["rope_theta"],
        rope_scaling={"rope_type": "linear", "factor": scaling.factor}
        if isinstance(scaling, LinearRopeScaling)
        else None
        if not isinstance(scaling, RopeScaling)
        else {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        },
        tie_word_embeddings=args["tie_embeddings"],
        torch_dtype=str(dtype).removeprefix("torch."),
        **{k: v for k, v in family.required.items() if k not in ("rope_interleaved", "use_mrope")},
    )
    if family.to_config is not None:
        config.update(family.to_config(args))
    if scaling is not None and config.get("rope_scaling") is None:
        raise CheckpointError(f"{family.model_type} checkpoints cannot express this RoPE scaling: {scaling}")
    config.pop("dtype", None)
    return dict(sorted(config.items()))
