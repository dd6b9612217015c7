"""The attention-backend seam: plain causal SDPA, SDPA with a boolean mask, or FlexAttention.

Packed and prefix-shared batches describe their attention pattern per token with
`document_ids` and `branch_ids` (see `dpokit.data.packed`): query q may attend to key k iff

    document[q] == document[k]  and  k <= q  and  branch[k] in {0, branch[q]}

(branch 0 = shared tokens such as the prompt; 1 / 2 = the chosen / rejected branch of a
prefix-shared pair, which never see each other). `build_attention_mask` turns that into

  - a boolean [B, 1, T, T] tensor (True = may attend) for `F.scaled_dot_product_attention`: used on
    CPU and anywhere FlexAttention is unavailable (torch 2.13 has no FlexAttention backward on CPU);
  - a FlexAttention `BlockMask` on CUDA, which skips fully-masked blocks instead of materialising
    T x T booleans;
  - a `SegmentMask` (the CPU default): documents never attend across each other, so attention is
    block-diagonal and each document runs its own kernel call, causal or with its small branch mask
    (CPU bf16 training: all of a layer's calls in one autograd node, `segmented_flash_attention`).
    That costs sum(len(doc)^2) instead of the dense mask's T^2 per row: a 1,024-token pack of four
    256-token documents does a quarter of the dense work.

`attention(q, k, v, mask)` dispatches on the mask's type, so the model calls one function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.models.cpu_attention import (
    flash_attention,
    flash_attention_applies,
    segment_index,
    segmented_flash_attention,
)

try:  # FlexAttention is in torch >= 2.5; dpokit supports older builds without it.
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    BlockMask = create_block_mask = flex_attention = None

_compiled_flex = None


def packed_attention_mask(document_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """document_ids, branch_ids [B, T] -> boolean mask [B, 1, T, T] (True = may attend)."""
    seq = document_ids.shape[-1]
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    key_branch = branch_ids[:, None, :]
    visible_branch = (key_branch == 0) | (key_branch == branch_ids[:, :, None])
    return (same_document & causal & visible_branch).unsqueeze(1)


def packed_mask_mod(document_ids: torch.Tensor, branch_ids: torch.Tensor):
    """The same rule as `packed_attention_mask`, as a FlexAttention mask_mod."""

    def mask_mod(b, h, q_idx, kv_idx):
        same_document = document_ids[b, q_idx] == document_ids[b, kv_idx]
        key_branch = branch_ids[b, kv_idx]
        visible_branch = (key_branch == 0) | (key_branch == branch_ids[b, q_idx])
        return same_document & (kv_idx <= q_idx) & visible_branch

    return mask_mod


@dataclass(frozen=True)
class Segment:
    """Positions [start, end) of batch row `row` form one document; `mask` is its [1, 1, n, n]
    branch mask, or None when the document is plain causal."""

    row: int
    start: int
    end: int
    mask: torch.Tensor | None


@dataclass(frozen=True)
class SegmentMask:
    """Block-diagonal attention over documents. Positions outside every segment (padding) get a
    zero attention output: nothing attends to them and they carry no label."""

    batch: int
    seq_len: int
    segments: tuple[Segment, ...]


def segment_mask(document_ids: torch.Tensor, branch_ids: torch.Tensor) -> SegmentMask:
    """document_ids, branch_ids [B, T] -> SegmentMask (one host sync to read the document runs)."""
    documents = document_ids.tolist()
    segments = []
    for row, ids in enumerate(documents):
        start = 0
        while start < len(ids):
            end = start + 1
            while end < len(ids) and ids[end] == ids[start]:
                end += 1
            if ids[start] >= 0:  # -1 = padding
                branches = branch_ids[row : row + 1, start:end]
                mask = None
                if bool((branches != 0).any()):
                    mask = packed_attention_mask(document_ids[row : row + 1, start:end], branches)
                segments.append(Segment(row, start, end, mask))
            start = end
    return SegmentMask(len(documents), document_ids.shape[-1], tuple(segments))


@torch.compiler.disable  # data-dependent loop: a compiled block breaks its graph here instead
def segmented_attention(
    q, k, v, mask: SegmentMask, *, scale: float | None = None, softcap: float | None = None, enable_gqa: bool = False
) -> torch.Tensor:
    """SDPA per document of a `SegmentMask`, reassembled into [B, H, T, D].

    q, k and v are cut with one `split` per row (rows, then documents and the gaps between them)
    rather than one slice per document: a slice's backward writes its gradient into a zero tensor
    of the whole input, so per-document slices cost a full-size fill and add per document in the
    backward, where a split's backward is one concatenation.

    CPU bf16 training, where every document goes to torch's flash kernel, takes
    `segmented_flash_attention` instead: the same kernels, all documents in one autograd node."""
    if softcap is None and _every_document_takes_flash(q, k, v, mask, enable_gqa):
        return segmented_flash_attention(q, k, v, mask.segments, scale=scale)
    by_row: list[list[Segment]] = [[] for _ in range(mask.batch)]
    for seg in mask.segments:
        by_row[seg.row].append(seg)
    rows = []
    for segments, q_row, k_row, v_row in zip(by_row, q.split(1), k.split(1), v.split(1)):
        sizes: list[int] = []
        documents: list[Segment | None] = []  # per piece: its segment, or None for a gap (padding)
        cursor = 0
        for seg in segments:
            if seg.start > cursor:
                sizes.append(seg.start - cursor)
                documents.append(None)
            sizes.append(seg.end - seg.start)
            documents.append(seg)
            cursor = seg.end
        if cursor < mask.seq_len:
            sizes.append(mask.seq_len - cursor)
            documents.append(None)
        pieces = []
        for seg, qs, ks, vs in zip(documents, q_row.split(sizes, 2), k_row.split(sizes, 2), v_row.split(sizes, 2)):
            if seg is None:
                pieces.append(q.new_zeros(1, q.shape[1], qs.shape[2], v.shape[-1]))
            else:
                pieces.append(_dense(qs, ks, vs, seg.mask, scale=scale, softcap=softcap, enable_gqa=enable_gqa))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)


def _every_document_takes_flash(q, k, v, mask: SegmentMask, enable_gqa: bool) -> bool:
    """Whether `segmented_flash_attention` takes the call: tensors of the mask's shape, and every
    document one that `flash_attention` would take."""
    shaped = q.shape[0] == k.shape[0] == v.shape[0] == mask.batch
    shaped = shaped and q.shape[2] == k.shape[2] == v.shape[2] == mask.seq_len
    return (
        shaped
        and bool(mask.segments)
        and all(
            flash_attention_applies(q[index], k[index], v[index], seg.mask, enable_gqa=enable_gqa)
            for seg in mask.segments
            for index in [segment_index(seg)]
        )
    )


def flex_available(device: torch.device) -> bool:
    return flex_attention is not None and device.type == "cuda"


def build_attention_mask(document_ids: torch.Tensor, branch_ids: torch.Tensor, backend: str = "auto"):
    """The mask object the model's attention consumes. backend: "auto" (FlexAttention on CUDA,
    else per-document SDPA), "segments" (SegmentMask), "sdpa" (dense boolean tensor) or "flex"
    (BlockMask)."""
    if backend == "auto":
        backend = "flex" if flex_available(document_ids.device) else "segments"
    if backend == "segments":
        return segment_mask(document_ids, branch_ids)
    if backend == "sdpa":
        return packed_attention_mask(document_ids, branch_ids)
    if backend == "flex":
        if create_block_mask is None:
            raise RuntimeError("FlexAttention needs torch >= 2.5")
        batch, seq = document_ids.shape
        return create_block_mask(
            packed_mask_mod(document_ids, branch_ids), batch, None, seq, seq, device=document_ids.device
        )
    raise ValueError(f"unknown attention backend {backend!r}; choose from 'auto', 'segments', 'sdpa', 'flex'")


def _eager_attention(q, k, v, mask: torch.Tensor | None, scale: float | None, softcap: float, enable_gqa: bool):
    """softmax(softcap * tanh(q k^T * scale / softcap), masked) v, the softmax in fp32: the path
    for attention soft-capping (Gemma 2), which SDPA cannot express."""
    if enable_gqa and k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def _dense(q, k, v, mask, *, scale, softcap, enable_gqa):
    """One SDPA-shaped call: causal (mask None) or a boolean mask; eager when soft-capped."""
    if softcap is not None:
        return _eager_attention(q, k, v, mask, scale, softcap, enable_gqa)
    if flash_attention_applies(q, k, v, mask, enable_gqa=enable_gqa):
        return flash_attention(q, k, v, mask, scale=scale)  # CPU bf16 training: a faster backward
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=enable_gqa
    )


_SCORE_MODS: dict = {}


def _softcap_score_mod(softcap: float):
    """One FlexAttention score_mod per cap value: a new closure each call would recompile."""
    if softcap not in _SCORE_MODS:

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap

        _SCORE_MODS[softcap] = score_mod
    return _SCORE_MODS[softcap]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask=None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    enable_gqa: bool = False,
):
    """q [B, H, T, D], k/v [B, Hkv, T, D]; mask None (causal), a SegmentMask, a boolean tensor, or
    a BlockMask. scale: the score scale (default 1/sqrt(D)); softcap: scores -> softcap *
    tanh(scores / softcap) before the softmax (Gemma 2)."""
    if isinstance(mask, SegmentMask):
        return segmented_attention(q, k, v, mask, scale=scale, softcap=softcap, enable_gqa=enable_gqa)
    if BlockMask is not None and isinstance(mask, BlockMask):
        global _compiled_flex
        score_mod = None if softcap is None else _softcap_score_mod(softcap)

        if q.device.type != "cuda":  # eager FlexAttention: forward only, slow; for checks on CPU
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=enable_gqa)
        if _compiled_flex is None:
            # Compiled once per process; uncompiled FlexAttention materialises the full score matrix.
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=enable_gqa)
    return _dense(q, k, v, mask, scale=scale, softcap=softcap, enable_gqa=enable_gqa)


def sliding_window_mask(mask, positions: torch.Tensor, window: int):
    """`mask` (any kind `attention` takes) restricted to keys fewer than `window` positions back:
    q may attend to k only if positions[q] - positions[k] < window (transformers' rule). Position
    ids, not indices, measure the distance, so a prefix-shared rejected branch (stored after the
    chosen one) sees the prompt as the unshared sequence would."""
    batch, seq = positions.shape
    if isinstance(mask, SegmentMask):
        segments = []
        for seg in mask.segments:
            if seg.end - seg.start <= window:  # the window cannot cut anything this short
                segments.append(seg)
                continue
            pos = positions[seg.row : seg.row + 1, seg.start : seg.end]
            allowed = _band(pos, window)
            if seg.mask is None:
                allowed = allowed & torch.ones_like(allowed).tril()
            else:
                allowed = allowed & seg.mask
            segments.append(Segment(seg.row, seg.start, seg.end, allowed))
        return SegmentMask(mask.batch, mask.seq_len, tuple(segments))
    if BlockMask is not None and isinstance(mask, BlockMask):
        inner = mask.mask_mod

        def windowed(b, h, q_idx, kv_idx):
            return inner(b, h, q_idx, kv_idx) & (positions[b, q_idx] - positions[b, kv_idx] < window)

        return create_block_mask(windowed, batch, None, seq, seq, device=positions.device)
    band = _band(positions, window)
    if mask is None:  # padded batches: plain causal
        return band & torch.ones(seq, seq, dtype=torch.bool, device=positions.device).tril()
    return mask & band


def _band(positions: torch.Tensor, window: int) -> torch.Tensor:
    """positions [B, T] -> [B, 1, T, T]: True where the key is fewer than `window` positions back
    (keys ahead are left to the causal part of the mask)."""
    distance = positions[:, :, None] - positions[:, None, :]
    return (distance < window).unsqueeze(1)
