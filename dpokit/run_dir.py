"""What a finished run's output_dir says about its model: read back from `config.yaml` and `final/`.

A recipe writes `output_dir/config.yaml` (the resolved config it ran with) and `output_dir/final/`
(an HF folder; LoRA recipes add `final/adapter/`, the adapter alone in PEFT layout). From these,
`RunDir` rebuilds what the run trained and compared against:

- `initial_model()`: the weights the run started from: `checkpoint_dir` (through the config's
  `model` component, so an SFT adapter merged or an NF4 base is as it was), or, for models built
  in code (the tiny recipes, `checkpoint_dir: null`), the random init of `seed`, which is also
  how the recipes make it;
- `trained_lora_model()`: for a LoRA run, that model with `final/adapter` loaded: the policy
  exactly as it was evaluated during training (unmerged, base in the run's dtype);
- `reference_model()`: the reference of a full run (`reference.checkpoint_dir`, else the
  initial weights);
- the settings validation used: the loss, `average_logps`, `ld_alpha`, `eval_batch_size`, the
  validation set's lengths and the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dpokit.errors import DpokitError

CONFIG_FILE = "config.yaml"
FINAL_DIR = "final"
ADAPTER_DIR = "adapter"  # as dpokit.training.export.ADAPTER_SUBDIR (not imported: no training import here)


def find_run(path: str | Path) -> "RunDir | None":
    """The run `path` belongs to: `path` is a run's output_dir, its `final/`, or `final/adapter/`
    (a folder holding `config.yaml` and `final/`); None otherwise."""
    path = Path(path)
    if path.name == ADAPTER_DIR and path.parent.name == FINAL_DIR:
        root = path.parent.parent
    elif path.name == FINAL_DIR:
        root = path.parent
    else:
        root = path
    if (root / CONFIG_FILE).is_file() and (root / FINAL_DIR).is_dir():
        return RunDir(root)
    return None


class RunDir:
    """A run's output_dir (holding `config.yaml` and `final/`)."""

    def __init__(self, path: str | Path):
        from dpokit.config import load_config

        self.path = Path(path)
        self.final = self.path / FINAL_DIR
        if not self.final.is_dir():
            raise DpokitError(f"{self.path}: no {FINAL_DIR}/ (the run did not finish?)")
        self.config = load_config(self.path / CONFIG_FILE)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def adapter(self) -> Path | None:
        """`final/adapter/` of a LoRA run, else None."""
        folder = self.final / ADAPTER_DIR
        return folder if folder.is_dir() else None

    def _get(self, key: str, default=None):
        node = self.config
        for part in key.split("."):
            if not hasattr(node, "get") or part not in node:
                return default
            node = node[part]
        return node

    @property
    def checkpoint_dir(self) -> str | None:
        """The HF folder the run started from (None: the model was built in code)."""
        value = self._get("checkpoint_dir")
        return None if value is None else str(value)

    @property
    def dtype(self) -> torch.dtype:
        from dpokit.models.dtypes import resolve_dtype

        return resolve_dtype(self._get("dtype", "fp32"), f"{self.path / CONFIG_FILE}: dtype")

    @property
    def average_logps(self) -> bool:
        return bool(self._get("average_logps", False))

    @property
    def ld_alpha(self) -> float | None:
        return self._get("ld_alpha")

    @property
    def eval_batch_size(self) -> int | None:
        return self._get("eval_batch_size")

    def validation_lengths(self) -> tuple[int | None, int | None]:
        """(max_seq_len, max_prompt_len) of the run's validation set (None where not set)."""
        node = self._get("validation_dataset")
        if node is None:
            return None, None
        return node.get("max_seq_len"), node.get("max_prompt_len")

    def loss(self, **overrides):
        """The run's loss function (its `loss:` component, `overrides` such as beta=... applied)."""
        from dpokit.config import instantiate

        return instantiate(self.config.loss, **overrides)

    def tokenizer(self):
        """The run's tokenizer (its `tokenizer:` component)."""
        from dpokit.config import instantiate

        return instantiate(self.config.tokenizer)

    def tokenizer_spec(self) -> str | None:
        """The run's tokenizer as `dpokit.data.validate.load_tokenizer` takes it: "byte", a
        checkpoint folder, or None when the component is neither."""
        node = self._get("tokenizer")
        component = str(node.get("_component_", "")) if node is not None else ""
        if component.endswith("byte_tokenizer"):
            return "byte"
        if component.endswith("hf_tokenizer") and node.get("checkpoint_dir") is not None:
            return str(node.checkpoint_dir)
        return None

    def describe_base(self) -> str:
        return self.checkpoint_dir or f"{self.config.model._component_} (random init, seed {self._get('seed', 0)})"

    def initial_model(self, *, dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
        """The model as the run built it before step 1, in `dtype` (default the run's). A LoRA
        run's is its `model` component (which loads `checkpoint_dir` itself, if any) with the
        frozen base cast to `dtype` and fresh adapters, as the LoRA recipes build it; a full run's
        is `checkpoint_dir`, or without one the `model` component's random init of `seed`, as
        the full recipe's `weight_source` makes it."""
        from dpokit.config import instantiate
        from dpokit.models.hf_checkpoint import load_hf_checkpoint
        from dpokit.models.lora import cast_base

        dtype = dtype or self.dtype
        if self.adapter is None and self.checkpoint_dir is not None:
            return load_hf_checkpoint(self.checkpoint_dir, dtype=dtype).to(device)
        with torch.random.fork_rng():
            torch.manual_seed(int(self._get("seed", 0)))
            model = instantiate(self.config.model)
        if self.adapter is not None:
            return cast_base(model, dtype).to(device)
        return model.to(device=device, dtype=dtype)

    def trained_lora_model(self, *, dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
        """A LoRA run's policy: `initial_model()` with `final/adapter` loaded (adapters off = the
        reference). A code-built base cannot be read from disk, so the rebuilt base + adapter is
        checked against the merged `final/` weights."""
        from dpokit.models.hf_checkpoint import iter_hf_weights, load_peft_adapter

        if self.adapter is None:
            raise DpokitError(f"{self.final}: no {ADAPTER_DIR}/ (not a LoRA run)")
        model = self.initial_model(dtype=dtype, device=device)
        load_peft_adapter(model, self.adapter)
        if self.checkpoint_dir is None:
            from dpokit.models.lora import merged_state_dict

            merged = merged_state_dict(model, dtype=torch.float32)
            worst = max(
                (merged[key].to("cpu") - saved.float()).abs().max().item() for key, saved in iter_hf_weights(self.final)
            )
            if worst > 1e-4:
                raise DpokitError(
                    f"{self.path}: the base rebuilt from {CONFIG_FILE} (seed {self._get('seed', 0)}) plus "
                    f"{ADAPTER_DIR}/ differs from {FINAL_DIR}/ by up to {worst:.3g}: the run's base cannot be "
                    f"rebuilt; evaluate {self.final} with --reference"
                )
        return model

    def reference_model(self, *, dtype: torch.dtype | None = None, device="cpu") -> tuple[nn.Module, str]:
        """(the run's reference weights as a model, where they come from): `reference.checkpoint_dir`
        when set, else the initial weights (`initial_model`; for a LoRA run with adapters fresh,
        i.e. contributing nothing)."""
        from dpokit.models.hf_checkpoint import load_hf_checkpoint

        reference_dir = self._get("reference.checkpoint_dir")
        if reference_dir is not None:
            return load_hf_checkpoint(str(reference_dir), dtype=dtype or self.dtype).to(device), str(reference_dir)
        return self.initial_model(dtype=dtype, device=device), f"the run's initial weights: {self.describe_base()}"
