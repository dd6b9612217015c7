"""Experiment trackers: where a run's numbers go besides `metrics.jsonl` (which is always written).

One small interface, `MetricLogger`: `log(step, metrics)` with flat names such as `train/loss`,
`validation/acc` or `validation/<set>/acc`, `log_config(config)` once at the start, and
`close(status)` at the end ("finished", "failed" or "interrupted"). The trackers are optional
extras, imported only when a run asks for one:

    tensorboard  pip install 'dpokit[tensorboard]'  event files under output_dir/tensorboard
    wandb        pip install 'dpokit[wandb]'        a run in project `project` (mode online/offline)
    mlflow       pip install 'dpokit[mlflow]'       a run in experiment `experiment`; the tracking URI is
                                                    MLFLOW_TRACKING_URI or output_dir/mlruns (file store)

`open_loggers({"tensorboard": {}, "wandb": {"project": "dpo"}}, output_dir)` builds them from plain
options (a recipe passes its `loggers:` mapping). Only rank 0 opens loggers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from dpokit.errors import DpokitError

STATUSES = ("finished", "failed", "interrupted")


class MetricLogger:
    """The interface: subclasses write to one tracker."""

    name = "logger"

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The run's settings (nested plain values), once, before the first `log`."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def log_samples(self, step: int, rows: Sequence[Mapping[str, str | None]]) -> None:
        """Completions of the fixed prompts ({"prompt", "policy", "reference"} each) at `step`."""


def samples_markdown(rows: Sequence[Mapping[str, str | None]]) -> str:
    """The rows as a Markdown table (prompt | policy | reference)."""

    def cell(text: str | None) -> str:
        return "-" if text is None else text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | policy | reference |", "|---|---|---|"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['policy'])} | {cell(r['reference'])} |" for r in rows]
    return "\n".join(lines)

    def close(self, status: str = "finished") -> None:
        """Flush and end the run; `status` is one of STATUSES."""


def _needs(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise DpokitError(f"loggers.{extra}: needs the {extra} package (pip install 'dpokit[{extra}]')") from None


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 1e-3}} -> {"optimizer.lr": 1e-3}; other values (lists too) as they are."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class TensorBoardLogger(MetricLogger):
    """Scalars as TensorBoard events (`tensorboard --logdir output_dir/tensorboard`); the config
    as a text summary."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, *, resume_step: int = 0):
        _needs("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        # On resume, events of the steps after the checkpoint (logged by the run that died) are
        # hidden, as metrics.jsonl is cut back, so the curves show each step once.
        purge_step = resume_step + 1 if resume_step else None
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log_config(self, config):
        rows = "\n".join(f"| {k} | {v} |" for k, v in flatten(config).items())
        self.writer.add_text("config", f"| key | value |\n|---|---|\n{rows}", global_step=0)

    def log(self, step, metrics):
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, global_step=step)  # the writer flushes on its own timer

    def log_samples(self, step, rows):
        self.writer.add_text("samples", samples_markdown(rows), global_step=step)

    def close(self, status="finished"):
        self.writer.add_text("status", status)
        self.writer.close()


class WandbLogger(MetricLogger):
    """A Weights & Biases run. `mode="offline"` writes it under `dir` for a later `wandb sync`;
    other keyword arguments go to `wandb.init` (entity, group, tags, ...)."""

    name = "wandb"

    def __init__(
        self, dir: str | Path, *, project: str = "dpokit", name: str | None = None, mode: str | None = None, **init
    ):
        wandb = _needs("wandb", "wandb")
        Path(dir).mkdir(parents=True, exist_ok=True)
        init.setdefault("settings", wandb.Settings(quiet=True))  # its summary table would bury the run's own output
        self.run = wandb.init(project=project, name=name, dir=str(dir), mode=mode, reinit="create_new", **init)

    def log_config(self, config):
        self.run.config.update(dict(config), allow_val_change=True)

    def log(self, step, metrics):
        self.run.log(dict(metrics), step=step)

    def log_samples(self, step, rows):
        import wandb

        table = wandb.Table(columns=["prompt", "policy", "reference"])
        for r in rows:
            table.add_data(r["prompt"], r["policy"], r["reference"])
        self.run.log({"samples": table}, step=step)

    def close(self, status="finished"):
        self.run.finish(exit_code=0 if status == "finished" else 1)


class MlflowLogger(MetricLogger):
    """An MLflow run in `experiment`. Without `tracking_uri` (or MLFLOW_TRACKING_URI) the run goes
    to a local file store in `default_dir` (`mlflow ui --backend-store-uri file:...` shows it)."""

    name = "mlflow"
    _STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

    def __init__(
        self, default_dir: str | Path, *, experiment: str = "dpokit", run_name: str | None = None, tracking_uri=None
    ):
        _needs("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or Path(default_dir).resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store only behind this switch; it is what a local run needs.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_config(self, config):
        from mlflow.entities import Param

        # MLflow caps a parameter value at 6000 characters.
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step, metrics):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_samples(self, step, rows):
        self.client.log_text(self.run_id, samples_markdown(rows), f"samples/step_{step:08d}.md")

    def close(self, status="finished"):
        self.client.set_terminated(self.run_id, self._STATUS[status])


PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_loggers(specs: Mapping[str, Any] | None) -> None:
    """Before anything loads: every name is a known tracker whose package is installed."""
    if specs is not None and not isinstance(specs, Mapping):
        raise DpokitError(
            f"loggers: expected a mapping of tracker name -> options (e.g. {{tensorboard: {{}}}}), got {specs!r}"
        )
    for name, options in (specs or {}).items():
        if name not in PACKAGES:
            raise DpokitError(f"loggers.{name}: unknown logger; choose from {sorted(PACKAGES)}")
        if options is not None and not isinstance(options, Mapping):
            raise DpokitError(f"loggers.{name}: expected a mapping of options (or {{}}), got {options!r}")
        _needs(PACKAGES[name], name)


def open_loggers(
    specs: Mapping[str, Mapping[str, Any] | None] | None, output_dir: str | Path, *, resume_step: int = 0
) -> list[MetricLogger]:
    """The trackers `specs` names, each with its options: {"tensorboard": {"log_dir": ...},
    "wandb": {"project": ..., "mode": "offline"}, "mlflow": {"experiment": ...}}. Their files go
    under `output_dir` unless the options say otherwise; `resume_step`: the step a resumed run
    continues after (TensorBoard drops what was logged past it). A tracker that cannot start (an option it
    does not take, no API key, a server out of reach) is a one-line DpokitError."""
    check_loggers(specs)
    output_dir = Path(output_dir)
    loggers: list[MetricLogger] = []
    for name, options in (specs or {}).items():
        options = dict(options or {})
        try:
            if name == "tensorboard":
                log_dir = options.pop("log_dir", output_dir / "tensorboard")
                loggers.append(TensorBoardLogger(log_dir, resume_step=resume_step, **options))
            elif name == "wandb":
                loggers.append(WandbLogger(options.pop("dir", output_dir), **options))
            else:
                loggers.append(MlflowLogger(options.pop("default_dir", output_dir / "mlruns"), **options))
        except Exception as e:
            close_all(loggers, "failed", quiet=True)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DpokitError(f"loggers.{name}: cannot start: {reason}") from None
    return loggers


def tracked(split: str, metrics: Mapping[str, Any], dataset: str | None = None) -> dict[str, float]:
    """A record's numbers under tracker names: `train/loss`, `validation/acc`, `validation/<dataset>/acc`
    (text fields and the step itself are not metrics)."""
    prefix = f"{split}/{dataset}/" if dataset else f"{split}/"
    return {
        f"{prefix}{k}": float(v)
        for k, v in metrics.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def close_all(loggers: list[MetricLogger], status: str, *, quiet: bool = False) -> list[str]:
    """Close every logger, even when one of them fails to. Returns the failures as lines (a
    tracker that cannot close must not hide why the run ended); raises the first unless `quiet`."""
    failures = []
    for logger in loggers:
        try:
            logger.close(status)
        except Exception as e:
            failures.append(f"loggers.{logger.name}: closing failed: {e}")
    loggers.clear()
    if failures and not quiet:
        raise DpokitError(failures[0])
    return failures
