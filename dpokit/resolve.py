"""One way to load "a checkpoint" for inference (`dpokit eval`, `dpokit generate`), whatever it is:

- an HF folder (`config.json` + safetensors): a run's `final/`, a downloaded model;
- a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`, e.g. a LoRA
  run's `final/adapter/`) on its base: `base=`, else the adapter's `base_model_name_or_path` when
  that is a local folder, else (for `final/adapter/` of a run) the base the run rebuilt;
- a run's output_dir (`config.yaml` + `final/`): a LoRA run's policy exactly as it trained (its
  base + `final/adapter`, unmerged), a full run's `final/`.

A model loaded with its adapter keeps the adapter as LoRA layers, so `disable_adapter(model)`
runs the base: the natural reference of a DPO-trained adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dpokit.errors import DpokitError
from dpokit.models.dtypes import resolve_dtype
from dpokit.models.hf_checkpoint import ADAPTER_CONFIG, ADAPTER_FILE, load_hf_checkpoint, load_peft_adapter
from dpokit.models.lora import cast_base

TOKENIZER_MARKERS = ("tokenizer.json", "original/tokenizer.model")


@dataclass
class InferenceModel:
    """What `load_for_inference` loaded.

    model: the decoder, in eval mode, on the requested device.
    tokenizer_dir: a folder holding the checkpoint's tokenizer files (for
        `dpokit.data.hf_tokenizer.hf_tokenizer`), or None when there are none (models built in
        code use the byte tokenizer; a run's config names it, see `run`).
    description: one line saying what was loaded from where.
    adapter: the adapter folder when `model` carries LoRA adapters (adapters off = its base).
    run: the `dpokit.run_dir.RunDir` the checkpoint belongs to, when it is (part of) a run's output_dir.
    base: with `adapter`, where the base weights come from.
    """

    model: nn.Module
    tokenizer_dir: Path | None
    description: str
    adapter: Path | None = None
    run: object | None = None
    base: str | None = None


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / name).is_file() for name in TOKENIZER_MARKERS)


def _tokenizer_dir(*folders) -> Path | None:
    return next((Path(f) for f in folders if f is not None and _has_tokenizer(Path(f))), None)


def checkpoint_kind(path: str | Path) -> str:
    """ "run", "adapter" or "hf" for a folder `load_for_inference` takes; a `DpokitError` naming
    what is missing otherwise."""
    from dpokit.run_dir import find_run

    path = Path(path)
    if not path.exists():
        raise DpokitError(f"{path}: checkpoint not found")
    if not path.is_dir():
        raise DpokitError(f"{path}: a checkpoint is a folder (an HF model, a PEFT adapter or a run's output_dir)")
    run = find_run(path)
    if run is not None and run.path == path:
        return "run"
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "hf"
    raise DpokitError(
        f"{path}: not a checkpoint: no config.json (an HF folder), {ADAPTER_CONFIG} (a PEFT adapter) "
        f"or config.yaml + final/ (a run's output_dir)"
    )


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json of a PEFT LoRA folder, checked for what dpokit's LoRA layers can load."""
    path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DpokitError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(config, dict):
        raise DpokitError(f"{path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise DpokitError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag):
            raise DpokitError(f"{path}: {flag}=true is not supported (plain LoRA only)")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise DpokitError(f"{path}: no {field!r}")
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise DpokitError(f"{adapter_dir}: no {ADAPTER_FILE}")
    return config


def _adapter_base(adapter_dir: Path, config: dict, base) -> Path:
    if base is not None:
        base = Path(base)
        if not (base / "config.json").is_file():
            raise DpokitError(f"{base}: the adapter's base is not an HF folder (no config.json)")
        return base
    named = config.get("base_model_name_or_path")
    if named and (Path(named) / "config.json").is_file():
        return Path(named)
    why = "is null" if not named else f"is {named!r}, not a local HF folder"
    raise DpokitError(
        f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path {why}: name the base model's folder (--base DIR)"
    )


def load_adapter_on_base(adapter_dir: str | Path, base_dir: str | Path, *, dtype=None, device="cpu") -> nn.Module:
    """The HF model `base_dir` with the PEFT LoRA adapter `adapter_dir` as LoRA layers (the base
    in `dtype`, default as stored; the adapters in fp32, as the LoRA recipes train them)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    lora = {
        "lora_targets": list(config["target_modules"]),
        "lora_rank": int(config["r"]),
        "lora_alpha": float(config["lora_alpha"]),
    }
    model = load_hf_checkpoint(base_dir, lora=lora, dtype=dtype)
    base_dtype = next(p.dtype for n, p in model.named_parameters() if not p.requires_grad)
    model = cast_base(model, base_dtype)
    load_peft_adapter(model, adapter_dir)
    return model.to(device)


def load_for_inference(
    path: str | Path, *, base: str | Path | None = None, dtype: torch.dtype | str | None = None, device="cpu"
) -> InferenceModel:
    """Load the checkpoint at `path` (an HF folder, a PEFT adapter folder, or a run's output_dir;
    see the module docstring) for inference, in eval mode. `base`: the base model folder of an
    adapter (default: its `base_model_name_or_path`, or the run's base). `dtype`: None keeps the
    checkpoint's (a run's: its config's `dtype`)."""
    from dpokit.run_dir import find_run

    path = Path(path)
    kind = checkpoint_kind(path)
    dtype = None if dtype is None else resolve_dtype(dtype, "dtype")
    run = find_run(path)
    if kind == "run" or (kind == "adapter" and base is None and run is not None and run.adapter == path):
        if run.adapter is not None:
            model = run.trained_lora_model(dtype=dtype, device=device)
            tokenizer_dir = _tokenizer_dir(run.checkpoint_dir, run.final)
            loaded = InferenceModel(
                model,
                tokenizer_dir,
                f"{run.adapter} on {run.describe_base()}",
                adapter=run.adapter,
                run=run,
                base=run.describe_base(),
            )
        else:
            model = load_hf_checkpoint(run.final, dtype=dtype or run.dtype, device=device)
            loaded = InferenceModel(model, _tokenizer_dir(run.final), f"{run.final} (full fine-tune)", run=run)
    elif kind == "adapter":
        base_dir = _adapter_base(path, read_adapter_config(path), base)
        model = load_adapter_on_base(path, base_dir, dtype=dtype, device=device)
        loaded = InferenceModel(
            model, _tokenizer_dir(path, base_dir), f"{path} on {base_dir}", adapter=path, run=run, base=str(base_dir)
        )
    else:
        model = load_hf_checkpoint(path, dtype=dtype or (run.dtype if run is not None else None), device=device)
        loaded = InferenceModel(model, _tokenizer_dir(path), str(path), run=run)
    loaded.model.eval()
    return loaded
