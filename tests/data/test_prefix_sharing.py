"""The attention rule behind packing and prefix sharing, checked element by element, through the
model (rejected never sees chosen) and through the FlexAttention seam (forward only on CPU)."""

import warnings

import pytest
import torch

from dpokit.data import collate_packed
from dpokit.models import llama
from dpokit.models.attention import (
    SegmentMask,
    attention,
    build_attention_mask,
    flex_attention,
    packed_attention_mask,
    packed_mask_mod,
)
from dpokit.training.packed_forward import packed_policy_logps


def rule(doc, branch, q, k):
    return doc[q] == doc[k] and k <= q and branch[k] in (0, branch[q])


def test_mask_matches_the_rule_elementwise():
    pairs = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8]},
        {"prompt_ids": [9], "chosen_ids": [10], "rejected_ids": [11]},
    ]
    batch = collate_packed([pairs], pad_id=0, pack_size=20, prefix_sharing=True)
    doc, branch = batch.document_ids[0].tolist(), batch.branch_ids[0].tolist()
    mask = packed_attention_mask(batch.document_ids, batch.branch_ids)[0, 0]
    for q in range(20):
        for k in range(20):
            assert mask[q, k].item() == rule(doc, branch, q, k), (q, k)
    # Pair 0: shared [1, 2] at 0-1, chosen branch [3, 4, 5] at 2-4, rejected branch [3, 6, 7, 8] at 5-8.
    assert mask[8].nonzero().flatten().tolist() == [0, 1, 5, 6, 7, 8]
    assert mask.any(-1).all()  # padding attends to padding: no fully masked row (no NaN)


def test_rejected_logps_do_not_depend_on_chosen_tokens():
    model = llama(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=64, max_seq_len=64)
    base = {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]}
    other = {**base, "chosen_ids": [20, 21, 22]}
    with torch.no_grad():
        a = packed_policy_logps(model, collate_packed([[base]], pad_id=0, prefix_sharing=True))
        b = packed_policy_logps(model, collate_packed([[other]], pad_id=0, prefix_sharing=True))
    assert a.rejected.item() == b.rejected.item() and a.chosen.item() != b.chosen.item()


def test_flex_mask_mod_equals_the_boolean_mask_on_every_element():
    pairs = [
        {"prompt_ids": [1] * n, "chosen_ids": [2] * (n % 3 + 1), "rejected_ids": [3] * (n % 2 + 1)}
        for n in (1, 4, 6, 2)
    ]
    for prefix_sharing in (False, True):
        batch = collate_packed([pairs[:3], pairs[3:]], pad_id=0, pack_size=48, prefix_sharing=prefix_sharing)
        doc, branch = batch.document_ids, batch.branch_ids
        grid = torch.arange(48)
        b = torch.arange(2)[:, None, None, None]
        got = packed_mask_mod(doc, branch)(b, torch.zeros_like(b), grid[:, None], grid[None, :])
        assert torch.equal(got, packed_attention_mask(doc, branch))


@pytest.mark.skipif(flex_attention is None, reason="FlexAttention needs torch >= 2.5")
def test_flex_block_mask_path_equals_sdpa_boolean_path():
    pairs = [
        {"prompt_ids": list(range(1, 1 + n)), "chosen_ids": [3] * (n % 4 + 1), "rejected_ids": [4] * 2}
        for n in (3, 7, 2)
    ]
    batch = collate_packed([pairs[:2], pairs[2:]], pad_id=0, pack_size=40, prefix_sharing=True)
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    sdpa = attention(q, k, v, build_attention_mask(batch.document_ids, batch.branch_ids, "sdpa"), enable_gqa=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        flex = attention(q, k, v, build_attention_mask(batch.document_ids, batch.branch_ids, "flex"), enable_gqa=True)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_per_document_sdpa_equals_the_dense_mask_values_and_gradients(prefix_sharing):
    pairs = [
        {"prompt_ids": list(range(1, 1 + n)), "chosen_ids": [3] * (n % 4 + 1), "rejected_ids": [4] * (n % 3 + 1)}
        for n in (3, 7, 2, 5, 1)
    ]
    batch = collate_packed([pairs[:2], pairs[2:]], pad_id=0, pack_size=48, prefix_sharing=prefix_sharing)
    real = (batch.document_ids >= 0)[:, None, :, None]  # padding: zero output per-document, not compared
    assert not real.all()
    weights = torch.randn(2, 4, 48, 16, dtype=torch.float64)
    results = []
    for backend in ("segments", "sdpa"):
        torch.manual_seed(0)
        q = torch.randn(2, 4, 48, 16, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(2, 2, 48, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
        out = attention(q, k, v, build_attention_mask(batch.document_ids, batch.branch_ids, backend), enable_gqa=True)
        (out * weights * real).sum().backward()
        results.append((out * real, q.grad, k.grad, v.grad))
    for segmented, dense in zip(*results):
        torch.testing.assert_close(segmented, dense, rtol=1e-10, atol=1e-10)


def test_auto_backend_is_per_document_sdpa_on_cpu():
    doc = torch.zeros(1, 4, dtype=torch.long)
    mask = build_attention_mask(doc, doc)
    assert isinstance(mask, SegmentMask) and [(s.start, s.end, s.mask) for s in mask.segments] == [(0, 4, None)]
    with pytest.raises(ValueError, match="unknown attention backend"):
        build_attention_mask(doc, doc, "xformers")


def test_compiled_blocks_run_the_per_document_path_like_eager():
    """torch.compile of each block (the recipes' `compile` option) on packed, prefix-shared batches
    gives eager's log-probs and gradients (the per-document attention runs outside the graph)."""
    torch.manual_seed(0)
    model = llama(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    pairs = [
        {"prompt_ids": list(range(1, 1 + n)), "chosen_ids": [3] * (n % 4 + 1), "rejected_ids": [4] * 2}
        for n in (3, 7, 2, 5)
    ]
    batch = collate_packed([pairs[:2], pairs[2:]], pad_id=0, pack_size=40, prefix_sharing=True)

    def logps_and_grads():
        model.zero_grad(set_to_none=True)
        out = packed_policy_logps(model, batch)
        (out.chosen - 2 * out.rejected).sum().backward()
        return torch.cat([out.chosen, out.rejected]).detach(), [p.grad.clone() for p in model.parameters()]

    eager = logps_and_grads()
    for layer in model.layers:
        layer.compile()
    compiled = logps_and_grads()
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled[1], eager[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
