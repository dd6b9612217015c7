"""What every benchmark runner shares, dpokit's and the peers' alike: the workload files, the
FLOP and token counts, and how a runner reports its result.

Only the standard library and torch are imported here, so the peer runners (which run in their
own virtual environments, without dpokit) can import this module too.

Token counts of a pair with prompt length p and response lengths c, r:
  useful tokens    2p + c + r   (prompt+chosen and prompt+rejected, no padding): the unit of
                                 every tokens/s number, whatever layout a variant computes;
  computed tokens  what the variant's forward actually runs through the model, padding excluded:
                   2p + c + r, or p + c + r + 1 with prefix sharing (the prompt once, its last
                   token heading both branches).

Model FLOPs of one DPO step (the numerator of model-FLOP efficiency), N = parameters touched by
matmuls (every linear layer and the output head; the embedding lookup is not a matmul):
  policy     (6 N per computed token) + 3 x attention,  forward + backward (backward = 2 x forward)
  reference  (2 N per computed token) + 1 x attention,  forward only (0 when precomputed)
  attention  forward = 4 x n_layers x n_heads x head_dim x (visible query-key pairs): QK^T and AV,
             2 FLOPs per multiply-add each, counting only the pairs the causal/document mask keeps.

LoRA (lora_step_model_flops; n = adapter parameters, A and B of every adapted projection): the base
is frozen, so a trained token costs forward 2N + input-gradient 2N (no weight gradient) + 6n for
the adapters; the reference is the base with adapters off, 2N per computed token; attention as
above (x3 policy, x1 reference). The same per-token weight count as
dpokit.training.throughput.flops_per_token (4|W| frozen, 6|W| trained, 2|W| reference), which
leaves attention out.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

RESULT_PREFIX = "BENCH_RESULT "


# ----------------------------------------------------------------------------- workload files


def read_workload(path: str | Path) -> dict:
    """The pairs file written by make_assets.py: {"pairs": [...], "meta": {...}}."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_model_config(model_dir: str | Path) -> dict:
    with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
        return json.load(f)


def step_slices(num_pairs: int, batch_size: int) -> list[range]:
    """Consecutive batches of `batch_size` pairs (the last may be shorter)."""
    return [range(s, min(s + batch_size, num_pairs)) for s in range(0, num_pairs, batch_size)]


# ----------------------------------------------------------------------------- counting


def useful_tokens(pair: dict) -> int:
    p, c, r = len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])
    return 2 * p + c + r


def computed_tokens(pair: dict, prefix_sharing: bool = False) -> int:
    p, c, r = len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])
    return p + c + r + 1 if prefix_sharing else 2 * p + c + r


def _triangle(n: int) -> int:
    return n * (n + 1) // 2


def visible_pairs(pair: dict, prefix_sharing: bool = False) -> int:
    """Query-key pairs the attention mask keeps for one preference pair.

    Unshared: two causal sequences of p + c and p + r tokens. Prefix-shared (dpokit's layout,
    dpokit.data.packed): p - 1 shared prompt tokens, then each branch (the last prompt token plus
    the response) sees the shared tokens and its own earlier branch tokens.
    """
    p, c, r = len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])
    if not prefix_sharing:
        return _triangle(p + c) + _triangle(p + r)
    shared = p - 1
    branches = sum(b * shared + _triangle(b) for b in (c + 1, r + 1))
    return _triangle(shared) + branches


def matmul_params(config: dict) -> int:
    """N: parameters of every matmul of a forward, from an HF Llama config.json (the output head
    counts even when tied to the embedding: tying shares storage, not compute)."""
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or d // heads
    ffn, vocab = config["intermediate_size"], config["vocab_size"]
    attn = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2  # q, o + k, v
    mlp = 3 * d * ffn
    return layers * (attn + mlp) + d * vocab


def attention_flops_per_pair(config: dict, pairs: int) -> int:
    """Forward attention FLOPs for `pairs` visible query-key pairs."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 4 * config["num_hidden_layers"] * heads * head_dim * pairs


def step_model_flops(
    config: dict, pairs: list[dict], *, prefix_sharing: bool = False, reference_forward: bool = True
) -> float:
    """Model FLOPs of one DPO step over `pairs` (see the module docstring)."""
    n = matmul_params(config)
    tokens = sum(computed_tokens(p, prefix_sharing) for p in pairs)
    attn = sum(attention_flops_per_pair(config, visible_pairs(p, prefix_sharing)) for p in pairs)
    policy = 6 * n * tokens + 3 * attn
    reference = 2 * n * tokens + attn if reference_forward else 0
    return float(policy + reference)


# Projection name -> (in, out) features from an HF Llama config (the LoRA targets).
def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    d, ffn = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or d // heads
    return {
        "q_proj": (d, heads * head_dim),
        "k_proj": (d, kv_heads * head_dim),
        "v_proj": (d, kv_heads * head_dim),
        "o_proj": (heads * head_dim, d),
        "gate_proj": (d, ffn),
        "up_proj": (d, ffn),
        "down_proj": (ffn, d),
    }


def lora_adapter_params(config: dict, rank: int, targets) -> int:
    """n: parameters of the LoRA adapters (A: [rank, in], B: [out, rank]) on `targets` in every layer."""
    shapes = projection_shapes(config)
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {list(shapes)}")
    return config["num_hidden_layers"] * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def lora_step_model_flops(
    config: dict,
    pairs: list[dict],
    *,
    adapter_params: int,
    prefix_sharing: bool = False,
    reference_forward: bool = True,
) -> float:
    """Model FLOPs of one LoRA DPO step over `pairs` (see the module docstring)."""
    n = matmul_params(config)
    tokens = sum(computed_tokens(p, prefix_sharing) for p in pairs)
    attn = sum(attention_flops_per_pair(config, visible_pairs(p, prefix_sharing)) for p in pairs)
    policy = (4 * n + 6 * adapter_params) * tokens + 3 * attn
    reference = 2 * n * tokens + attn if reference_forward else 0
    return float(policy + reference)


# ----------------------------------------------------------------------------- measuring


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Stopwatch:
    """Wall time of the timed steps, synchronising CUDA around each so the numbers are real."""

    def __init__(self, device: str = "cpu"):
        self.device, self.seconds, self.steps = device, 0.0, 0

    def _sync(self):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def __enter__(self):
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds += time.perf_counter() - self._start
        self.steps += 1


def peak_memory_bytes(device: str) -> int:
    """CUDA: torch.cuda.max_memory_allocated; CPU: the process's max RSS."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    return max_rss_bytes()


def emit(result: dict) -> None:
    """Print the runner's result as one machine-readable line (run_all.py parses it)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    sys.stdout.flush()


def parse_result(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return None


def throughput_result(
    *,
    name: str,
    framework: str,
    config: dict,
    pairs: list[dict],
    seconds: float,
    steps: int,
    device: str,
    prefix_sharing: bool = False,
    reference_forward: bool = True,
    losses: list[float] | None = None,
    lora_adapter_params: int | None = None,
    **extra,
) -> dict:
    """The dict every throughput runner emits. With `lora_adapter_params` (n) the model FLOPs are
    LoRA's (frozen base, n trained adapter parameters: lora_step_model_flops)."""
    if lora_adapter_params is None:
        flops = step_model_flops(config, pairs, prefix_sharing=prefix_sharing, reference_forward=reference_forward)
    else:
        flops = lora_step_model_flops(
            config,
            pairs,
            adapter_params=lora_adapter_params,
            prefix_sharing=prefix_sharing,
            reference_forward=reference_forward,
        )
        extra["lora_adapter_params"] = lora_adapter_params
    return dict(
        name=name,
        framework=framework,
        steps=steps,
        pairs=len(pairs),
        seconds=seconds,
        useful_tokens=sum(useful_tokens(p) for p in pairs),
        computed_tokens=sum(computed_tokens(p, prefix_sharing) for p in pairs),
        tokens_per_s=sum(useful_tokens(p) for p in pairs) / seconds,
        model_flops=flops,
        model_flops_per_s=flops / seconds,
        peak_memory_bytes=peak_memory_bytes(device),
        memory_method="cuda max_memory_allocated" if device.startswith("cuda") else "max RSS of the runner process",
        losses=losses or [],
        device=device,
        **extra,
    )
