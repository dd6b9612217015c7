"""The bookkeeping around every recipe's training loop.

The recipes keep the wiring in sight (model, sharding, reference, optimizer, the step itself);
what is here only decides *when* things happen and *who* writes them down:

- `process_group`: the process group for the length of a run (left alone if a caller made it);
- `total_training_steps`, `evaluation_due`: the length of the run and the validation cadence;
- `Checkpointer`: resume from the latest (or a named) sharded checkpoint, save every N steps,
  keep the last N;
- `claim_output_dir`: create, check and lock the run's folder (one live run per folder);
- `StopRequests`: Ctrl-C / SIGTERM stop the run at a step boundary, on every rank alike;
- `RunReport`: what rank 0 tells the user (messages, the progress bar, `metrics.jsonl`, the
  closing summary); on the other ranks every method does nothing.

Everything takes plain values: the library never sees the recipe's config.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn
from tqdm import tqdm

from dpokit.distributed.checkpoint import (
    best_checkpoints,
    checkpoint_score,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
    save_checkpoint,
)
from dpokit.distributed.group import (
    DistributedEnv,
    all_reduce_sum,
    barrier,
    broadcast_object,
    destroy_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    raise_together,
)
from dpokit.errors import DpokitError, RunInterrupted
from dpokit.training.loggers import MetricLogger, check_loggers, close_all, open_loggers, tracked
from dpokit.training.metrics import PAIR_METRICS, JsonlLogger
from dpokit.training.throughput import Throughput

# The order of the per-step phase timings in a train record; other phases follow in their own order.
PHASE_ORDER = ("policy", "reference", "swap", "optimizer")


@contextlib.contextmanager
def process_group(device: str) -> Iterator[DistributedEnv]:
    """`init_distributed(device)` for the block. The group is destroyed at the end unless one
    already existed (a caller, e.g. a test, set it up and still needs it)."""
    owns_process_group = not torch.distributed.is_initialized()
    env = init_distributed(device)
    try:
        yield env
    except BaseException:
        if owns_process_group:
            destroy_distributed(wait_for_peers=False)
        raise
    if owns_process_group:
        destroy_distributed()


class StopRequests:
    """Ctrl-C / SIGTERM during training ask the run to stop at the next step boundary instead of
    killing it mid-step; a second signal stops at once (KeyboardInterrupt). `agreed()` is called by
    every rank once per step and is true on all of them when any rank was asked, so every rank
    stops after the same step (and can write the same checkpoint). Use as a context manager: the
    previous handlers come back at the end (signal handlers only exist in the main thread)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if get_rank() == 0:
            tqdm.write(f"{self.signal_name}: stopping after this step (again to stop now)", file=sys.stderr)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (collective: every rank calls it once per step)."""
        asked = 1.0 if self.signal_name else 0.0
        if get_world_size() > 1:
            asked = all_reduce_sum([asked])[0]
        if asked and self.signal_name is None:
            self.signal_name = "another rank's signal"
        return asked > 0


LOCK_NAME = ".dpokit.lock"
_held_locks: dict[Path, int] = {}  # output folder -> the descriptor holding its lock (process lifetime)


def claim_output_dir(output_dir: str | Path, *, is_main: bool) -> Path:
    """Make `output_dir` this run's: rank 0 creates it, checks that files can be written there and
    locks it for the life of the process (a second live run on the same folder would log steps
    twice and race the checkpoints). Collective: every rank calls it and raises the same error.
    The lock is an advisory `flock`, released by the OS however the process ends (kill -9 too)."""
    output_dir = Path(output_dir)
    error = None
    if is_main:
        try:
            _claim(output_dir)
        except DpokitError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise DpokitError(error)
    if get_world_size() > 1:
        _check_shared(output_dir, is_main=is_main)
    return output_dir


def _check_shared(output_dir: Path, *, is_main: bool) -> None:
    """Every rank must see rank 0's files: checkpoints are written by all ranks into one folder,
    so nodes need it on shared storage."""
    token = broadcast_object(secrets.token_hex(8) if is_main else None)
    marker = output_dir / ".dpokit-run"
    if is_main:
        marker.write_text(token)
    barrier()
    try:
        seen = marker.read_text() == token
    except OSError:
        seen = False
    blind = all_reduce_sum([0.0 if seen else 1.0])[0]
    if blind:
        raise DpokitError(
            f"output_dir {output_dir}: {int(blind)} rank(s) cannot see rank 0's files there; a multi-node run "
            f"needs output_dir (and checkpoint.dir) on storage every node shares"
        )


def _claim(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise DpokitError(f"output_dir {output_dir}: exists and is not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DpokitError(f"output_dir {output_dir}: cannot write there ({e.strerror})") from None
    key = output_dir.resolve()
    if key in _held_locks:
        return  # this process holds it already (a caller running several recipes in one process)
    fd = os.open(output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DpokitError(
            f"output_dir {output_dir} is in use by another run (pid {holder}); wait for it to end, stop it, "
            f"or choose another output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held_locks[key] = fd


def total_training_steps(*, steps_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of the run: `epochs` epochs, cut at `max_steps` when given."""
    total = epochs * steps_per_epoch
    return total if max_steps is None else min(total, max_steps)


def evaluation_due(step: int, *, every: int, total_steps: int, at_end: bool = True) -> bool:
    """Validate every `every` steps and, with `at_end`, after the last one."""
    return step % every == 0 or (at_end and step == total_steps)


def parse_validation_metric(metric: str) -> tuple[str | None, str]:
    """ "validation/acc" -> (None, "acc"): the main validation set; "validation/hh/acc" -> ("hh", "acc")."""
    parts = str(metric).split("/")
    if parts[0] != "validation" or len(parts) not in (2, 3) or not all(parts):
        raise DpokitError(
            f"checkpoint.metric: {metric!r} is not a validation metric name like 'validation/acc' or "
            f"'validation/<validation_datasets name>/acc'"
        )
    if parts[-1] not in PAIR_METRICS:
        raise DpokitError(
            f"checkpoint.metric: {parts[-1]!r} is not a validation metric; choose from {list(PAIR_METRICS)}"
        )
    return (parts[1] if len(parts) == 3 else None), parts[-1]


class Checkpointer:
    """Sharded checkpoints of one run under `root` (see `dpokit.distributed.checkpoint`): every `every` steps
    (0 = never) and, with `on_interrupt`, at the step where Ctrl-C / SIGTERM stops the run. Kept:
    the newest `keep_last` (0 = all) and the `keep_top_k` best by the validation `metric`
    ("validation/acc", or "validation/<set>/acc" for a named validation set), each checkpoint
    scored by the latest validation at or before its step. Besides model and optimizer shards a
    checkpoint holds the LR scheduler, the data position (`sampler.state_dict()`), the step and
    every rank's RNG states, so `resume` continues exactly. `trainable_only` saves and loads only
    parameters that train (LoRA: the base weights are the initial checkpoint's).

    Collective where `dpokit.distributed.checkpoint` is: every rank calls `resume` and `save`."""

    def __init__(
        self,
        root: str | Path,
        *,
        every: int,
        keep_last: int,
        on_interrupt: bool = True,
        keep_top_k: int = 0,
        metric: str = "validation/acc",
        higher_is_better: bool | None = None,
        trainable_only: bool = False,
    ):
        for name, value in (("every", every), ("keep_last", keep_last), ("keep_top_k", keep_top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                meaning = {"every": "never", "keep_last": "keep every checkpoint", "keep_top_k": "no best checkpoints"}
                raise DpokitError(f"checkpoint.{name}: {value!r} is not a whole number >= 0 (0: {meaning[name]})")
        self.dataset, self.key = parse_validation_metric(metric)
        if higher_is_better is None:  # a loss is better lower; accuracy, margins and rewards higher
            higher_is_better = not self.key.endswith("loss")
        for name, value in (("on_interrupt", on_interrupt), ("higher_is_better", higher_is_better)):
            if not isinstance(value, bool):
                raise DpokitError(f"checkpoint.{name}: {value!r} is not true or false")
        self.root = Path(root)
        self.every, self.keep_last, self.trainable_only = every, keep_last, trainable_only
        self.on_interrupt, self.keep_top_k, self.metric, self.higher_is_better = (
            on_interrupt,
            keep_top_k,
            metric,
            higher_is_better,
        )
        self.resumed_from: Path | None = None

    def due(self, step: int, *, stopping: bool = False) -> bool:
        """Whether `step` ends with a save: every `every` steps, and where the run is stopping."""
        return (stopping and self.on_interrupt) or (bool(self.every) and step % self.every == 0)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (what a crash would restart from), or None."""
        return latest_checkpoint(self.root)

    def best(self) -> Path | None:
        """The best checkpoint by `metric` so far (None without `keep_top_k` or any scored one)."""
        if not self.keep_top_k:
            return None
        found = best_checkpoints(self.root, 1, metric=self.metric, higher_is_better=self.higher_is_better)
        return found[0] if found else None

    def check_metric(self, validation_sets, *, eval_every: int) -> str | None:
        """Before step 1: `metric` names one of `validation_sets` (None = the main set). Returns a
        warning when checkpoints fall between validations (they are scored by an older one)."""
        if not self.keep_top_k:
            return None
        if self.dataset not in validation_sets:
            named = sorted(n for n in validation_sets if n is not None)
            raise DpokitError(
                f"checkpoint.metric: {self.metric!r} names no validation set; validation_datasets has {named}"
            )
        if self.every and self.every % eval_every:
            return (
                f"checkpoint.every={self.every} is not a multiple of eval_every={eval_every}: a checkpoint is "
                f"scored by the latest validation before it (checkpoint.metric={self.metric})"
            )
        return None

    def score(self, step: int, validations: Mapping[tuple[int, str | None], dict]) -> dict | None:
        """The `metric` of the latest validation at or before `step` ({"metric", "value",
        "validated_at"}), or None before the first validation of that set (or when the loss logs
        no such metric, e.g. sft_loss without an SFT term)."""
        steps = [s for s, name in validations if name == self.dataset and s <= step]
        if not steps or self.key not in validations[(max(steps), self.dataset)]:
            return None
        value = validations[(max(steps), self.dataset)][self.key]
        return {"metric": self.metric, "value": float(value), "validated_at": max(steps)}

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        sampler,
        validations: Mapping[tuple[int, str | None], dict] | None = None,
    ) -> Path:
        """Write the checkpoint of `step` (atomically), scored by `validations` (`RunReport.validations`),
        and drop the ones neither among the newest `keep_last` nor the best `keep_top_k`."""
        return save_checkpoint(
            self.root,
            step,
            model,
            optimizer,
            keep_last=self.keep_last,
            trainable_only=self.trainable_only,
            trainer_state={"scheduler": scheduler.state_dict(), "data": sampler.state_dict()},
            score=self.score(step, validations or {}),
            metric=self.metric if self.keep_top_k else None,
            keep_top_k=self.keep_top_k,
            higher_is_better=self.higher_is_better,
        )

    def resume(self, resume, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, sampler) -> int:
        """Load the checkpoint `resume` names (false/None: none; true: the latest under `root`, if
        any; a path: that one) into model, optimizer, scheduler, sampler and the RNGs. Returns the
        step to continue after (0 for a fresh start); `resumed_from` is the folder loaded."""
        if get_rank() == 0 and self.root.is_dir():
            remove_stale_temporaries(self.root)
        self.resumed_from = resolve_resume(resume, self.root)
        if self.resumed_from is None:
            return 0
        state = load_checkpoint(self.resumed_from, model, optimizer, trainable_only=self.trainable_only)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["data"])
        return state["step"]


FINAL_SUMMARY = "dpokit_run.json"  # in final/: which step it holds, and the best checkpoint


class RunReport:
    """What rank 0 tells the user during a run: messages (through tqdm, so the bar stays intact),
    the progress bar, one JSON line per train step and per validation in `metrics.jsonl`, the same
    numbers to the experiment trackers (`dpokit.training.loggers`), and a closing summary. On other
    ranks (`is_main=False`) nothing is written or printed."""

    def __init__(self, output_dir: str | Path, *, is_main: bool, loggers: Mapping | None = None):
        self.output_dir, self.is_main = Path(output_dir), is_main
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.log: JsonlLogger | None = None
        check_loggers(loggers)  # names and packages, before anything loads (every rank alike)
        self.logger_specs = dict(loggers or {})
        self.loggers: list[MetricLogger] = []
        self.throughput: Throughput | None = None
        self.progress: tqdm | None = None  # drawn from the first train step on
        self._steps = (0, 0)  # (total, already done) for the bar
        self.first_validation: dict | None = None  # the step-0 validation of a fresh run (main set)
        self.last_validation: dict | None = None
        self.validations: dict[tuple[int, str | None], dict] = {}  # (step, dataset) -> metrics

    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def warn(self, message: str) -> None:
        """`warning: message` on stderr (rank 0)."""
        if self.is_main:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    @contextlib.contextmanager
    def running(
        self,
        *,
        total_steps: int,
        start_step: int,
        resumed_from: Path | None = None,
        config: Mapping | None = None,
        throughput: Throughput | None = None,
    ):
        """The training loop's span (collective): `start`, the trackers opened on rank 0 and given
        `config` (one that cannot start stops every rank with its line); on the way out every one
        is closed with the run's status ("finished", or "interrupted" / "failed" when the loop raised)."""
        self.start(total_steps=total_steps, start_step=start_step, resumed_from=resumed_from)
        self.throughput = throughput
        status = "failed"
        try:
            error = None
            if self.is_main:
                try:
                    resume_step = start_step if resumed_from is not None else 0
                    self.loggers = open_loggers(self.logger_specs, self.output_dir, resume_step=resume_step)
                    for logger in self.loggers:
                        logger.log_config(config or {})
                except Exception as e:
                    error = str(e) if isinstance(e, DpokitError) else f"loggers: cannot start: {e}"
            raise_together(error)
            yield self
            status = "finished"
        except (RunInterrupted, KeyboardInterrupt):
            status = "interrupted"
            raise
        finally:
            try:
                self.close(status)
            except Exception:
                if status == "finished":
                    raise  # nothing else went wrong: this is the run's error
                # otherwise the loop's own error is the one to report

    def start(self, *, total_steps: int, start_step: int, resumed_from: Path | None = None) -> None:
        """Open `metrics.jsonl` (continued, not restarted, when resuming); the bar will count
        from `start_step` to `total_steps`."""
        if resumed_from is not None:
            self.say(f"resumed from {resumed_from} at step {start_step}")
            dropped = JsonlLogger.truncate_after(self.metrics_path, start_step) if self.is_main else 0
            if dropped:
                self.say(
                    f"{self.metrics_path}: dropped {dropped} line(s) the interrupted run logged after step {start_step}"
                )
        if self.is_main:
            if resumed_from is not None:  # the validations so far score later checkpoints and `final/`
                for record in JsonlLogger.read(self.metrics_path):
                    if record.get("split") == "validation":
                        metrics = {k: v for k, v in record.items() if k not in ("step", "split", "dataset")}
                        self.validations[(record["step"], record.get("dataset"))] = metrics
                        if record.get("dataset") is None:
                            self.last_validation = metrics
            self.log = JsonlLogger(self.metrics_path, append=resumed_from is not None)
        self._steps = (total_steps, start_step)

    def _record(self, record: dict, *, split: str, dataset: str | None = None) -> None:
        if self.log:
            self.log.log(record)
        for logger in list(self.loggers):
            try:
                logger.log(record["step"], tracked(split, record, dataset))
            except Exception as e:  # metrics.jsonl holds every record: a tracker failing must not stop training
                self.loggers.remove(logger)
                self.warn(f"loggers.{logger.name}: stopped logging at step {record['step']}: {e}")
                close_all([logger], "failed", quiet=True)

    def validation(self, step: int, metrics: dict, *, dataset: str | None = None) -> None:
        """Log and announce the validation metrics of `step`, on the main validation set or on the
        named one `dataset` (trackers: `validation/acc`, `validation/<dataset>/acc`)."""
        named = {"dataset": dataset} if dataset else {}
        self._record({"step": step, "split": "validation", **named, **metrics}, split="validation", dataset=dataset)
        self.validations[(step, dataset)] = metrics
        if dataset is None:
            if step == 0:
                self.first_validation = metrics
            self.last_validation = metrics
        where = f"validation {dataset}" if dataset else "validation"
        self.say(f"step {step}: {where} loss {metrics['preference_loss']:.4f} acc {metrics['acc']:.3f}")

    def samples(self, step: int, rows: list[dict]) -> None:
        """Log the completions of the fixed prompts at `step` (`training.samples`): a metrics.jsonl
        record of split "samples" and each tracker's text form of it."""
        if not self.is_main:
            return
        if self.log:
            self.log.log({"step": step, "split": "samples", "samples": rows})
        for logger in list(self.loggers):
            try:
                logger.log_samples(step, rows)
            except Exception as e:  # as for metrics: metrics.jsonl keeps them, the tracker is dropped
                self.loggers.remove(logger)
                self.warn(f"loggers.{logger.name}: stopped logging at step {step}: {e}")
                close_all([logger], "failed", quiet=True)
        first = rows[0] if rows else None
        if first is not None:
            self.say(f"step {step}: sample {first['prompt'][:40]!r} -> {first['policy'][:60]!r}")

    def train_step(
        self,
        step: int,
        metrics: dict,
        *,
        lr: float,
        grad_norm: float,
        tokens: int,
        seconds: float,
        phases: dict[str, float],
    ) -> None:
        """Log one optimizer step: its (rank-reduced) metrics, LR, gradient norm, the step's
        `tokens` (all ranks) and wall time `seconds`, the `phases` it was spent in (policy,
        reference...), the throughput numbers (tokens/s per device, peak memory, MFU), and advance
        the bar."""
        if self.is_main:
            ordered = [name for name in PHASE_ORDER if name in phases] + [n for n in phases if n not in PHASE_ORDER]
            speed = self.throughput.measure(tokens, seconds) if self.throughput else {"tokens_per_s": tokens / seconds}
            record = {
                "step": step,
                "split": "train",
                "loss": metrics["loss"],  # loss first
                **metrics,
                "lr": lr,
                "grad_norm": grad_norm,
                **speed,
                "step_s": seconds,
                **{f"{name}_s": phases[name] for name in ordered},
            }
            self._record(record, split="train")
        if self.progress is None:
            total, done = self._steps
            self.progress = tqdm(
                total=total,
                initial=done,
                desc="dpo",
                dynamic_ncols=True,
                disable=not self.is_main,
                mininterval=0.5 if sys.stderr.isatty() else 5,
            )
        self.progress.update()
        self.progress.set_postfix(loss=f"{metrics['preference_loss']:.3f}", acc=f"{metrics['acc']:.2f}", refresh=False)

    def close(self, status: str = "finished") -> None:
        """Close the bar, `metrics.jsonl` and the trackers (the end of the loop, before the final
        save); a tracker that fails to close is a warning, and every other one still closes."""
        try:
            if self.progress is not None:
                self.progress.close()
                self.progress = None
            if self.log:
                self.log, log = None, self.log
                log.close()
        finally:
            for failure in close_all(self.loggers, status, quiet=True):
                self.warn(failure)

    def describe_final(self, folder: str | Path, *, step: int, best: Path | None = None) -> None:
        """`folder/dpokit_run.json` (rank 0): the step the final weights are from, its last validation
        on the main set, and the best checkpoint kept by `checkpoint.metric` (path and score), if any."""
        if not self.is_main:
            return
        summary = {"step": step, "validation": self.last_validation, "best_checkpoint": None}
        if best is not None:
            score = checkpoint_score(best) or {}
            summary["best_checkpoint"] = {"path": str(best), **score}
            self.say(
                f"best checkpoint by {score['metric']}: {best} ({score['value']:.4g}, validated at step {score['validated_at']})"
            )
        (Path(folder) / FINAL_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    def finish(self, final_dir: Path | None) -> None:
        """The closing lines: validation accuracy before -> after (fresh runs) and where things are."""
        if not self.is_main:
            return
        if self.first_validation and self.last_validation:
            print(f"validation accuracy {self.first_validation['acc']:.3f} -> {self.last_validation['acc']:.3f}")
        print(f"metrics: {self.metrics_path}\ncheckpoint: {final_dir}\noutput directory: {self.output_dir.resolve()}")
