"""segmented_flash_attention: every document of a packed batch in one autograd node, with the values
of flash_attention per document, bit for bit."""

import copy

import pytest
import torch

from dpokit.data import collate_packed
from dpokit.models import attention as attention_module
from dpokit.models import cpu_attention as cpu_attention_module
from dpokit.models import llama, prepare_blocks
from dpokit.models.attention import Segment, attention, build_attention_mask
from dpokit.models.cpu_attention import flash_attention, segmented_flash_attention
from dpokit.training.packed_forward import packed_policy_logps


def _leaves(batch, length, heads=4, kv_heads=2, dim=16, seed=0):
    """bf16 q, k, v leaves stored [B, T, H, D] as the model stores them, and their [B, H, T, D] views."""
    gen = torch.Generator().manual_seed(seed)
    leaves = [
        torch.randn(batch, length, h, dim, generator=gen).bfloat16().requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    ]
    return leaves, [t.transpose(1, 2) for t in leaves]


def _per_document(q, k, v, segments, *, scale):
    """flash_attention per segment, zeros elsewhere, assembled with cat (the reference)."""
    batch, heads, seq, dim = q.shape
    rows = []
    for row in range(batch):
        pieces, cursor = [], 0
        for seg in sorted((s for s in segments if s.row == row), key=lambda s: s.start):
            if seg.start > cursor:
                pieces.append(q.new_zeros(1, heads, seg.start - cursor, dim))
            sl = [t[row : row + 1, :, seg.start : seg.end] for t in (q, k, v)]
            pieces.append(flash_attention(*sl, seg.mask, scale=scale))
            cursor = seg.end
        if cursor < seq:
            pieces.append(q.new_zeros(1, heads, seq - cursor, dim))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows)


def _branch_mask(n, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(1, 1, n, n, generator=gen) < 0.5) & torch.ones(n, n, dtype=torch.bool).tril()
    return mask | torch.eye(n, dtype=torch.bool)


@pytest.mark.parametrize("limit", [1000, 30, 0])  # all documents fp32-backward, some, none
def test_outputs_and_gradients_equal_flash_attention_per_document(monkeypatch, limit):
    monkeypatch.setattr(cpu_attention_module, "FP32_BACKWARD_MAX_LENGTH", limit)
    segments = (
        Segment(0, 0, 5, None),
        Segment(0, 5, 45, _branch_mask(40, 1)),  # prefix-shared: a branch mask
        Segment(0, 50, 60, None),  # padding 45..50 and 60..64
        Segment(1, 3, 64, None),  # padding at the start of the row
        Segment(2, 0, 64, _branch_mask(64, 2)),
    )
    grad = torch.randn(3, 64, 4, 16, generator=torch.Generator().manual_seed(9)).bfloat16()
    results = []
    for fn in (segmented_flash_attention, _per_document):
        leaves, (q, k, v) = _leaves(3, 64)
        out = fn(q, k, v, segments, scale=0.3)
        out.transpose(1, 2).backward(grad)
        results.append([out.detach(), *(t.grad for t in leaves)])
    for name, ours, want in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(ours, want), name
    out, dq = results[0][:2]
    assert out[0, :, 45:50].eq(0).all() and out[1, :, :3].eq(0).all() and dq[0, 60:].eq(0).all()


def test_fused_projection_layout_equal_heads_frozen_keys_and_an_empty_row():
    """q, k and v cut from one fused [B, T, 3 H D] projection (Phi-3's layout), as many key/value heads
    as query heads, keys and values without gradients, and a row with no document at all."""
    segments = (Segment(0, 2, 20, None), Segment(0, 20, 32, _branch_mask(12, 3)), Segment(2, 0, 9, None))
    grad = torch.randn(3, 32, 4, 16, generator=torch.Generator().manual_seed(4)).bfloat16()
    results = []
    for fn in (segmented_flash_attention, _per_document):
        fused = torch.randn(3, 32, 3 * 64, generator=torch.Generator().manual_seed(5)).bfloat16().requires_grad_()
        q, k, v = (t.view(3, 32, 4, 16).transpose(1, 2) for t in fused.split(64, dim=-1))
        out = fn(q, k.detach(), v.detach(), segments, scale=None)
        out.transpose(1, 2).backward(grad)
        results.append([out.detach(), fused.grad])
    for name, ours, want in zip(("out", "dfused"), *results):
        assert torch.equal(ours, want), name
    assert results[0][0][1].eq(0).all() and results[0][1][1].eq(0).all()  # the empty row


def test_an_in_place_change_of_the_output_is_refused_not_differentiated_wrongly():
    """The backward reads the output it returned (saved, not copied): a later in-place change is
    caught by autograd's version check at backward time instead of giving wrong gradients."""
    leaves, (q, k, v) = _leaves(1, 12)
    out = segmented_flash_attention(q, k, v, (Segment(0, 0, 12, None),))
    out.mul_(2)  # allowed: the output is a plain tensor, not a view of the node's internals
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.float().sum().backward()


def test_tensors_longer_than_the_mask_are_not_cut_to_fit():
    """Keys beyond the mask's length: the per-document loop refuses them as before, instead of the
    one-node path attending over the first positions only."""
    documents = torch.tensor([[0] * 6 + [1] * 6])
    mask = build_attention_mask(documents, torch.zeros_like(documents), "segments")
    _, (q, k, v) = _leaves(1, 16)
    with pytest.raises(RuntimeError, match="split"):
        attention(q, k, v, mask, enable_gqa=True)


def test_output_is_stored_as_the_output_projection_reads_it():
    _, (q, k, v) = _leaves(1, 12)
    out = segmented_flash_attention(q, k, v, (Segment(0, 0, 12, None),))
    assert out.transpose(1, 2).is_contiguous()  # [B, T, H, D]: the o_proj input is a view, not a copy


def test_attention_routes_cpu_bf16_training_through_one_node(monkeypatch):
    calls = []
    original = cpu_attention_module._SegmentedFlashAttention.apply
    monkeypatch.setattr(
        cpu_attention_module._SegmentedFlashAttention, "apply", lambda *a: calls.append(len(a[3])) or original(*a)
    )
    documents = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 2])
    mask = build_attention_mask(documents, torch.zeros_like(documents), "segments")
    leaves, (q, k, v) = _leaves(1, 14)
    attention(q, k, v, mask, enable_gqa=True).float().sum().backward()
    assert calls == [2] and leaves[1].grad.shape == leaves[1].shape
    with torch.no_grad():  # no gradient: torch's SDPA per document, as before
        attention(q, k, v, mask, enable_gqa=True)
    attention(q, k, v, mask, softcap=5.0, enable_gqa=True)  # soft-capped: the eager path
    attention(q.float(), k.float(), v.float(), mask, enable_gqa=True)  # fp32: SDPA
    assert calls == [2]


def _packed_step(model, batch):
    out = packed_policy_logps(model, batch)
    (out.chosen - 2 * out.rejected).float().sum().backward()
    return [out.chosen.detach(), out.rejected.detach(), *(p.grad for p in model.parameters())]


def test_packed_bf16_step_equals_the_per_document_path_and_checkpointing(monkeypatch):
    """A bf16 prefix-shared packed step through the model: the one-node attention gives the
    per-document path's log-probs and gradients exactly, and so does its checkpointed recompute."""
    torch.manual_seed(0)
    base = llama(vocab_size=40, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=96)
    base = base.to(torch.bfloat16)
    pairs = [
        {"prompt_ids": list(range(1, 1 + n)), "chosen_ids": [3] * (n % 4 + 2), "rejected_ids": [4, 5, 6][: n % 3 + 1]}
        for n in (9, 14, 5, 20)
    ]
    batch = collate_packed([pairs[:3], pairs[3:]], pad_id=0, pack_size=48, prefix_sharing=True)
    results, calls = {}, []
    original = cpu_attention_module._SegmentedFlashAttention.apply
    for name in ("one node", "checkpointed"):
        model = copy.deepcopy(base)
        if name == "checkpointed":
            prepare_blocks(model, activation_checkpointing=True)
        with monkeypatch.context() as patch:
            patch.setattr(
                cpu_attention_module._SegmentedFlashAttention, "apply", lambda *a: calls.append(name) or original(*a)
            )
            results[name] = _packed_step(model, batch)
    assert calls.count("one node") == 2  # a node per layer
    assert calls.count("checkpointed") == 4  # and again in each layer's recompute
    with monkeypatch.context() as patch:  # flash_attention per document, assembled with cat
        patch.setattr(attention_module, "segmented_flash_attention", _per_document)
        results["per document"] = _packed_step(copy.deepcopy(base), batch)
    for other in ("checkpointed", "per document"):
        for ours, want in zip(results["one node"], results[other]):
            assert torch.equal(ours, want), other
