"""CPU attention for bf16 / fp16 training: torch's flash kernel, its backward run in fp32 when short.

torch's CPU flash-attention backward is slow for low-precision inputs and short sequences: on an
Intel Xeon with AMX (2 cores, torch 2.13, 8 query / 4 key-value heads of 64) it took 1.23 ms for
a bf16 sequence of 128 tokens and 0.46 ms for the same call on fp32 copies (1.25x at 256 tokens);
the two meet between 320 and 420 tokens (run to run), and above that bf16 is faster. Most
documents of a packed DPO step (prompt + response) are shorter than that, and that backward was
the largest non-matmul item of the step.

`flash_attention` runs the same forward as `F.scaled_dot_product_attention` (same kernel, same
inputs, bit for bit) and, for sequences up to `FP32_BACKWARD_MAX_LENGTH`, the same backward
kernel on fp32 copies of its inputs: the exact math of the low-precision backward, which itself
accumulates in fp32, with nothing rounded to bf16 before the gradients' final cast.
"""

from __future__ import annotations

import functools

import torch

FP32_BACKWARD_MAX_LENGTH = 320

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@functools.cache
def _kernel_takes_grouped_heads() -> bool:
    """Whether this torch's CPU flash kernels accept fewer key/value heads than query heads."""
    q = torch.zeros(1, 2, 1, 8, requires_grad=True)
    kv = torch.zeros(1, 1, 1, 8, requires_grad=True)
    try:
        out, lse = _forward(q, kv, kv, 0.0, True)
        _backward(out, q, kv, kv, out, lse, 0.0, True)
    except RuntimeError:
        return False
    return True


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
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        causal = mask is None
        if q.shape[-2] > FP32_BACKWARD_MAX_LENGTH:
            grads = _backward(grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=_bias(mask, q.dtype), scale=ctx.scale)
            return *grads, None, None
        inputs = (t.float() for t in (grad_out, q, k, v, out))
        grads = _backward(*inputs, lse, 0.0, causal, attn_mask=_bias(mask, torch.float32), scale=ctx.scale)
        return *(g.to(t.dtype) for g, t in zip(grads, (q, k, v))), None, None


def flash_attention_applies(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `flash_attention` takes this call: bf16 / fp16 self-attention on the CPU that autograd
    will differentiate (anything else goes to `F.scaled_dot_product_attention` as it is)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and torch.is_grad_enabled()
        and q.requires_grad
        and not torch.compiler.is_compiling()
        and q.shape[-2] == k.shape[-2]
        and (k.shape[1] == q.shape[1] or _kernel_takes_grouped_heads())
        and (mask is None or mask.dtype == torch.bool)
    )


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale q k^T, masked) v: q [B, H, L, D], k/v [B, Hkv, L, D] (H a multiple of Hkv), mask
    None (causal) or boolean broadcastable to [B, 1, L, L] (True = may attend)."""
    return _FlashAttention.apply(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)
