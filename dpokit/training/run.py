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
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from dpokit.distributed.checkpoint import (
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
)
from dpokit.errors import DpokitError
from dpokit.training.metrics import JsonlLogger

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


def evaluation_due(step: int, *, every: int, total_steps: int) -> bool:
    """Validate every `every` steps and after the last one."""
    return step % every == 0 or step == total_steps


class Checkpointer:
    """Sharded checkpoints of one run under `root` (see `dpokit.distributed.checkpoint`): every `every` steps
    (0 = never), the newest `keep_last` kept (0 = all). Besides model and optimizer shards a
    checkpoint holds the LR scheduler, the data position (`sampler.state_dict()`), the step and
    every rank's RNG states, so `resume` continues exactly. `trainable_only` saves and loads only
    parameters that train (LoRA: the base weights are the initial checkpoint's).

    Collective where `dpokit.distributed.checkpoint` is: every rank calls `resume` and `save`."""

    def __init__(self, root: str | Path, *, every: int, keep_last: int, trainable_only: bool = False):
        for name, value in (("every", every), ("keep_last", keep_last)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DpokitError(
                    f"checkpoint.{name}: {value!r} is not a whole number >= 0 (0: "
                    f"{'never' if name == 'every' else 'keep every checkpoint'})"
                )
        self.root = Path(root)
        self.every, self.keep_last, self.trainable_only = every, keep_last, trainable_only
        self.resumed_from: Path | None = None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def latest(self) -> Path | None:
        """The newest complete checkpoint (what a crash would restart from), or None."""
        return latest_checkpoint(self.root)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, sampler) -> Path:
        """Write the checkpoint of `step` (atomically) and drop the ones beyond `keep_last`."""
        return save_checkpoint(
            self.root,
            step,
            model,
            optimizer,
            keep_last=self.keep_last,
            trainable_only=self.trainable_only,
            trainer_state={"scheduler": scheduler.state_dict(), "data": sampler.state_dict()},
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


class RunReport:
    """What rank 0 tells the user during a run: messages (through tqdm, so the bar stays intact),
    the progress bar, one JSON line per train step and per validation in `metrics.jsonl`, and a
    closing summary. On other ranks (`is_main=False`) nothing is written or printed."""

    def __init__(self, output_dir: str | Path, *, is_main: bool):
        self.output_dir, self.is_main = Path(output_dir), is_main
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.log: JsonlLogger | None = None
        self.progress: tqdm | None = None  # drawn from the first train step on
        self._steps = (0, 0)  # (total, already done) for the bar
        self.first_validation: dict | None = None  # the step-0 validation of a fresh run
        self.last_validation: dict | None = None

    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def warn(self, message: str) -> None:
        """`warning: message` on stderr (rank 0)."""
        if self.is_main:
            tqdm.write(f"warning: {message}", file=sys.stderr)

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
            self.log = JsonlLogger(self.metrics_path, append=resumed_from is not None)
        self._steps = (total_steps, start_step)

    def validation(self, step: int, metrics: dict) -> None:
        """Log and announce the validation metrics of `step`."""
        if self.log:
            self.log.log({"step": step, "split": "validation", **metrics})
        if step == 0:
            self.first_validation = metrics
        self.last_validation = metrics
        self.say(f"step {step}: validation loss {metrics['preference_loss']:.4f} acc {metrics['acc']:.3f}")

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
        """Log one optimizer step: its (rank-reduced) metrics, LR, gradient norm, rank 0's token
        throughput, its wall time `seconds` and the `phases` it was spent in (policy, reference...),
        and advance the bar."""
        if self.log:
            ordered = [name for name in PHASE_ORDER if name in phases] + [n for n in phases if n not in PHASE_ORDER]
            self.log.log(
                {
                    "step": step,
                    "split": "train",
                    "loss": metrics["loss"],
                    **metrics,
                    "lr": lr,  # loss first
                    "grad_norm": grad_norm,
                    "tokens_per_s_rank0": tokens / seconds,
                    "step_s": seconds,
                    **{f"{name}_s": phases[name] for name in ordered},
                }
            )
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

    def close(self) -> None:
        """Close the bar and `metrics.jsonl` (the end of the loop, before the final save)."""
        if self.progress is not None:
            self.progress.close()
        if self.log:
            self.log.close()

    def finish(self, final_dir: Path | None) -> None:
        """The closing lines: validation accuracy before -> after (fresh runs) and where things are."""
        if not self.is_main:
            return
        if self.first_validation and self.last_validation:
            print(f"validation accuracy {self.first_validation['acc']:.3f} -> {self.last_validation['acc']:.3f}")
        print(f"metrics: {self.metrics_path}\ncheckpoint: {final_dir}\noutput directory: {self.output_dir.resolve()}")
