"""Padded vs packed (FFD, FFS) vs prefix-shared + packed DPO batches on HH-RLHF lengths.

    python benchmarks/packing.py [--hh PATH] [--pairs 128] [--repeats 3] [--max-seq-len 512]

For each layout, over the same pairs:
  tokens/pair   tokens the model computes per pair, padding included (rows x width / pairs)
  occupancy     real tokens / computed tokens
  pair-tok/s    DPO training-step throughput in "useful" tokens: every layout is credited with the
                2 * prompt + chosen + rejected tokens of the pairs it processed, so the numbers compare
                the same work (policy forward+backward with LoRA on, reference forward with LoRA off)
Then the time to pack 1M synthetic pairs with each packer (and the naive O(N * packs) scan on 20k).

Tokenizers: dpokit's byte tokenizer, and a byte-level BPE (8k vocab) trained here on the file's
own text with the `tokenizers` library when it is installed (no tokenizer can be downloaded).
The CPU attention path is SDPA with a dense boolean mask: it computes every (query, key) pair of a
pack, masked or not, so long packs pay T^2 attention that FlexAttention on CUDA would skip.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from dpokit.data import (
    PreferenceDataset,
    byte_tokenizer,
    collate_packed,
    collate_preference_pairs,
    pack_lengths,
    packing_stats,
    pair_length,
    truncate_pair,
)
from dpokit.data.packing import first_fit
from dpokit.data.tokenizer import BYTE_SPECIAL_TOKENS
from dpokit.losses import dpo_loss
from dpokit.models import disable_adapter, lora_llama
from dpokit.training.forward import policy_logps
from dpokit.training.packed_forward import packed_policy_logps

DEFAULT_HH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"


def truncated(items, max_seq_len):
    out = []
    for it in items:
        p, c, r, _ = truncate_pair(
            it["prompt_ids"], it["chosen_ids"], it["rejected_ids"], max_seq_len, max_seq_len // 2
        )
        out.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    return out


def bpe_items(byte_items, byte_tok, vocab_size=8192):
    """Re-tokenize pairs with a byte-level BPE trained on their own text (None without `tokenizers`)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        return None, None
    texts = [byte_tok.decode(it["prompt_ids"] + it["chosen_ids"] + it["rejected_ids"]) for it in byte_items]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BYTE_SPECIAL_TOKENS), show_progress=False)
    )
    enc = lambda ids: bpe.encode(byte_tok.decode(ids)).ids  # noqa: E731
    items = [
        {
            "prompt_ids": enc(it["prompt_ids"]),
            "chosen_ids": enc(it["chosen_ids"]),
            "rejected_ids": enc(it["rejected_ids"]),
        }
        for it in byte_items
    ]
    return items, bpe.get_vocab_size()


def layouts(items, batch_pairs, pack_size):
    """name -> list of collated batches covering every pair once."""
    out = {
        "padded": [
            collate_preference_pairs(items[i : i + batch_pairs], pad_id=0) for i in range(0, len(items), batch_pairs)
        ]
    }
    # Packs per batch chosen so a packed batch holds about as many tokens as a full padded one.
    for name, algorithm, shared in (
        ("packed FFD", "ffd", False),
        ("packed FFS", "ffs", False),
        ("prefix-shared+FFD", "ffd", True),
    ):
        lengths = [pair_length(it, prefix_sharing=shared) for it in items]
        packs = pack_lengths(lengths, pack_size, algorithm, seed=0)
        per_batch = max(1, round(len(packs) / len(out["padded"])))
        out[name] = [
            collate_packed(
                [[items[i] for i in p] for p in packs[k : k + per_batch]],
                pad_id=0,
                pack_size=pack_size,
                prefix_sharing=shared,
            )
            for k in range(0, len(packs), per_batch)
        ]
    return out


def dpo_step(model, batch, forward):
    with torch.no_grad(), disable_adapter(model):
        ref = forward(model, batch)
    policy = forward(model, batch)
    out = dpo_loss(policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta=0.1)
    out.losses.sum().backward()
    model.zero_grad(set_to_none=True)


def run_tokenizer(name, items, vocab_size, args):
    useful = {id(it): 2 * len(it["prompt_ids"]) + len(it["chosen_ids"]) + len(it["rejected_ids"]) for it in items}
    per_pair_useful = sum(useful.values()) / len(items)
    print(
        f"\n== {name} tokenizer: {len(items)} pairs, {per_pair_useful:.0f} tokens/pair unpadded "
        f"(prompt {sum(len(i['prompt_ids']) for i in items) / len(items):.0f}), pack size {args.pack_size}"
    )
    torch.manual_seed(0)
    model = lora_llama(
        vocab_size=vocab_size,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=4 * args.dim,
        max_seq_len=args.pack_size,
        rope_theta=10_000.0,
        lora_rank=8,
    )
    all_batches = layouts(items, args.batch_pairs, args.pack_size)
    forwards = {name: policy_logps if name == "padded" else packed_policy_logps for name in all_batches}
    for name, batches in all_batches.items():
        dpo_step(model, batches[0], forwards[name])  # warm-up
    # Every layout trains on all the pairs; rounds interleave the layouts and the best round counts,
    # so a burst of load from other processes does not land on one layout only.
    best = {name: float("inf") for name in all_batches}
    for _ in range(args.repeats):
        for name, batches in all_batches.items():
            started = time.perf_counter()
            for batch in batches:
                dpo_step(model, batch, forwards[name])
            best[name] = min(best[name], time.perf_counter() - started)
    useful_tokens = sum(useful.values())
    rows = []
    for name, batches in all_batches.items():
        computed = sum(b.input_ids.numel() for b in batches)
        real = sum(b.num_tokens for b in batches)
        rows.append(
            (
                name,
                computed / len(items),
                real / computed,
                useful_tokens / best[name],
                len(items) / best[name],
                sum(b.input_ids.shape[0] for b in batches) / len(batches),
                max(b.input_ids.shape[1] for b in batches),
            )
        )
    base = rows[0][3]
    print(
        f"{'layout':<20}{'tokens/pair':>12}{'occupancy':>10}{'pair-tok/s':>12}{'pairs/s':>9}{'vs padded':>10}"
        f"{'rows':>6}{'width':>7}"
    )
    for layout, per_pair, occ, tps, pps, nrows, width in rows:
        print(
            f"{layout:<20}{per_pair:>12.0f}{occ:>10.3f}{tps:>12.0f}{pps:>9.2f}{tps / base:>9.2f}x"
            f"{nrows:>6.0f}{width:>7}"
        )


def packing_speed(n=1_000_000, capacity=4096):
    rng = random.Random(0)
    lengths = [rng.randint(64, 2048) for _ in range(n)]
    print(f"\n== packing {n:,} synthetic pairs (lengths 64..2048, pack size {capacity})")
    for algorithm in ("ffd", "ffs"):
        started = time.perf_counter()
        packs = pack_lengths(lengths, capacity, algorithm, seed=0)
        elapsed = time.perf_counter() - started
        print(f"{algorithm}: {elapsed:.2f} s  ({packing_stats(packs, lengths, capacity).summary()})")
    small = lengths[:20_000]
    order = list(range(len(small)))
    started = time.perf_counter()
    first_fit(order, small, capacity)
    tree = time.perf_counter() - started
    started = time.perf_counter()
    packs, room = [], []
    for i in order:  # the O(N * packs) scan
        for b, r in enumerate(room):
            if r >= small[i]:
                room[b] -= small[i]
                packs[b].append(i)
                break
        else:
            packs.append([i])
            room.append(capacity - small[i])
    naive = time.perf_counter() - started
    print(f"first fit on 20,000 pairs: segment tree {tree:.3f} s vs linear scan {naive:.3f} s ({naive / tree:.0f}x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hh", default=str(DEFAULT_HH))
    parser.add_argument("--pairs", type=int, default=128, help="pairs trained on per layout and pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the pairs per layout (best counts)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--batch-pairs", type=int, default=8, help="pairs per padded batch")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.pack_size = 2 * args.max_seq_len
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model dim {args.dim}, "
        f"{args.layers} layers, LoRA r=8; {args.batch_pairs} pairs per padded batch"
    )

    tok = byte_tokenizer()
    # Untruncated here; each tokenizer's pairs are truncated to max_seq_len of its own tokens.
    dataset = PreferenceDataset(args.hh, tok, max_seq_len=10**7, skip_invalid=True)
    print(f"{args.hh}: {dataset.stats.summary()}")
    order = list(range(len(dataset)))
    random.Random(0).shuffle(order)
    chosen = [dataset.items[i] for i in order[: args.pairs]]
    run_tokenizer("byte", truncated(chosen, args.max_seq_len), tok.vocab_size, args)
    bpe, bpe_vocab = bpe_items(list(dataset.items), tok)
    if bpe is None:
        print("\n(no `tokenizers` library: BPE comparison skipped)")
    else:
        bpe = truncated([bpe[i] for i in order[: args.pairs]], args.max_seq_len)
        run_tokenizer(f"BPE ({bpe_vocab} vocab, trained on this file)", bpe, bpe_vocab, args)
    packing_speed()


if __name__ == "__main__":
    main()
