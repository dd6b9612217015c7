"""Model builders: plain `nn.Module`s, generic builders plus zero-argument presets."""

from dpokit.models.builders import llama, lora_llama
from dpokit.models.lora import (
    LoRALinear,
    adapter_params,
    adapter_state_dict,
    disable_adapter,
    load_adapter_state_dict,
    merged_state_dict,
    set_trainable_params,
)
from dpokit.models.presets import llama3_8b, lora_llama3_8b, lora_tiny, tiny
from dpokit.models.transformer import RMSNorm, RopeScaling, TransformerDecoder

__all__ = [
    "LoRALinear", "RMSNorm", "RopeScaling", "TransformerDecoder", "adapter_params", "adapter_state_dict",
    "disable_adapter", "llama", "llama3_8b", "load_adapter_state_dict", "lora_llama", "lora_llama3_8b",
    "lora_tiny", "merged_state_dict", "set_trainable_params", "tiny",
]
