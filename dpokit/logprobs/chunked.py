"""Per-token log-probs straight from hidden states, never holding more than one chunk of logits.

    logp_i = z_i[y_i] - logsumexp(z_i),   z_i = W h_i  (h_i: [D] hidden state, W: [V, D] output head)

The plain path materialises z for every token ([N, V] floats: 2 GB for 4,096 tokens at V = 128,256
in fp32) and autograd keeps it, plus softmax-sized temporaries, for the backward. Here the tokens
are processed `chunk_size` rows at a time; only the per-token logsumexp is kept, and the backward
recomputes each chunk's logits to form dlogp/dz = g * (onehot(y) - softmax(z)) and accumulates

    grad_h = (dlogp/dz) W,      grad_W = sum over chunks of (dlogp/dz)^T h.

When W needs no gradient (a frozen head: LoRA recipes, the reference pass), the forward already
stores the per-token unit gradient W^T (onehot(y) - softmax(z)) [N, D] (the size of the hidden
states), so the backward is a scale and needs no recomputation.

With logit soft-capping (Gemma 2), z_i = c tanh(W h_i / c); the chain rule multiplies dlogp/dz by
dz/d(W h) = 1 - tanh^2(W h / c) = 1 - (z / c)^2 before it meets W.

Entry point for padded and packed batches alike: flatten to hidden [N, D] and labels [N]
(`ignore_index` where a position is not scored); the result is [N] fp32 with 0 at ignored positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.logprobs.from_logits import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 1024


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Softmax statistics in at least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None):
    """(z [c, V] in at least fp32, dz/d(W h) [c, V] or None when there is no soft-capping)."""
    logits = _upcast(F.linear(h, weight))
    if softcap is None:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    slope = tanh.square().neg_().add_(1.0)
    return tanh.mul_(softcap), slope


def _chunk_softmax_stats(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None = None):
    """One chunk: (label logits [c], logsumexp [c], exp(z - max) [c, V], row sums [c, 1], slope);
    the [c, V] buffer is reused in place so a chunk costs one logits-sized allocation (two when
    soft-capped: the slope dz/d(W h))."""
    logits, slope = _chunk_logits(h, weight, softcap)
    picked = logits.gather(1, labels[:, None]).squeeze(1)
    row_max = logits.amax(-1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    sums = exp.sum(-1, keepdim=True)
    return picked, (sums.log() + row_max).squeeze(1), exp, sums, slope


def _one_hot_minus(probs: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """In place: probs -> scale * (onehot(labels) - probs)."""
    if scale is None:
        probs.neg_()
        probs[torch.arange(probs.shape[0], device=probs.device), labels] += 1.0
    else:
        probs.mul_(-scale[:, None])
        probs[torch.arange(probs.shape[0], device=probs.device), labels] += scale
    return probs


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, softcap):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(n, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        unit_grad = None
        if need_hidden and not need_weight:
            unit_grad = torch.empty(n, hidden.shape[1], dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            picked, chunk_lse, exp, sums, slope = _chunk_softmax_stats(hidden[rows], weight, labels[rows], softcap)
            out[rows], lse[rows] = picked - chunk_lse, chunk_lse
            if unit_grad is not None:
                dz = _one_hot_minus(exp.div_(sums), labels[rows])
                if slope is not None:
                    dz.mul_(slope)
                unit_grad[rows] = dz.to(weight.dtype) @ weight
            del exp, slope
        if unit_grad is not None:
            ctx.save_for_backward(unit_grad)
        else:
            ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size, ctx.unit, ctx.hidden_dtype = chunk_size, unit_grad is not None, hidden.dtype
        ctx.softcap = softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.unit:
            (unit_grad,) = ctx.saved_tensors
            return (unit_grad * grad_out.to(unit_grad.dtype)[:, None]).to(ctx.hidden_dtype), None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_out = grad_out.to(lse.dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]
            logits, slope = _chunk_logits(h, weight, ctx.softcap)
            dz = _one_hot_minus(logits.sub_(lse[rows, None]).exp_(), labels[rows], grad_out[rows])
            if slope is not None:
                dz.mul_(slope)
            dz = dz.to(weight.dtype)
            if need_hidden:
                grad_hidden[rows] = dz @ weight
            if need_weight:
                if grad_weight.dtype == dz.dtype:
                    grad_weight.addmm_(dz.t(), h)
                else:  # low-precision weights: accumulate the chunks in fp32
                    grad_weight += (dz.t() @ h).float()
            del logits, slope, dz
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[label] per token, one chunk of logits at a time.

    softcap: logits -> softcap * tanh(logits / softcap) before the softmax (Gemma 2's
    final_logit_softcapping), in the forward and the backward.

    hidden [N, D] (any float dtype; the logits are upcast to fp32 per chunk), weight [V, D] (the
    output head, or the tied embedding), labels [N] with `ignore_index` for unscored positions.
    Returns [N] fp32 (fp64 for fp64 inputs), 0 at ignored positions, differentiable w.r.t. hidden and weight. Ignored
    positions are dropped before any logits are computed, so prompts and padding cost nothing.
    Peak extra memory is about two [chunk_size, V] fp32 buffers (three with `softcap`: the slope
    dz/d(W h) is kept), independent of N.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden [N, D], weight [V, D], labels [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[1]} does not match the weight's {weight.shape[1]}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    mask = labels != ignore_index
    scored = mask.all().item()
    rows = None if scored else mask.nonzero().squeeze(1)
    h, y = (hidden, labels) if scored else (hidden.index_select(0, rows), labels.index_select(0, rows))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        values = _ChunkedTokenLogps.apply(h, weight, y, chunk_size, softcap)
    else:  # the reference pass: forward only, nothing saved
        values = torch.empty(h.shape[0], dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        for s in range(0, h.shape[0], chunk_size):
            picked, lse, _, _, _ = _chunk_softmax_stats(h[s : s + chunk_size], weight, y[s : s + chunk_size], softcap)
            values[s : s + chunk_size] = picked - lse
    if scored:
        return values
    return torch.zeros(labels.shape[0], dtype=values.dtype, device=values.device).index_put((rows,), values)
