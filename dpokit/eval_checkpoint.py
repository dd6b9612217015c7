"""Preference metrics of a saved checkpoint against a reference on a preference set (`dpokit eval`).

The numbers are the ones a recipe's validation logs (`preference_eval_metrics`: implicit-reward
accuracy, reward margin, chosen / rejected rewards and log-probs, the preference loss), computed
the same way: padded batches from `eval_batches`, the same loss and log-prob settings. For a
checkpoint that belongs to a run (its output_dir, `final/` or `final/adapter/`) the settings are
the run's (`config.yaml`: loss, `average_logps`, `ld_alpha`, `eval_batch_size`, the validation
set's lengths, the tokenizer), so evaluating the run's final weights on its validation data
reproduces its last validation record.

The reference, unless one is given: the base with adapters off for an adapter (or a LoRA run);
for a full run's weights, the run's `reference.checkpoint_dir`, else its initial weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from dpokit.data.collate import collate_preference_pairs
from dpokit.data.preference import PreferenceDataset
from dpokit.data.validate import load_tokenizer
from dpokit.distributed.sampler import eval_batches
from dpokit.errors import DpokitError
from dpokit.losses.registry import is_reference_free
from dpokit.resolve import InferenceModel, load_for_inference
from dpokit.training.evaluate import preference_eval_metrics
from dpokit.training.reference import AdapterOffReference, FrozenCopyReference, NoReference

DEFAULT_BETA = 0.1
DEFAULT_BATCH_SIZE = 8
# Table rows, in order (a metric the loss does not report, e.g. sft_loss, is left out).
METRIC_ROWS = (
    "acc",
    "reward_margin",
    "rewards_chosen_mean",
    "rewards_rejected_mean",
    "logps_chosen",
    "logps_rejected",
    "preference_loss",
    "sft_loss",
    "loss",
)


@dataclass
class EvalData:
    """The preference pairs to evaluate on: a local file (`path`, any format the readers accept)
    or a Hugging Face dataset's split (`hub`, with `split` / `subset` / `revision`)."""

    path: str | Path | None = None
    hub: str | None = None
    split: str | None = None
    subset: str | None = None
    revision: str | None = None
    format: str = "auto"
    keys: Mapping[str, str] | None = None

    def __post_init__(self):
        if (self.path is None) == (self.hub is None):
            raise DpokitError("eval data: give a preference file or a Hugging Face dataset (hub), one of them")
        if self.path is not None and not Path(self.path).is_file():
            raise DpokitError(f"{self.path}: preference data file not found")

    def label(self) -> str:
        if self.hub is None:
            return str(self.path)
        return f"{self.hub} ({self.split or 'train'}{f', {self.subset}' if self.subset else ''})"

    def load(self, tokenizer, *, max_seq_len: int, max_prompt_len: int | None = None) -> PreferenceDataset:
        """The pairs tokenized by `tokenizer`, truncated as `PreferenceDataset` truncates."""
        try:
            return PreferenceDataset(
                None if self.hub is not None else self.path,
                tokenizer,
                max_seq_len=max_seq_len,
                max_prompt_len=max_prompt_len,
                format=self.format,
                keys=self.keys,
                hub=self.hub,
                split=self.split,
                subset=self.subset,
                revision=self.revision,
            )
        except DpokitError:
            raise
        except ValueError as e:  # e.g. max_prompt_len not below max_seq_len
            raise DpokitError(f"{self.label()}: {e}") from None


@dataclass
class CheckpointEval:
    """One checkpoint's result: what was loaded, the reference used, the settings, the metrics
    (means over `pairs` pairs, named as in metrics.jsonl)."""

    checkpoint: str
    model: str
    reference: str
    pairs: int
    settings: dict
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "model": self.model,
            "reference": self.reference,
            "pairs": self.pairs,
            "settings": self.settings,
            "metrics": self.metrics,
        }


def _loss_settings(loss_fn) -> dict:
    fn = loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn
    keywords = loss_fn.keywords if isinstance(loss_fn, functools.partial) else {}
    name = keywords.get("name") or getattr(fn, "__name__", type(fn).__name__)
    return {"loss": name, **{k: v for k, v in keywords.items() if k != "name"}}


def eval_tokenizer(loaded: InferenceModel, spec: str | None = None, template: str | None = None):
    """(tokenizer, what it is): `spec` (as `dpokit validate --tokenizer` takes it) when given;
    else a run's own tokenizer (its config's, with `template` when given); else the tokenizer
    files of the checkpoint (or of its base)."""
    run = loaded.run
    if spec is not None:
        return load_tokenizer(spec, template), spec
    if run is not None and template is None:
        return run.tokenizer(), f"the run's ({run.config.tokenizer._component_})"
    source = (run.tokenizer_spec() if run is not None else None) or loaded.tokenizer_dir
    if source is None:
        raise DpokitError(
            f"{loaded.description}: no tokenizer files (tokenizer.json or original/tokenizer.model) with the "
            f"checkpoint; name one (--tokenizer byte, a tokenizer.json / tokenizer.model file or a checkpoint folder)"
        )
    return load_tokenizer(str(source), template), str(source)


def _reference(loaded: InferenceModel, reference, loss_fn, *, dtype, device, logps_settings) -> tuple[object, str]:
    if is_reference_free(loss_fn):
        return NoReference(), "none (reference-free loss)"
    if reference is not None:
        ref = load_for_inference(reference, dtype=dtype, device=device)
        return FrozenCopyReference(ref.model, **logps_settings), ref.description
    if loaded.adapter is not None:
        return AdapterOffReference(loaded.model, **logps_settings), f"the base with adapters off: {loaded.base}"
    if loaded.run is not None:
        model, where = loaded.run.reference_model(dtype=dtype, device=device)
        return FrozenCopyReference(model, **logps_settings), where
    raise DpokitError(
        f"{loaded.description}: no reference known for an HF folder outside a run (no config.yaml beside its "
        f"folder names its base); name one (--reference REF)"
    )


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: EvalData,
    *,
    reference: str | Path | None = None,
    base: str | Path | None = None,
    tokenizer: str | None = None,
    template: str | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    beta: float | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> CheckpointEval:
    """Preference metrics of `checkpoint` (see `dpokit.resolve.load_for_inference`) over
    every pair of `data`, against `reference` (a checkpoint; default: see the module docstring).
    Settings left None are the run's where the checkpoint belongs to one, else: DPO with
    beta 0.1, summed log-probs, `DEFAULT_BATCH_SIZE` pairs a batch, no truncation below the
    model's max_seq_len."""
    loaded = load_for_inference(checkpoint, base=base, dtype=dtype, device=device)
    run = loaded.run
    overrides = {} if beta is None else {"beta": beta}
    if run is not None:
        loss_fn = run.loss(**overrides)
        logps_settings = {"average_logps": run.average_logps, "ld_alpha": run.ld_alpha}
        run_max, run_prompt = run.validation_lengths()
        batch_size = batch_size or run.eval_batch_size or DEFAULT_BATCH_SIZE
    else:
        from dpokit.losses.margin import dpo_loss

        loss_fn = functools.partial(dpo_loss, beta=DEFAULT_BETA, **overrides)
        logps_settings = {"average_logps": False, "ld_alpha": None}
        run_max = run_prompt = None
        batch_size = batch_size or DEFAULT_BATCH_SIZE
    max_length = max_length or run_max or getattr(loaded.model, "max_seq_len", None)
    if max_length is None:
        raise DpokitError(f"{loaded.description}: the model's max_seq_len is unknown; give a max length")
    max_prompt_length = max_prompt_length or (run_prompt if max_length == run_max else None)
    tok, tokenizer_label = eval_tokenizer(loaded, tokenizer, template)
    dataset = data.load(tok, max_seq_len=max_length, max_prompt_len=max_prompt_length)
    if len(dataset) == 0:
        raise DpokitError(f"{data.label()}: no preference pairs to evaluate")
    ref, reference_label = _reference(
        loaded, reference, loss_fn, dtype=dtype, device=device, logps_settings=logps_settings
    )
    collate = functools.partial(collate_preference_pairs, pad_id=tok.pad_id)
    batches = eval_batches(dataset, collate, batch_size=batch_size, rank=0, world_size=1)
    metrics = preference_eval_metrics(loaded.model, ref, batches, loss_fn, device=device, **logps_settings)
    settings = {
        **_loss_settings(loss_fn),
        **logps_settings,
        "batch_size": batch_size,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length or max_length // 2,
        "tokenizer": tokenizer_label,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
    }
    return CheckpointEval(
        str(checkpoint), loaded.description, reference_label, metrics.pairs, settings, metrics.means()
    )


def eval_table(results: list[CheckpointEval], data_label: str) -> str:
    """The metrics of `results` side by side, one column per checkpoint, then what each column
    is (model, reference, settings)."""
    names = [f"[{i + 1}]" for i in range(len(results))]
    rows = [("metric", *names), ("pairs", *(str(r.pairs) for r in results))]
    for metric in METRIC_ROWS:
        if any(metric in r.metrics for r in results):
            rows.append((metric, *(f"{r.metrics[metric]:.6g}" if metric in r.metrics else "-" for r in results)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"data: {data_label}"]
    for row in rows:
        lines.append("  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))]))
    for name, r in zip(names, results):
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items())
        lines += [f"{name} {r.checkpoint}", f"    model: {r.model}", f"    reference: {r.reference}"]
        lines.append(f"    settings: {settings}")
    return "\n".join(lines)
