"""Hugging Face checkpoints in and out: safetensors weights, config.json, tokenizer files, PEFT adapters.

Loading (strict: every checkpoint tensor is used, every parameter is filled, else a
`CheckpointError` lists the missing/unexpected keys):

    model = load_hf_checkpoint("ckpt/")                       # whole model, built on the meta device
    model = load_hf_checkpoint("ckpt/", lora={"lora_rank": 16}, quantize_base=True)   # QLoRA
    for key, tensor in iter_hf_weights("ckpt/"):              # one tensor at a time, shard by shard
        ...                                                   # key is OUR parameter name

`iter_hf_weights` is the building block for callers that place tensors themselves (e.g. FSDP2:
build the model on meta, shard it, then for each (key, tensor) copy the rank-local slice with
`distribute_tensor`/narrowing into the sharded parameter). It checks the key sets against
config.json before yielding anything, reads one tensor at a time (safetensors memory-maps the
file), and skips only tensors that are not weights of the function: RoPE `inv_freq` buffers of
old exports and a duplicate `lm_head.weight` of tied models (transformers ignores both too).
`load_hf_checkpoint` assigns each tensor as the final parameter of a meta-built model, so peak
memory stays at about one copy of the weights (plus one tensor); NF4 layers quantise on arrival.

Saving:
    save_hf_checkpoint(model, "out/", source_dir="ckpt/")    # sharded safetensors + index + config.json
                                                              # + the tokenizer files of source_dir
    save_peft_adapter(model, "out/")                          # adapter_config.json + adapter_model.safetensors

Our parameter names are the HF names without the `model.` prefix; the per-family tables are in
`dpokit.models.hf_config.FAMILIES`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.models.dtypes import resolve_dtype
from dpokit.models.hf_config import (
    CheckpointError,
    family_for_model,
    hf_config_from_model,
    hf_config_to_kwargs,
    model_from_hf_config,
    read_hf_config,
    refuse_multimodal_weights,
)
from dpokit.models.lora import (
    LoRALinear,
    MergeRounding,
    _FrozenBase,
    adapter_state_dict,
    dequantize,
    load_adapter_state_dict,
    merged_state_dict,
)
from dpokit.models.peft_merge import merge_lora_updates, read_lora_updates
from dpokit.models.transformer import TransformerDecoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Copied next to saved weights so the output directory is a complete model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "original/tokenizer.model",
    "chat_template.jinja",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


# ----------------------------------------------------------------------------------------- keys


def hf_key(key: str) -> str:
    """Our parameter name -> the Hugging Face Llama/Qwen2 name (the decoder body sits under `model.`)."""
    return key if key.startswith("lm_head.") else f"model.{key}"


def peft_key(key: str) -> str:
    """`layers.0.self_attn.q_proj.lora_a.weight` -> PEFT's
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    key = key.replace(".lora_a.", ".lora_A.").replace(".lora_b.", ".lora_B.")
    return f"base_model.model.{hf_key(key)}"


def _is_skippable(hf_name: str, tied: bool) -> bool:
    return hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight")


def _summary(keys) -> str:
    keys = sorted(keys)
    return f"{keys[:8]}{f' (+{len(keys) - 8} more)' if len(keys) > 8 else ''}"


# -------------------------------------------------------------------------------------- loading


def hf_weight_files(checkpoint_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF directory: the shards named by the index, or model.safetensors."""
    directory = Path(checkpoint_dir)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: shard file(s) {absent} are missing")
        return files
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    hint = (
        " (pytorch_model.bin is not supported: convert it to safetensors)"
        if any(directory.glob("pytorch_model*.bin"))
        else ""
    )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


@contextlib.contextmanager
def _open_weights(path: Path):
    """`safe_open(path)`; a truncated, corrupt or unreadable file is one `CheckpointError`."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError, OSError: the file, not the program, is at fault
        if not (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"):
            raise
        reason = getattr(e, "strerror", None) or str(e)
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({reason}); it may be truncated or corrupt"
        ) from None


def _expected_keys(kwargs: dict) -> dict[str, torch.Size]:
    with torch.device("meta"):
        from dpokit.models.builders import llama

        return {k: v.shape for k, v in llama(**kwargs).state_dict().items()}


def _plan(checkpoint_dir: Path) -> tuple[dict, list[tuple[Path, list[tuple[str, str]]]]]:
    """Check the checkpoint's keys against config.json; return (expected shapes, per-file key pairs)."""
    refuse_multimodal_weights(checkpoint_dir)  # Gemma 3 4B-27B: config.json alone builds the text decoder
    family, kwargs = hf_config_to_kwargs(checkpoint_dir)
    expected = _expected_keys(kwargs)
    plan, seen, unexpected = [], {}, []
    for path in hf_weight_files(checkpoint_dir):
        pairs = []
        with _open_weights(path) as f:
            for name in f.keys():
                ours = family.our_key(name)
                if ours is None or ours not in expected:
                    if not _is_skippable(name, kwargs["tie_embeddings"]):
                        unexpected.append(name)
                    continue
                if ours in seen:
                    raise CheckpointError(f"{path}: tensor {name!r} also appears in {seen[ours].name}")
                seen[ours] = path
                pairs.append((name, ours))
        plan.append((path, pairs))
    missing = [family.hf_key(k) for k in expected if k not in seen]
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint_dir}: checkpoint does not match its config.json ({family.model_type}): "
            f"missing {_summary(missing)}, unexpected {_summary(unexpected)}"
        )
    return expected, plan


def iter_hf_weights(
    checkpoint_dir: str | Path, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our parameter name, tensor) for every weight of an HF directory, one at a time.

    The key sets are checked against config.json first (a `CheckpointError` lists missing and
    unexpected keys before anything is yielded); shapes are checked against config.json too.
    `dtype` casts each tensor as it is read (None keeps the checkpoint's dtype).
    """
    checkpoint_dir = Path(checkpoint_dir)
    shapes, plan = _plan(checkpoint_dir)
    for path, pairs in plan:
        with _open_weights(path) as f:
            for name, ours in pairs:
                tensor = f.get_tensor(name)
                if tensor.shape != shapes[ours]:
                    raise CheckpointError(
                        f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(shapes[ours])}"
                    )
                yield ours, tensor if dtype is None else tensor.to(dtype)


def assign_weight(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Make `tensor` the parameter `key` of `model` (no copy; NF4 layers quantise it)."""
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    old = getattr(module, name)
    if old is None or tuple(old.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {None if old is None else tuple(old.shape)}"
        )
    if name == "weight" and isinstance(module, _FrozenBase):
        module.set_base_weight(tensor)
    else:
        setattr(module, name, nn.Parameter(tensor, requires_grad=old.requires_grad))


def load_hf_checkpoint(
    checkpoint_dir: str | Path,
    *,
    lora: Mapping | bool | None = None,
    quantize_base: bool = False,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    sft_adapter: str | Path | None = None,
) -> TransformerDecoder:
    """An HF Llama/Qwen2 directory -> our decoder with its weights (optionally with fresh LoRA
    adapters, `lora` as in `model_from_hf_config`; `quantize_base` = QLoRA with NF4 base weights).

    dtype: None keeps the checkpoint's dtype ("bf16"/"fp32"/torch dtypes accepted).
    sft_adapter: a PEFT LoRA folder merged into the weights as they are read (`peft_merge`): the
    model is base + SFT adapter, and fresh `lora` adapters train on top of it.
    """
    if checkpoint_dir is None:
        raise CheckpointError("checkpoint_dir is not set: pass checkpoint_dir=/path/to/a/hugging-face/model")
    checkpoint_dir = Path(checkpoint_dir)
    dtype = None if dtype is None else resolve_dtype(dtype, "dtype")
    with torch.device("meta"):
        model = model_from_hf_config(checkpoint_dir, lora=lora, quantize_base=quantize_base)
    weights = iter_hf_weights(checkpoint_dir, dtype=dtype)
    if sft_adapter is not None:  # merged as stored, then cast once: round(W + update), not round(round(W) + update)
        family, _ = hf_config_to_kwargs(checkpoint_dir)
        updates = read_lora_updates(sft_adapter)
        merged = merge_lora_updates(
            iter_hf_weights(checkpoint_dir), updates, hf_key=family.hf_key, source=str(sft_adapter)
        )
        weights = ((key, tensor if dtype is None else tensor.to(dtype)) for key, tensor in merged)
        model.sft_adapter = str(sft_adapter)  # the export merges from base + this adapter (StoredWeights)
    loaded_dtype = None
    for key, tensor in weights:
        assign_weight(model, key, tensor.to(device))
        loaded_dtype = loaded_dtype or tensor.dtype
    _materialise_adapters(model, device, dtype or loaded_dtype)
    model.reset_rope(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # cannot happen after the strict key check; kept so a future module cannot slip through
        raise CheckpointError(f"{checkpoint_dir}: parameters left unfilled: {_summary(left)}")
    return model


def _materialise_adapters(model: nn.Module, device, dtype) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_a.to_empty(device=device)
            module.lora_b.to_empty(device=device)
            module.lora_a.to(dtype)
            module.lora_b.to(dtype)
            module.reset_adapter()


# --------------------------------------------------------------------------------------- saving


class StoredWeights:
    """`stored(key)`: our parameter `key` as the HF directory stores it (read on demand, one
    tensor at a time), or None when the directory has no such tensor or does not match the model."""

    def __init__(self, checkpoint_dir: str | Path, *, sft_adapter: str | Path | None = None):
        try:
            _, plan = _plan(Path(checkpoint_dir))
        except CheckpointError:
            plan = []
        self.where = {ours: (path, name) for path, pairs in plan for name, ours in pairs}
        # A model loaded with an SFT adapter merged: its base is stored weight + adapter update.
        self.updates = read_lora_updates(sft_adapter) if sft_adapter is not None else {}

    def __call__(self, key: str) -> torch.Tensor | None:
        if key not in self.where:
            return None
        path, name = self.where[key]
        with _open_weights(path) as f:
            tensor = f.get_tensor(name)
        update = self.updates.get(name)
        return tensor if update is None else update.apply(tensor)


def plain_state_dict(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    *,
    source_dir: str | Path | None = None,
    rounding: MergeRounding | None = None,
) -> dict[str, torch.Tensor]:
    """The model's weights as a plain (adapter-free, unquantised) model, on the CPU, in `dtype`.

    LoRA models are merged in fp32 into the frozen base as `source_dir` stores it where that
    rounds to what the model holds (`merged_state_dict`): a base loaded in fp32 and trained in
    bf16 is merged at fp32, as PEFT's base + adapter would be."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        sft = getattr(model, "sft_adapter", None)
        stored = StoredWeights(source_dir, sft_adapter=sft) if source_dir is not None else None
        state = merged_state_dict(model, dtype=dtype, base_weights=stored, rounding=rounding)
    else:
        state = {k: dequantize(v) if dtype is None else dequantize(v).to(dtype) for k, v in model.state_dict().items()}
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _remove_old_weights(directory: Path) -> None:
    # A stale model.safetensors next to a new index (or the reverse) would be loaded instead.
    for path in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        if path.is_file():
            path.unlink()


def write_hf_weights(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    family,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    write: bool = True,
) -> Path:
    """The one Hugging Face weight writer: (our key, full tensor) pairs, consumed one at a time,
    become `model.safetensors`, or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`
    (with `total_size`) beyond `max_shard_bytes`, under the family's HF key names. At most one
    shard's worth of tensors is held. Old weight files in `out_dir` are removed first.

    write=False consumes `tensors` without writing: the other ranks of a collective gather, where
    iterating is what all-gathers and rank 0 alone writes."""
    out_dir = Path(out_dir)
    if not write:
        for _ in tensors:
            pass
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(out_dir)
    parts: list[Path] = []
    weight_map: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        part = out_dir / f".part-{len(parts):05d}.safetensors"
        save_file(current, part, metadata={"format": "pt"})
        parts.append(part)

    for key, tensor in tensors:
        name = family.hf_key(key)
        if name is None:
            raise CheckpointError(f"parameter {key!r} has no name in the {family.model_type} checkpoint layout")
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = tensor.detach().to("cpu").contiguous()
        weight_map[name] = len(parts)
        size += nbytes
        total += nbytes
    if current or not parts:
        flush()
    if len(parts) == 1:
        parts[0].rename(out_dir / SINGLE_FILE)
        return out_dir
    names = [f"model-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
    for part, name in zip(parts, names):
        part.rename(out_dir / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def write_hf_config(
    model: nn.Module, out_dir: str | Path, *, dtype: torch.dtype, source_dir: str | Path | None = None
) -> None:
    """config.json for weights saved in `dtype` (metadata such as token ids kept from
    `source_dir`'s config.json) and `source_dir`'s tokenizer files, so the folder loads with
    `AutoModelForCausalLM.from_pretrained` and serves as a `checkpoint_dir`."""
    out_dir = Path(out_dir)
    base = read_hf_config(source_dir)[0] if source_dir is not None else None
    config = hf_config_from_model(model, dtype, base)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if source_dir is not None:
        copy_tokenizer_files(source_dir, out_dir)


def copy_tokenizer_files(source_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer/generation files of an HF directory; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(source_dir) / name
        if source.is_file():
            (Path(out_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, Path(out_dir) / name)
            copied.append(name)
    return copied


def save_hf_checkpoint(
    model: TransformerDecoder,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    rounding: MergeRounding | None = None,
) -> Path:
    """Write `model` as an HF directory `AutoModelForCausalLM.from_pretrained` loads as is.

    LoRA adapters are merged into the weights; NF4 weights are dequantised. Writes
    model.safetensors (or model-0000i-of-0000N.safetensors + model.safetensors.index.json when
    larger than `max_shard_bytes`), config.json (metadata such as token ids kept from
    `source_dir`'s config.json) and copies `source_dir`'s tokenizer files. Existing weight files
    in `out_dir` are removed first. LoRA weights are merged in fp32 and then cast to `dtype`
    (None: each weight's own); `rounding` counts the updates the cast drops (`merge_update`).
    """
    state = plain_state_dict(model, dtype, source_dir=source_dir, rounding=rounding)
    base = read_hf_config(source_dir)[0] if source_dir is not None else None
    family = family_for_model(model, base)
    write_hf_weights(state.items(), out_dir, family=family, max_shard_bytes=max_shard_bytes)
    write_hf_config(model, out_dir, dtype=next(iter(state.values())).dtype, source_dir=source_dir)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------- PEFT


def peft_adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json for the model's adapters (one rank/alpha for all, as PEFT's LoraConfig)."""
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not modules:
        raise ValueError("the model has no LoRA adapters")
    ranks = {m.rank for _, m in modules}
    alphas = {m.alpha for _, m in modules}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"mixed LoRA ranks/alphas are not supported in one adapter: {ranks}, {alphas}")
    dropout = next(iter(m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for _, m in modules))
    return {
        "base_model_name_or_path": base_model_name_or_path,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": ranks.pop(),
        "lora_alpha": alphas.pop(),
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    adapters: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """adapter_config.json + adapter_model.safetensors (PEFT key names), loadable by
    `peft.PeftModel.from_pretrained(hf_model, out_dir)`. adapters: the adapter tensors by our
    key when the model's own are shards (FSDP2: gathered by the caller), else the model's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapters = adapter_state_dict(model) if adapters is None else adapters
    tensors = {peft_key(k): v.detach().to("cpu").contiguous() for k, v in adapters.items()}
    save_file(tensors, out_dir / ADAPTER_FILE, metadata={"format": "pt"})
    config = peft_adapter_config(model, base_model_name_or_path)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> None:
    """Load a PEFT LoRA adapter into a LoRA model built with the same targets/rank/alpha (strict)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    ours = peft_adapter_config(model)
    for field_name in ("r", "lora_alpha", "target_modules"):
        theirs = sorted(config[field_name]) if field_name == "target_modules" else config[field_name]
        if theirs != ours[field_name]:
            raise CheckpointError(
                f"{adapter_dir / ADAPTER_CONFIG}: {field_name}={theirs!r}, model has {ours[field_name]!r}"
            )
    back = {peft_key(k): k for k in adapter_state_dict(model)}
    state = load_file(adapter_dir / ADAPTER_FILE)
    unexpected = [k for k in state if k not in back]
    if unexpected:
        raise CheckpointError(f"{adapter_dir / ADAPTER_FILE}: unexpected keys {_summary(unexpected)}")
    load_adapter_state_dict(model, {back[k]: v for k, v in state.items()})
