"""Model builders: plain `nn.Module`s, generic builders plus zero-argument presets.

Families (each with a `lora_` twin taking lora_targets/lora_rank/lora_alpha/lora_dropout/quantize_base):
Llama 3 / 3.1 / 3.2 (`llama3.py`), Qwen2.5 (`qwen2_5.py`), Qwen3 (`qwen3.py`), SmolLM2 (`smollm2.py`),
Phi-3 / Phi-4 (`phi.py`), Qwen3 MoE (`qwen3_moe.py`), OLMo 2 (`olmo2.py`), Gemma 2 / Gemma 3 text (`gemma.py`).
Any Llama/Qwen2/Qwen3/Qwen3-MoE/Mistral/Phi-3/OLMo 2/Gemma 2/Gemma 3
Hugging Face directory: `model_from_hf_config`, `load_hf_checkpoint` (see `hf_checkpoint.py`).
"""

from dpokit.models.blocks import prepare_blocks
from dpokit.models.builders import llama, lora_llama
from dpokit.models.dtypes import resolve_dtype
from dpokit.models.gemma import (
    gemma2_2b,
    gemma2_9b,
    gemma2_27b,
    gemma3_1b,
    gemma3_4b,
    gemma3_12b,
    gemma3_27b,
    lora_gemma2_2b,
    lora_gemma2_9b,
    lora_gemma2_27b,
    lora_gemma3_1b,
    lora_gemma3_4b,
    lora_gemma3_12b,
    lora_gemma3_27b,
)
from dpokit.models.hf_checkpoint import (
    iter_hf_weights,
    load_hf_checkpoint,
    load_peft_adapter,
    save_hf_checkpoint,
    save_peft_adapter,
)
from dpokit.models.hf_config import CheckpointError, hf_config_from_model, model_from_hf_config, read_hf_config
from dpokit.models.llama3 import (
    llama3_1_8b,
    llama3_1_70b,
    llama3_1_405b,
    llama3_2_1b,
    llama3_2_3b,
    llama3_8b,
    llama3_70b,
    lora_llama3_1_8b,
    lora_llama3_1_70b,
    lora_llama3_1_405b,
    lora_llama3_2_1b,
    lora_llama3_2_3b,
    lora_llama3_8b,
    lora_llama3_70b,
)
from dpokit.models.lora import (
    LoRALinear,
    MergeRounding,
    NF4Linear,
    adapter_params,
    adapter_state_dict,
    cast_base,
    disable_adapter,
    load_adapter_state_dict,
    merge_update,
    merged_state_dict,
    parameter_summary,
    set_trainable_params,
)
from dpokit.models.olmo2 import (
    lora_olmo2_1b,
    lora_olmo2_7b,
    lora_olmo2_13b,
    lora_olmo2_32b,
    olmo2_1b,
    olmo2_7b,
    olmo2_13b,
    olmo2_32b,
)
from dpokit.models.phi import (
    lora_phi3_medium_4k,
    lora_phi3_mini_4k,
    lora_phi3_mini_128k,
    lora_phi4,
    phi3_medium_4k,
    phi3_mini_4k,
    phi3_mini_128k,
    phi4,
)
from dpokit.models.presets import ARCHITECTURES, lora_tiny, tiny
from dpokit.models.qwen2_5 import (
    lora_qwen2_5_0_5b,
    lora_qwen2_5_1_5b,
    lora_qwen2_5_3b,
    lora_qwen2_5_7b,
    lora_qwen2_5_14b,
    lora_qwen2_5_32b,
    lora_qwen2_5_72b,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_3b,
    qwen2_5_7b,
    qwen2_5_14b,
    qwen2_5_32b,
    qwen2_5_72b,
)
from dpokit.models.qwen3 import (
    lora_qwen3_0_6b,
    lora_qwen3_1_7b,
    lora_qwen3_4b,
    lora_qwen3_8b,
    lora_qwen3_14b,
    lora_qwen3_32b,
    qwen3_0_6b,
    qwen3_1_7b,
    qwen3_4b,
    qwen3_8b,
    qwen3_14b,
    qwen3_32b,
)
from dpokit.models.qwen3_moe import lora_qwen3_30b_a3b, lora_qwen3_235b_a22b, qwen3_30b_a3b, qwen3_235b_a22b
from dpokit.models.smollm2 import (
    lora_smollm2_1_7b,
    lora_smollm2_135m,
    lora_smollm2_360m,
    smollm2_1_7b,
    smollm2_135m,
    smollm2_360m,
)
from dpokit.models.transformer import RMSNorm, RopeScaling, TransformerDecoder

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "LoRALinear",
    "MergeRounding",
    "NF4Linear",
    "RMSNorm",
    "RopeScaling",
    "TransformerDecoder",
    "adapter_params",
    "adapter_state_dict",
    "cast_base",
    "disable_adapter",
    "hf_config_from_model",
    "iter_hf_weights",
    "llama",
    "load_adapter_state_dict",
    "load_hf_checkpoint",
    "load_peft_adapter",
    "lora_llama",
    "lora_tiny",
    "merge_update",
    "merged_state_dict",
    "model_from_hf_config",
    "parameter_summary",
    "prepare_blocks",
    "read_hf_config",
    "resolve_dtype",
    "save_hf_checkpoint",
    "save_peft_adapter",
    "set_trainable_params",
    "tiny",
    *(name for arch in ARCHITECTURES if arch != "tiny" for name in (arch, f"lora_{arch}")),
]
