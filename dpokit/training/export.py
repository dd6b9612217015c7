"""Final checkpoints of the recipes, in Hugging Face layout (see `dpokit.models.hf_checkpoint`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dpokit.models.hf_checkpoint import load_hf_checkpoint, plain_state_dict, save_hf_checkpoint, save_peft_adapter
from dpokit.models.lora import MergeRounding

ADAPTER_SUBDIR = "adapter"


@dataclass
class MergedExport:
    """What `save_lora_checkpoint` wrote: the merged model's folder and dtype, what the cast to
    that dtype did to the adapters' update, and (for a dtype narrower than fp32, given a probe
    batch) how far the saved model's logits moved from the exact fp32 merge."""

    directory: Path
    dtype: torch.dtype
    rounding: MergeRounding
    max_logit_change: float | None = None
    mean_logit_change: float | None = None

    def summary(self) -> str:
        line = self.rounding.summary(self.dtype)
        if self.max_logit_change is not None:
            line += (
                f"; logits differ from base + adapter by up to {self.max_logit_change:.3g} "
                f"(mean {self.mean_logit_change:.3g}) on a validation batch"
            )
        if self.rounding.dropped and self.dtype != torch.float32:
            line += "; save_dtype=fp32 keeps every update (the adapter alone is exact in adapter/)"
        return line


def save_lora_checkpoint(
    model: nn.Module,
    directory: str | Path,
    *,
    source_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    probe_sequences: list[torch.Tensor] | None = None,
) -> MergedExport:
    """Writes the merged model as an HF directory (`model.safetensors` or shards + index,
    `config.json`, and the tokenizer files of `source_dir` when given) plus the adapter alone in
    PEFT layout in `directory/adapter/` (`adapter_model.safetensors` + `adapter_config.json`).

    The merge W + (alpha / rank) B A is computed in fp32 on the base as `source_dir` stores it
    (see `plain_state_dict`), then saved in `dtype`. fp32 (the default) keeps every update, so the
    folder equals PEFT's base + adapter; bf16 halves the file, and updates below bf16's
    resolution round away: the returned `MergedExport` counts them and, given `probe_sequences`
    (1-D id tensors), measures the saved model's logit change against the fp32 merge.

    The adapter gets its own folder because transformers, finding adapter_config.json next to a
    config.json, loads the folder's weights and applies the adapter on top: merged + adapter
    would count the update twice.
    """
    directory = Path(directory)
    rounding = MergeRounding()
    save_hf_checkpoint(model, directory, source_dir=source_dir, dtype=dtype, rounding=rounding)
    for stale in ("adapter_model.safetensors", "adapter_config.json"):  # the layout of earlier versions
        (directory / stale).unlink(missing_ok=True)
    save_peft_adapter(
        model, directory / ADAPTER_SUBDIR, base_model_name_or_path=None if source_dir is None else str(source_dir)
    )
    export = MergedExport(directory, dtype, rounding)
    if probe_sequences and dtype != torch.float32:
        exact = plain_state_dict(model, torch.float32, source_dir=source_dir)
        export.max_logit_change, export.mean_logit_change = _logit_change(directory, exact, probe_sequences)
    return export


@torch.no_grad()
def _logit_change(
    directory: Path, exact: dict[str, torch.Tensor], sequences: list[torch.Tensor]
) -> tuple[float, float]:
    """(max, mean) |logit| difference in fp32 between the model saved in `directory` and the same
    model with the `exact` weights, over every position of `sequences` (1-D id tensors)."""
    model = load_hf_checkpoint(directory, dtype=torch.float32).eval()
    saved = [model(ids.to("cpu")[None]) for ids in sequences]
    model.load_state_dict(exact, strict=True)
    differences = torch.cat([(model(ids.to("cpu")[None]) - s).abs().flatten() for ids, s in zip(sequences, saved)])
    return differences.max().item(), differences.mean().item()
