"""Decoding against transformers' `generate` and the KV cache against the full forward."""

from __future__ import annotations

import pytest
import torch

from dpokit.generation import KVCache, Sampling, filtered_probs, generate, next_tokens
from dpokit.models import disable_adapter, lora_llama
from dpokit.models.hf_checkpoint import load_hf_checkpoint
from hf_fixtures import FAMILIES, write_hf_checkpoint

transformers = pytest.importorskip("transformers")

# Prompts of different lengths: batched they are left-padded.
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [11, 3], [60, 61, 62, 63, 1]]
NEW = 30  # past the tiny fixtures' sliding windows


def hf_greedy(model, prompts, max_new_tokens):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[:, width:].tolist()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = write_hf_checkpoint(request.param, directory)
    return request.param, reference, load_hf_checkpoint(directory).eval()


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_greedy_equals_transformers_generate_batched_with_left_padding(family, use_cache):
    name, reference, ours = family
    want = hf_greedy(reference, PROMPTS, NEW)
    got = generate(ours, PROMPTS, max_new_tokens=NEW, use_cache=use_cache)
    assert got == want, name
    # Each prompt alone decodes as it does in the batch (padding changes nothing).
    assert [generate(ours, [p], max_new_tokens=NEW)[0] for p in PROMPTS] == got


def test_kv_cache_logits_equal_the_full_forward(family):
    name, _, model = family
    # LongRoPE's full forward past its switch length rotates every position by the long factors,
    # which cached keys of earlier steps never had (generation recomputes them at the switch).
    length = min(45, model.rope_switch_length or 45)
    sizes = [20, 1, 1, 7, length - 29]  # a prefill, single steps and chunks
    tokens = torch.randint(1, 96, (2, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.for_model(model, batch=2, capacity=length)
        pieces, start = [], 0
        for size in sizes:
            positions = torch.arange(start, start + size).expand(2, size)
            cache.advance(positions)
            pieces.append(model(tokens[:, start : start + size], positions, cache=cache))
            start += size
    diff = (torch.cat(pieces, dim=1) - full).abs().max().item()
    assert diff <= 1e-5, f"{name}: {diff}"


def test_stop_tokens_end_each_row_and_lora_decodes_with_adapters_on_or_off():
    model = lora_llama(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=128, lora_rank=4
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.5)
    free = generate(model, PROMPTS, max_new_tokens=12)
    stop = free[0][3]
    stopped = generate(model, PROMPTS, max_new_tokens=12, stop_ids=[stop])
    for row, (whole, cut) in enumerate(zip(free, stopped)):
        end = whole.index(stop) + 1 if stop in whole else len(whole)
        assert cut == whole[:end], row
    with disable_adapter(model):
        base = generate(model, PROMPTS, max_new_tokens=12)
    assert base != free  # the adapters change what is generated


def test_sampling_filters_and_frequencies():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    # top_k = 1 and a tiny top_p are greedy whatever the temperature.
    for sampling in (Sampling(temperature=5.0, top_k=1), Sampling(temperature=5.0, top_p=1e-6)):
        assert torch.all(next_tokens(logits.expand(50, -1), sampling) == 0)
    # The nucleus: the smallest set of most likely tokens reaching top_p, renormalised (float64 math).
    probs = torch.softmax(logits.double() / 0.7, -1)[0]
    keep = 1 + int((torch.cumsum(probs, 0) < 0.9).sum())
    want = torch.zeros(6, dtype=torch.float64)
    want[:keep] = probs[:keep] / probs[:keep].sum()
    got = filtered_probs(logits, Sampling(temperature=0.7, top_p=0.9))[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    top2 = filtered_probs(logits, Sampling(temperature=1.0, top_k=2))[0]
    torch.testing.assert_close(top2[:2].double(), torch.softmax(logits[0, :2].double(), -1), rtol=1e-6, atol=1e-7)
    assert top2[2:].sum() == 0
    # Sampled frequencies follow the filtered distribution.
    generator = torch.Generator().manual_seed(0)
    draws = next_tokens(logits.expand(20_000, -1), Sampling(temperature=0.7, top_p=0.9), generator)
    freq = torch.bincount(draws, minlength=6).double() / 20_000
    assert (freq - want).abs().max() < 0.015 and freq[keep:].sum() == 0
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_the_cache_takes_the_dtype_attention_computes_in():
    """Under FSDP2 mixed precision the parameters are fp32 shards while attention runs in bf16:
    the cache must hold what the layers write, not the parameters' dtype."""
    import copy

    model = lora_llama(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    cache = KVCache.for_model(model, batch=1, capacity=8)  # sized from the fp32 model
    low = copy.deepcopy(model).to(torch.bfloat16)
    positions = torch.arange(8)[None]
    cache.advance(positions)
    with torch.no_grad():
        out = low(torch.randint(1, 64, (1, 8)), positions, cache=cache)
    assert cache.keys.dtype == torch.bfloat16 and torch.isfinite(out).all()
