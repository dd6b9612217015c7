"""The benchmark's counting helpers (benchmarks/shared_io.py, benchmarks/make_assets.py) against
independent references: dpokit's own attention masks and parameter counts, and hand arithmetic.
No benchmark runs here."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import make_assets  # noqa: E402
import shared_io  # noqa: E402

from dpokit.data import collate_packed  # noqa: E402
from dpokit.models import llama  # noqa: E402
from dpokit.models.attention import packed_attention_mask  # noqa: E402


def random_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(2, 50) for _ in range(k)]

    return [
        {
            "prompt_ids": ids(rng.randint(1, 9)),
            "chosen_ids": ids(rng.randint(1, 7)),
            "rejected_ids": ids(rng.randint(1, 7)),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_visible_pairs_and_tokens_match_dpokit_packed_layout(prefix_sharing):
    pairs = random_pairs(6, seed=1 + prefix_sharing)
    batch = collate_packed([pairs[:4], pairs[4:]], pad_id=0, prefix_sharing=prefix_sharing)
    mask = packed_attention_mask(batch.document_ids, batch.branch_ids)
    real = batch.document_ids >= 0
    # Only real query-key pairs count (padding attends to padding in dpokit's mask).
    visible = (mask.squeeze(1) & real[:, :, None] & real[:, None, :]).sum().item()
    assert visible == sum(shared_io.visible_pairs(p, prefix_sharing) for p in pairs)
    assert real.sum().item() == sum(shared_io.computed_tokens(p, prefix_sharing) for p in pairs)


def test_matmul_params_counts_every_linear_of_the_model():
    config = make_assets.hf_config("tiny", 64)
    model = llama(
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config["num_key_value_heads"],
        hidden_dim=config["intermediate_size"],
        max_seq_len=64,
    )
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert shared_io.matmul_params(config) == linear


def test_step_model_flops_by_hand():
    config = {
        "hidden_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 16,
        "vocab_size": 10,
    }
    # per layer: q 8*8 + o 8*8 + k 8*4 + v 8*4 = 192; mlp 3*8*16 = 384; head 8*10 = 80
    n = 2 * (192 + 384) + 80
    assert shared_io.matmul_params(config) == n == 1232
    pair = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [3]}
    # unshared: sequences of 5 and 4 tokens -> 15 + 10 causal pairs; 9 tokens
    attn = 4 * 2 * 2 * 4 * (15 + 10)  # 4 * layers * heads * head_dim * pairs
    assert shared_io.step_model_flops(config, [pair]) == 6 * n * 9 + 3 * attn + 2 * n * 9 + attn
    assert shared_io.step_model_flops(config, [pair], reference_forward=False) == 6 * n * 9 + 3 * attn
    # prefix-shared: 2 shared tokens (3 causal pairs); the chosen branch (last prompt token + 2) has 3
    # tokens, each sees the 2 shared (6) + its own causal 6; the rejected branch of 2 tokens: 4 + 3.
    # 3 + 12 + 7 = 22 pairs over 2 + 3 + 2 = 7 tokens
    assert shared_io.visible_pairs(pair, prefix_sharing=True) == 22
    attn_shared = 4 * 2 * 2 * 4 * 22
    assert shared_io.step_model_flops(config, [pair], prefix_sharing=True) == 8 * n * 7 + 4 * attn_shared


@pytest.mark.parametrize("seed", range(5))
def test_truncate_fits_keeps_prompt_end_and_response_start(seed):
    rng = random.Random(seed)
    max_length = 32
    for _ in range(200):
        p, c, r = ([rng.randrange(100) for _ in range(rng.randint(1, 60))] for _ in range(3))
        tp, tc, tr = make_assets.truncate(p, c, r, max_length)
        assert len(tp) + max(len(tc), len(tr)) <= max_length and min(len(tp), len(tc), len(tr)) >= 1
        assert tp == p[len(p) - len(tp) :] and tc == c[: len(tc)] and tr == r[: len(tr)]
        if len(p) + max(len(c), len(r)) <= max_length:
            assert (tp, tc, tr) == (p, c, r)


def test_synthetic_pairs_follow_the_fitted_shape():
    pairs, meta = make_assets.synthetic_pairs(2000, 32000, 4096, seed=0)
    prompts = sorted(len(p["prompt_ids"]) for p in pairs)
    mu, _ = make_assets.SYNTHETIC_SHAPE["prompt"]
    median = prompts[len(prompts) // 2]
    assert abs(median - torch.tensor(mu).exp().item()) / median < 0.1
    assert all(p["chosen_ids"][-1] == make_assets.EOS_ID for p in pairs)
