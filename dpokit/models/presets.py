"""Zero-argument model presets (and their LoRA twins): the tiny demo model here, the real
families in llama3.py, qwen2_5.py, qwen3.py, qwen3_moe.py, smollm2.py, phi.py, olmo2.py and gemma.py (all re-exported
from `dpokit.models`)."""

from __future__ import annotations

from dpokit.models import gemma, llama3, olmo2, phi, qwen2_5, qwen3, qwen3_moe, smollm2
from dpokit.models.builders import llama, lora_llama
from dpokit.models.llama3 import LLAMA3_8B, llama3_8b, lora_llama3_8b  # noqa: F401  (historic home)
from dpokit.models.transformer import TransformerDecoder

# A 4-layer, ~0.2M-parameter decoder over the byte-level tokenizer (256 bytes + 16 specials):
# small enough that a DPO run on a laptop CPU finishes in about a minute.
TINY = dict(
    vocab_size=272,
    dim=64,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    hidden_dim=172,
    max_seq_len=256,
    rope_theta=10_000.0,
)

# Every named architecture: preset name -> `llama()` arguments.
ARCHITECTURES = {
    "tiny": TINY,
    **llama3.ARCHITECTURES,
    **qwen2_5.ARCHITECTURES,
    **qwen3.ARCHITECTURES,
    **smollm2.ARCHITECTURES,
    **phi.ARCHITECTURES,
    **qwen3_moe.ARCHITECTURES,
    **olmo2.ARCHITECTURES,
    **gemma.ARCHITECTURES,
}


def tiny() -> TransformerDecoder:
    return llama(**TINY)


def lora_tiny(
    *,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    lora_rank=8,
    lora_alpha=16.0,
    lora_dropout=0.0,
    quantize_base=False,
) -> TransformerDecoder:
    return lora_llama(
        lora_targets=lora_targets,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        quantize_base=quantize_base,
        **TINY,
    )
