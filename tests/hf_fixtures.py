"""Tiny random Hugging Face checkpoints of each supported family, written with `transformers`."""

from __future__ import annotations

from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128)

# name -> (config class, config kwargs): every feature the parity tests must cover.
FAMILIES = {
    "llama3_gqa": (
        "LlamaConfig",
        dict(COMMON, num_attention_heads=4, num_key_value_heads=2, rope_theta=500_000.0, rms_norm_eps=1e-5),
    ),
    "llama3_1_rope_scaling": (
        "LlamaConfig",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500_000.0,
            rms_norm_eps=1e-5,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "llama3_2_tied_head_dim": (
        "LlamaConfig",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            rope_theta=500_000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "qwen2_5_tied_bias": (
        "Qwen2Config",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2_5_untied_bias": (
        "Qwen2Config",
        dict(COMMON, num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    ),
    "qwen3_tied_head_dim": (  # Qwen3-0.6B's shape: head_dim 128 != 1024 / 16, tied, q/k norms
        "Qwen3Config",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3_untied": (  # Qwen3-8B's shape: untied head
        "Qwen3Config",
        dict(COMMON, num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    ),
    "mistral_gqa": (  # Mistral 7B v0.2's layout: the Llama one, sliding window off
        "MistralConfig",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-5,
            sliding_window=None,
        ),
    ),
    "smollm2_tied_mha": (
        "LlamaConfig",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_theta=100_000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
    ),
    # Phi-3 (fused qkv_proj / gate_up_proj). Token ids inside the tiny vocabulary: Phi3Config's
    # defaults (pad 32000) do not fit an embedding of 96 rows.
    "phi3_gqa_window": (  # Phi-3-mini-4k's sliding window (2047 of 4096), here 16 < the 40 test tokens
        "Phi3Config",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10_000.0,
            rms_norm_eps=1e-5,
            sliding_window=16,
            original_max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
        ),
    ),
    "phi3_no_window": (  # Phi-4's shape: no window, RoPE theta 250k, MHA here
        "Phi3Config",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_theta=250_000.0,
            rms_norm_eps=1e-5,
            sliding_window=None,
            original_max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
        ),
    ),
    "phi3_longrope": (  # Phi-3-mini-128k's longrope; 32 original positions: 40 tokens use the long factors
        "Phi3Config",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10_000.0,
            rms_norm_eps=1e-5,
            sliding_window=None,
            original_max_position_embeddings=32,
            rope_scaling=dict(
                type="longrope",
                short_factor=[1.0, 1.1, 1.25, 1.5, 2.0, 2.5, 3.0, 3.05],
                long_factor=[1.07, 1.5, 3.0, 6.0, 12.0, 24.0, 48.0, 64.76],
            ),
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
        ),
    ),
    "qwen3_moe": (  # 8 experts, top-2 renormalised; layer 1 dense (mlp_only_layers)
        "Qwen3MoeConfig",
        dict(
            COMMON,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
    ),
    "qwen3_moe_sparse_step_tied": (  # every second layer sparse, 6 experts, top-2 not renormalised
        "Qwen3MoeConfig",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            norm_topk_prob=False,
            decoder_sparse_step=2,
        ),
    ),
    "mistral_window": (  # Mistral 7B v0.1's layout: every layer attends within an 8-token window
        "MistralConfig",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10_000.0,
            rms_norm_eps=1e-5,
            sliding_window=8,
        ),
    ),
    "qwen2_5_window": (  # use_sliding_window: an 8-token window from layer max_window_layers=1 on
        "Qwen2Config",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        ),
    ),
    "qwen3_window": (  # the window on the layers an explicit layer_types names (here the first)
        "Qwen3Config",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            use_sliding_window=True,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    # OLMo 2: post-norm blocks, q/k norms over the whole projections (7B / 13B: MHA, untied)
    "olmo2_mha": (
        "Olmo2Config",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_theta=500_000.0,
            rms_norm_eps=1e-6,
            eos_token_id=None,
        ),
    ),
    "olmo2_gqa_tied": (  # 32B's GQA (k_norm smaller than q_norm), with a tied head
        "Olmo2Config",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            eos_token_id=None,
        ),
    ),
    "gemma2_softcap_windows": (  # Gemma 2's layout: sliding / full layers, soft-capped scores and logits
        "Gemma2Config",
        dict(
            COMMON,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
            sliding_window=7,
            rope_theta=10_000.0,
        ),
    ),
    "gemma3_text_local_global": (  # Gemma 3: q/k norms, local RoPE on sliding layers, linear scaling on global ones
        "Gemma3TextConfig",
        dict(
            COMMON,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=20,
            sliding_window=6,
            sliding_window_pattern=2,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
    ),
}
# model_types whose RMSNorm scales by (1 + weight): their random norm weights are centred on 0.
UNIT_OFFSET_NORMS = {"gemma2", "gemma3_text"}


def hf_model(name: str, seed: int = 0):
    """A transformers causal LM of family `name` with every weight random (norms and biases too)."""
    class_name, kwargs = FAMILIES[name]
    config = getattr(transformers, class_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    offset = 0.0 if config.model_type in UNIT_OFFSET_NORMS else 1.0
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(offset + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return model


def write_hf_checkpoint(name: str, directory, seed: int = 0, **save_kwargs):
    model = hf_model(name, seed)
    model.save_pretrained(directory, **save_kwargs)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def write_tokenizer(
    directory, chat_template: str, vocab_size: int = 96, extra_specials: tuple[str, ...] = (), **config_fields
) -> None:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json with `chat_template`) whose ids
    stay below `vocab_size`, so they fit the tiny models; the chat special tokens (8, plus
    `extra_specials`) come last."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # 256 byte tokens do not fit a 96-token model, so the tiny checkpoints use a bigger vocabulary:
    # callers pass vocab_size >= 300 for real tokenizers; the model fixtures below do so.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 8 - len(extra_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world 123, UPPER lower case"] * 10, trainer)
    tok.add_special_tokens(
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
            *extra_specials,
        ]
    )
    tok.save(str(directory / "tokenizer.json"))
    import json

    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template, **config_fields}))


# --------------------------------------------------------------------------- chat templates

# The families' own Jinja templates (the tool-calling branches of Qwen2.5's are left out).
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_5_JINJA = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    '<|im_end|>\n\' }}{%- endif %}{%- for message in messages %}{%- if (message.role == "user") or '
    '(message.role == "system" and not loop.first) or (message.role == "assistant") %}{{- \'<|im_start|>\' + '
    "message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
SMOLLM2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta's published chat templates (tokenizer_config.json of Llama-3.1-8B-Instruct and
# Llama-3.2-1B-Instruct), tool branches included, written out as data files.
FIXTURES = Path(__file__).parent / "fixtures"
LLAMA3_1_JINJA = (FIXTURES / "llama3_1_chat_template.jinja").read_text()
# Qwen3's published template (tokenizer_config.json of a Qwen3 checkpoint, see ../shared/hf-real/SOURCES.md).
QWEN3_JINJA = (FIXTURES / "qwen3_chat_template.jinja").read_text()
LLAMA3_2_JINJA = (FIXTURES / "llama3_2_chat_template.jinja").read_text()
