"""Peak memory of one dpokit DPO step at one (sequence length, vocabulary size) point, with the
chunked log-probs on or off. Run one fresh process per point (run_all.py does).

The model has the benchmark's layer sizes (make_assets.MODELS[--model]) with the vocabulary set
to --vocab; random init. The batch: --batch-size pairs whose prompt and responses are --seq-len / 2
tokens each, so every sequence has exactly --seq-len tokens (padded layout, no padding). A step is
the full-parameter DPO step of dpokit_runner.py (frozen-copy reference, policy forward + backward,
AdamW), chunked: `policy_logps(...)` (hidden states -> chunked_token_logps), unchunked:
`policy_logps(..., materialize_logits=True)` (the full [2B, T, V] logits).

Method. CUDA: torch.cuda.max_memory_allocated() over the measured step, minus the allocation
before it. CPU: resident memory. A first step at --seq-len 16 allocates gradients and AdamW state;
then `step_peak` = max RSS after the measured step - RSS before it (what the step itself adds on
top of weights, gradients and optimizer state), and `process_peak` = the process's max RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_assets import MODELS  # noqa: E402
from shared_io import current_rss_bytes, emit, max_rss_bytes  # noqa: E402

from dpokit.data import collate_preference_pairs  # noqa: E402
from dpokit.losses import dpo_loss  # noqa: E402
from dpokit.models import llama  # noqa: E402
from dpokit.training.forward import policy_logps  # noqa: E402


def build_model(model: str, vocab: int, max_seq_len: int):
    sizes = dict(MODELS[model], vocab_size=vocab)
    return llama(
        vocab_size=vocab,
        dim=sizes["hidden_size"],
        n_layers=sizes["num_hidden_layers"],
        n_heads=sizes["num_attention_heads"],
        n_kv_heads=sizes["num_key_value_heads"],
        hidden_dim=sizes["intermediate_size"],
        max_seq_len=max_seq_len,
    )


def batch_of(seq_len: int, batch_size: int, vocab: int, generator: torch.Generator) -> dict:
    half = seq_len // 2

    def ids(n):
        return torch.randint(2, vocab, (n,), generator=generator).tolist()

    items = [
        {"prompt_ids": ids(seq_len - half), "chosen_ids": ids(half), "rejected_ids": ids(half)}
        for _ in range(batch_size)
    ]
    return collate_preference_pairs(items, pad_id=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cpu-50m", choices=sorted(MODELS))
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--chunked", choices=("on", "off"), required=True)
    ap.add_argument("--batch-size", type=int, default=2, help="pairs (2x as many sequences)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    model = build_model(args.model, args.vocab, max(2048, args.seq_len)).to(device).train()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        if args.dtype == "bf16"
        else contextlib.nullcontext()
    )
    materialize = args.chunked == "off"
    g = torch.Generator().manual_seed(0)

    def step(batch):
        batch = batch.to(device)
        with torch.no_grad(), autocast:
            ref = policy_logps(ref_model, batch, materialize_logits=materialize)
        with autocast:
            policy = policy_logps(model, batch, materialize_logits=materialize)
            loss = dpo_loss(policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta=0.1).losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batch_of(16, args.batch_size, args.vocab, g))  # gradients + optimizer state exist from here on
    batch = batch_of(args.seq_len, args.batch_size, args.vocab, g)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(batch)
        torch.cuda.synchronize()
        step_peak, process_peak = torch.cuda.max_memory_allocated() - before, torch.cuda.max_memory_allocated()
        method = "cuda max_memory_allocated"
    else:
        before = current_rss_bytes()
        step(batch)
        step_peak, process_peak = max_rss_bytes() - before, max_rss_bytes()
        method = "max RSS - RSS before the step"
    emit(
        dict(
            seq_len=args.seq_len,
            vocab=args.vocab,
            chunked=args.chunked,
            batch_size=args.batch_size,
            dtype=args.dtype,
            step_peak_bytes=step_peak,
            process_peak_bytes=process_peak,
            method=method,
            device=device,
            model=args.model,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
