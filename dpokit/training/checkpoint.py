"""Final checkpoints of the recipes, in Hugging Face layout (see `dpokit.models.hf_checkpoint`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dpokit.models.hf_checkpoint import (  # noqa: F401  (re-exported: their historic home)
    hf_key,
    peft_adapter_config,
    peft_key,
    save_hf_checkpoint,
    save_peft_adapter,
)


def lora_config(model: nn.Module) -> dict:
    """The PEFT adapter_config.json of the model's adapters."""
    return peft_adapter_config(model)


ADAPTER_SUBDIR = "adapter"


def save_lora_checkpoint(model: nn.Module, directory: str | Path, *, source_dir: str | Path | None = None) -> Path:
    """Writes the merged model as an HF directory (`model.safetensors` or shards + index,
    `config.json`, and the tokenizer files of `source_dir` when given) plus the adapter alone in
    PEFT layout in `directory/adapter/` (`adapter_model.safetensors` + `adapter_config.json`).

    The adapter gets its own folder because transformers, finding adapter_config.json next to a
    config.json, loads the folder's weights and applies the adapter on top: merged + adapter
    would count the update twice.
    """
    directory = Path(directory)
    save_hf_checkpoint(model, directory, source_dir=source_dir)
    for stale in ("adapter_model.safetensors", "adapter_config.json"):  # the layout of earlier versions
        (directory / stale).unlink(missing_ok=True)
    save_peft_adapter(model, directory / ADAPTER_SUBDIR,
                      base_model_name_or_path=None if source_dir is None else str(source_dir))
    return directory
