"""CPU attention for bf16 training: torch's flash kernel, its backward run in fp32 when short.

torch's CPU flash-attention backward is slow for bf16 inputs and short sequences: on an Intel Xeon
with AMX (2 cores, torch 2.13, 8 query / 4 key-value heads of 64) it took 1.23 ms for a sequence
of 128 tokens and 0.46 ms for the same call on fp32 copies; the fp32 copies were still 1.25x
faster at 256 tokens, the two met between 320 and 420 tokens (run to run), and above that bf16
is faster (`benchmarks/cpu_attention.py`). Most documents of a packed DPO step (prompt +
response) are shorter than that, and that backward was the largest non-matmul item of the step.

`flash_attention` runs exactly the forward `F.scaled_dot_product_attention` runs (the same kernel
on the same inputs: bit for bit) and, for sequences up to `FP32_BACKWARD_MAX_LENGTH`, the same
backward kernel on fp32 copies of its inputs: the same algorithm, with fp32 where the bf16 kernel
rounds its intermediates to bf16 before their matmuls, and one rounding of each gradient at the end.
It takes only the calls for which `F.scaled_dot_product_attention` itself would pick that kernel.

`segmented_flash_attention` does the same for every document of a packed batch in one autograd
node: the documents' outputs are written into one [B, T, H, D] buffer (the layout the output
projection reads, so no copy follows), and its backward casts q, k, v, the output and its gradient
to fp32 once for the whole batch instead of once per document, and writes each document's
gradients into whole-batch buffers instead of concatenating them.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend

FP32_BACKWARD_MAX_LENGTH = 320

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = may attend) as the kernel's additive mask of the query's dtype."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        causal = mask is None
        out, lse = _forward(q, k, v, 0.0, causal, attn_mask=_bias(mask, q.dtype), scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        causal = mask is None
        if q.shape[-2] > FP32_BACKWARD_MAX_LENGTH:
            grads = _backward(grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=_bias(mask, q.dtype), scale=ctx.scale)
            return *grads, None, None
        inputs = (t.float() for t in (grad_out, q, k, v, out))
        grads = _backward(*inputs, lse, 0.0, causal, attn_mask=_bias(mask, torch.float32), scale=ctx.scale)
        return *(g.to(t.dtype) for g, t in zip(grads, (q, k, v))), None, None


def segment_index(seg) -> tuple[slice, slice, slice]:
    """Indexes the [1, H, n, D] slice of a [B, H, T, D] tensor that holds one segment."""
    return slice(seg.row, seg.row + 1), slice(None), slice(seg.start, seg.end)


def _gaps(segments, batch: int, seq_len: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of each stretch of a row that no segment covers (padding)."""
    covered: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
    for seg in segments:
        covered[seg.row].append((seg.start, seg.end))
    gaps = []
    for row, spans in enumerate(covered):
        cursor = 0
        for start, end in sorted(spans):
            if start > cursor:
                gaps.append((row, cursor, start))
            cursor = max(cursor, end)
        if cursor < seq_len:
            gaps.append((row, cursor, seq_len))
    return gaps


def _zero_gaps(gaps, tensors) -> None:
    for row, start, end in gaps:
        for t in tensors:
            t[row, :, start:end] = 0


class _SegmentedFlashAttention(torch.autograd.Function):
    """Takes q [B, H, T, D], k/v [B, Hkv, T, D]; returns the output stored and shaped [B, T, H, D]:
    a plain tensor, not a view of the node's internals (the backward reads it, so an in-place
    change made later is refused by autograd's version check)."""

    @staticmethod
    def forward(ctx, q, k, v, segments, scale):
        batch, heads, seq, _ = q.shape
        out = q.new_empty(batch, seq, heads, v.shape[-1])
        out_bhtd = out.transpose(1, 2)
        lse = q.new_empty(batch, seq, heads, dtype=torch.float32).transpose(1, 2)  # the kernel's layout
        for seg in segments:
            index = segment_index(seg)
            out_bhtd[index], lse[index] = _forward(
                q[index], k[index], v[index], 0.0, seg.mask is None, attn_mask=_bias(seg.mask, q.dtype), scale=scale
            )
        gaps = _gaps(segments, batch, seq)
        _zero_gaps(gaps, [out_bhtd])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.segments, ctx.gaps, ctx.scale = segments, gaps, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        inputs = [grad_out.transpose(1, 2), q, k, v, out.transpose(1, 2)]
        grads = [t.new_empty(t.shape[0], t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2) for t in (q, k, v)]
        _zero_gaps(ctx.gaps, grads)
        short = [seg for seg in ctx.segments if seg.end - seg.start <= FP32_BACKWARD_MAX_LENGTH]
        long = [seg for seg in ctx.segments if seg.end - seg.start > FP32_BACKWARD_MAX_LENGTH]
        # One fp32 copy of each whole input (five casts per layer, not five per document): cheaper
        # than casting document by document even where long documents or padding come along.
        inputs32 = [t.float() for t in inputs] if short else inputs
        _backward_segments(short, inputs32, lse, grads, ctx.scale, torch.float32)
        _backward_segments(long, inputs, lse, grads, ctx.scale, q.dtype)
        return *grads, None, None


def _backward_segments(segments, inputs, lse, grads, scale, dtype) -> None:
    """Each segment's flash backward on slices of `inputs` (grad_out, q, k, v, out, all of `dtype`),
    written (rounded to the gradients' dtype) into the matching slices of `grads` (dq, dk, dv)."""
    for seg in segments:
        index = segment_index(seg)
        pieces = _backward(
            *(t[index] for t in inputs),
            lse[index],
            0.0,
            seg.mask is None,
            attn_mask=_bias(seg.mask, dtype),
            scale=scale,
        )
        for g, piece in zip(grads, pieces):
            g[index] = piece


def flash_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *, enable_gqa: bool) -> bool:
    """Whether `flash_attention` takes this call: bf16 self-attention on the CPU that autograd will
    differentiate, and that `F.scaled_dot_product_attention` would send to its flash kernel (the
    backend flags, strides, mask shape and head counts are its checks). Anything else goes to
    `F.scaled_dot_product_attention` as it is."""
    if not (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and torch.is_grad_enabled()
        and q.requires_grad
        and not torch.compiler.is_compiling()
        and q.shape[-2] == k.shape[-2]
        and (mask is None or mask.dtype == torch.bool)
    ):
        return False
    try:
        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, mask is None, scale=None, enable_gqa=enable_gqa)
    except TypeError:  # a torch whose chooser predates enable_gqa: keep its own path
        return False
    return choice == SDPBackend.FLASH_ATTENTION.value


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale q k^T, masked) v: q [B, H, L, D], k/v [B, Hkv, L, D] (H a multiple of Hkv), mask
    None (causal) or boolean [L, L] or [B or 1, H or 1, L, L] (True = may attend); scale None =
    1 / sqrt(D). Check `flash_attention_applies` first."""
    return _FlashAttention.apply(q, k, v, mask, scale)


def segmented_flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments, *, scale: float | None = None
) -> torch.Tensor:
    """`flash_attention` of every segment (objects with row, start, end and a boolean mask or None,
    as `dpokit.models.attention.Segment`) of q [B, H, T, D], k/v [B, Hkv, T, D], in one autograd
    node; positions outside every segment get zero outputs and zero gradients. The values are those
    of `flash_attention` per segment, bit for bit. Check `flash_attention_applies` per segment first."""
    return _SegmentedFlashAttention.apply(q, k, v, tuple(segments), scale).transpose(1, 2)
