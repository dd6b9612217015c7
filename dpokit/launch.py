"""`dpokit run --nproc_per_node N`: start the worker processes of one node and own them.

What torchrun's elastic agent does not give a user: one line per failing rank (or one line when
they all fail alike) instead of a `ChildFailedError` traceback, the worker's exit code (2 bad
input, 130 interrupted), workers that die with the launcher (`kill -9` of `dpokit` leaves nothing
training), and Ctrl-C / SIGTERM passed on once, so every rank stops at the same step boundary.

The rendezvous is static, as torchrun's `--master_addr/--master_port`: node `node_rank` of
`nnodes` runs ranks `node_rank * N ... node_rank * N + N - 1`, and every node is given the same
`host:port` of node 0 (`--rdzv_endpoint`). Workers report a failure they understood as one JSON
file in `DPOKIT_ERROR_DIR` (written by `dpokit.config.recipe_main`), printing nothing themselves.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ERROR_DIR_ENV = "DPOKIT_ERROR_DIR"
COMMAND_ENV = "DPOKIT_COMMAND"  # how the user started the run, for "resume with: ..."
LOST_PEER = "lost_peer"  # a worker that stopped because another one died: not a cause
GRACE_SECONDS = 10.0  # after one rank fails, how long the others get to stop on their own


class LaunchError(Exception):
    """A launcher option that cannot work; the CLI prints it as one line, exit 2."""


@dataclass
class Topology:
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def _whole_number(text, option: str, *, minimum: int) -> int:
    try:
        value = int(str(text))
    except ValueError:
        raise LaunchError(f"{option} {text}: not a whole number") from None
    if value < minimum:
        raise LaunchError(f"{option} {text}: must be at least {minimum}")
    return value


def topology(nproc_per_node, nnodes, node_rank, rdzv_endpoint) -> Topology:
    """Checked launcher options. `nproc_per_node` "gpu" (the default) is this node's CUDA devices."""
    if nproc_per_node in (None, "gpu"):
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise LaunchError("--nproc_per_node gpu: this machine has no CUDA device; give a number of processes")
        nproc = count
    else:
        nproc = _whole_number(nproc_per_node, "--nproc_per_node", minimum=1)
    if nnodes is not None and ":" in str(nnodes):
        raise LaunchError(f"--nnodes {nnodes}: elastic MIN:MAX node counts are not supported; give one number")
    nodes = 1 if nnodes is None else _whole_number(nnodes, "--nnodes", minimum=1)
    rank = 0 if node_rank is None else _whole_number(node_rank, "--node_rank", minimum=0)
    if rank >= nodes:
        raise LaunchError(f"--node_rank {rank}: must be below --nnodes {nodes}")
    if nodes > 1 and rdzv_endpoint is None:
        raise LaunchError("--nnodes > 1 needs --rdzv_endpoint HOST:PORT (node 0's address, the same on every node)")
    addr, port = "127.0.0.1", None
    if rdzv_endpoint is not None:
        addr, sep, port_text = str(rdzv_endpoint).rpartition(":")
        if not sep or not addr:
            raise LaunchError(f"--rdzv_endpoint {rdzv_endpoint}: expected HOST:PORT")
        port = _whole_number(port_text, "--rdzv_endpoint port", minimum=1)
        if port > 65535:
            raise LaunchError(f"--rdzv_endpoint {rdzv_endpoint}: port above 65535")
    return Topology(nproc, nodes, rank, addr, port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the launcher dies, however it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's signal handlers still stop the workers


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


@dataclass
class Outcome:
    rank: int
    code: int
    message: str | None  # the worker's own one line, when it wrote one
    kind: str | None = None

    def describe(self) -> str:
        if self.message:
            return self.message
        if self.code < 0:
            hint = " (out of memory?)" if -self.code == signal.SIGKILL else ""
            return f"killed by {_signal_name(self.code)}{hint}"
        return f"exited with code {self.code} (see its output above)"


def summarize(outcomes: list[Outcome]) -> tuple[int, list[str]]:
    """The launcher's exit code and its lines for the failing workers: the causes first (a worker
    that only lost its peers is not one), one line when every cause says the same."""
    failed = [o for o in outcomes if o.code != 0]
    if not failed:
        return 0, []
    causes = [o for o in failed if o.kind != LOST_PEER] or failed
    code = next((o.code for o in causes if o.code > 0), 1)
    if len({o.describe() for o in causes}) == 1:
        who = "every rank" if len(causes) == len(outcomes) > 1 else _ranks(causes)
        lines = [f"{causes[0].describe()}" + ("" if len(outcomes) == 1 else f" [{who}]")]
    else:
        lines = [f"rank {o.rank}: {o.describe()}" for o in causes]
    stopped = len(failed) - len(causes)
    if stopped:
        lines.append(f"({stopped} other rank(s) stopped because of it)")
    return code, lines


def _ranks(outcomes: list[Outcome]) -> str:
    ranks = [str(o.rank) for o in outcomes]
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(ranks)


def worker_threads(nproc_per_node: int) -> int:
    """CPU threads per worker when OMP_NUM_THREADS is unset: this machine's cores shared out, so N
    workers never oversubscribe the cores (which is slow, and changes the fp32 rounding of CPU
    kernels with the load). One worker is left to torch's own default (every core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc_per_node)


def launch(command: list[str], topo: Topology, *, resume_command: str | None = None) -> int:
    """Run `command` (a recipe and its arguments) as this node's workers; returns the exit code."""
    port = topo.master_port or _free_port()
    error_dir = Path(tempfile.mkdtemp(prefix="dpokit-errors-"))
    base_env = dict(
        os.environ,
        WORLD_SIZE=str(topo.world_size),
        LOCAL_WORLD_SIZE=str(topo.nproc_per_node),
        MASTER_ADDR=topo.master_addr,
        MASTER_PORT=str(port),
        GROUP_RANK=str(topo.node_rank),
        **{ERROR_DIR_ENV: str(error_dir)},
    )
    if resume_command:
        base_env[COMMAND_ENV] = resume_command
    if topo.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        base_env["OMP_NUM_THREADS"] = str(worker_threads(topo.nproc_per_node))
    workers: dict[int, subprocess.Popen] = {}

    def forward(signum, _frame):
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for local_rank in range(topo.nproc_per_node):
            rank = topo.node_rank * topo.nproc_per_node + local_rank
            env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(local_rank))
            # Own session: a Ctrl-C reaches only the launcher, which passes it on exactly once.
            workers[rank] = subprocess.Popen(
                [sys.executable, *command], env=env, start_new_session=True, preexec_fn=_die_with_parent
            )
        codes, killed = _wait(workers)
    finally:
        for proc in workers.values():  # the launcher is leaving: nothing outlives it
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    outcomes = [_outcome(rank, code, error_dir, killed=rank in killed) for rank, code in sorted(codes.items())]
    for path in error_dir.iterdir():
        path.unlink()
    error_dir.rmdir()
    code, lines = summarize(outcomes)
    for line in lines:
        print(f"error: {line}" if not line.startswith("(") else line, file=sys.stderr)
    return code


def _wait(workers: dict[int, subprocess.Popen]) -> tuple[dict[int, int], set[int]]:
    """Wait for every worker; once one fails, the rest get `GRACE_SECONDS` to stop on their own
    (a collective with a dead peer errors out), then are killed (one stuck in NCCL never would)."""
    codes: dict[int, int] = {}
    killed: set[int] = set()
    failed_at = None
    while len(codes) < len(workers):
        for rank, proc in workers.items():
            if rank not in codes and proc.poll() is not None:
                codes[rank] = proc.returncode
                if proc.returncode != 0 and failed_at is None:
                    failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_SECONDS:
            for rank, proc in workers.items():
                if rank not in codes:
                    proc.kill()
                    codes[rank] = proc.wait()
                    killed.add(rank)
        time.sleep(0.05)
    return codes, killed


def _outcome(rank: int, code: int, error_dir: Path, *, killed: bool) -> Outcome:
    path = error_dir / f"rank{rank}.json"
    if not path.exists():
        return Outcome(rank, code, None, LOST_PEER if killed else None)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Outcome(rank, code, None)
    return Outcome(rank, code, report.get("message"), report.get("kind"))


# The worker's side of the protocol.


def lost_peer(error: BaseException) -> bool:
    """Did a collective fail because another process of the run is gone?"""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo")
    )


def report_failure(message: str, code: int, *, kind: str | None = None) -> None:
    """The worker's one line: to the launcher's error folder when `dpokit run` started it (the
    launcher prints one line for all ranks), else `error: ...` on stderr."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir and Path(error_dir).is_dir():
        path = Path(error_dir) / f"rank{os.environ.get('RANK', '0')}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"message": message, "code": code, "kind": kind}), encoding="utf-8")
        os.replace(tmp, path)
    else:
        print(f"error: {message}", file=sys.stderr)


def resume_hint() -> str:
    """The command that continues this run from its latest checkpoint."""
    command = os.environ.get(COMMAND_ENV) or " ".join([os.path.basename(sys.executable), *sys.argv])
    return command if command.endswith("resume=true") else f"{command} resume=true"
