"""Per-token log-probs straight from hidden states, never holding more than one tile of logits.

    logp_i = z_i[y_i] - logsumexp(z_i),   z_i = W h_i  (h_i: [D] hidden state, W: [V, D] output head)

The plain path materialises z for every token ([N, V] floats: 2 GB for 4,096 tokens at V = 128,256
in fp32) and autograd keeps it, plus softmax-sized temporaries, for the backward. Here the tokens
are processed `chunk_size` rows at a time and, within a chunk, the vocabulary `vocab_tile` columns
at a time; only the per-token logsumexp is kept. The logsumexp is accumulated online over the
tiles (running max m and sum s: s <- s exp(m - m') + sum exp(z_tile - m'), m' = max(m, max z_tile)),
and the backward recomputes each tile's logits to form dlogp/dz = g * (onehot(y) - softmax(z)) and
accumulates

    grad_h = sum over tiles of (dlogp/dz) W_tile,      grad_W[tile] = sum over chunks of (dlogp/dz)^T h.

When W needs no gradient (a frozen head: LoRA recipes, the reference pass), the forward already
stores the per-token unit gradient W^T (onehot(y) - softmax(z)) = (1 - p_y) W[y] - sum_{v != y} p_v W_v
[N, D] (the size of the hidden states; the sum is accumulated online like s, and 1 - p_y =
-expm1(z_y - lse) is exact even for a confident token), so the backward is a scale and needs no
recomputation.

With logit soft-capping (Gemma 2), z_i = c tanh(W h_i / c); the chain rule multiplies dlogp/dz by
dz/d(W h) = 1 - tanh^2(W h / c) = 1 - (z / c)^2 before it meets W.

Tiles: on CUDA one tile is the whole vocabulary (one matmul per chunk, as before tiles existed).
Elsewhere (the CPU) tiles of `CPU_VOCAB_TILE` columns keep each temporary a few MB, reused while still in
cache: a [chunk, V] fp32 buffer allocated per chunk is fresh memory every time (page faults, and on
machines that reclaim idle memory, again every step), which cost more than the softmax itself.

Entry point for padded and packed batches alike: flatten to hidden [N, D] and labels [N]
(`ignore_index` where a position is not scored); the result is [N] fp32 with 0 at ignored positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.logprobs.from_logits import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 1024
CPU_VOCAB_TILE = 4096


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Softmax statistics in at least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _tiles(weight: torch.Tensor, tile: int | None) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, weight rows) per tile of the vocabulary; None: one tile on CUDA, CPU_VOCAB_TILE
    columns elsewhere. One tile is `weight` itself, not a view (autocast caches its cast of a
    weight, not of views of it)."""
    vocab = weight.shape[0]
    if tile is None:
        tile = vocab if weight.device.type == "cuda" else CPU_VOCAB_TILE
    if tile >= vocab:
        return [(0, vocab, weight)]
    return [(start, min(start + tile, vocab), weight[start : start + tile]) for start in range(0, vocab, tile)]


def _tile_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None):
    """(z [c, n] in at least fp32, dz/d(W h) [c, n] or None when there is no soft-capping)."""
    logits = _upcast(F.linear(h, weight))
    if softcap is None:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    slope = tanh.square().neg_().add_(1.0)
    return tanh.mul_(softcap), slope


def _in_tile(labels: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label column within the tile, clamped into it [c]; whether the label falls in the tile [c])."""
    return (labels - start).clamp_(0, end - start - 1), (labels >= start) & (labels < end)


def _pick(values: torch.Tensor, column: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """values[i, column[i]] where inside[i], else 0 ([c])."""
    return torch.where(inside, values.gather(1, column[:, None]).squeeze(1), 0.0)


def _chunk_forward(h, weight, labels, softcap, tile, unit: bool):
    """One chunk of tokens: (label logits [c], logsumexp [c], unit gradient [c, D] or None), the
    logsumexp (and the unit gradient's softmax-weighted sum of rows of W) accumulated online.

    The unit gradient is slope_y (1 - p_y) W[y] - sum over v != y of p_v slope_v W_v: the label's
    own term is left out of the (low-precision) matmul and 1 - p_y = -expm1(z_y - lse) is exact in
    fp32, so a confident token (p_y near 1) keeps its small gradient's relative precision."""
    picked = label_slope = running_max = sums = weighted = None
    for start, end, w in _tiles(weight, tile):
        z, slope = _tile_logits(h, w, softcap)
        column, inside = _in_tile(labels, start, end)
        picked = _pick(z, column, inside) + (0.0 if picked is None else picked)
        if unit and slope is not None:
            label_slope = _pick(slope, column, inside) + (0.0 if label_slope is None else label_slope)
        tile_max = z.amax(-1)
        new_max = tile_max if running_max is None else torch.maximum(running_max, tile_max)
        exp = z.sub_(new_max[:, None]).exp_()  # exp(z - running max), in place
        rescale = None if running_max is None else torch.exp(running_max - new_max)
        sums = exp.sum(-1) if rescale is None else sums.mul_(rescale).add_(exp.sum(-1))
        if unit:
            if slope is not None:
                exp.mul_(slope)
            exp.scatter_(1, column[:, None], _pick(exp, column, ~inside)[:, None])  # the label's own term: 0
            term = (exp.to(weight.dtype) @ w).to(z.dtype)
            weighted = term if rescale is None else weighted.mul_(rescale[:, None]).add_(term)
        running_max = new_max
        del z, slope, exp
    lse = sums.log() + running_max
    if not unit:
        return picked, lse, None
    label_scale = torch.special.expm1(picked - lse).neg_()  # 1 - p_y
    if label_slope is not None:
        label_scale.mul_(label_slope)
    label_rows = weight[labels].to(weighted.dtype).mul_(label_scale[:, None])
    return picked, lse, label_rows.sub_(weighted.div_(sums[:, None]))


def _forward_chunks(hidden, weight, labels, chunk_size, softcap, tile, unit: bool):
    """(log-probs [N], logsumexp [N], unit gradient [N, D] or None), chunk by chunk."""
    n = hidden.shape[0]
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.empty(n, dtype=dtype, device=hidden.device)
    lse = torch.empty(n, dtype=dtype, device=hidden.device)
    unit_grad = torch.empty(n, hidden.shape[1], dtype=dtype, device=hidden.device) if unit else None
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        picked, chunk_lse, chunk_unit = _chunk_forward(hidden[rows], weight, labels[rows], softcap, tile, unit)
        out[rows], lse[rows] = picked - chunk_lse, chunk_lse
        if unit:
            unit_grad[rows] = chunk_unit
    return out, lse, unit_grad


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, softcap, tile):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        unit = need_hidden and not need_weight
        out, lse, unit_grad = _forward_chunks(hidden, weight, labels, chunk_size, softcap, tile, unit)
        if unit:
            ctx.save_for_backward(unit_grad)
        else:
            ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size, ctx.unit, ctx.hidden_dtype = chunk_size, unit, hidden.dtype
        ctx.softcap, ctx.tile = softcap, tile
        # The backward recomputes the logits as the forward made them (autocast is off there).
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.unit:
            (unit_grad,) = ctx.saved_tensors
            grad_hidden = (unit_grad * grad_out.to(unit_grad.dtype)[:, None]).to(ctx.hidden_dtype)
            return grad_hidden, None, None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_out = grad_out.to(lse.dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        starts = range(0, hidden.shape[0], ctx.chunk_size)
        tiles = _tiles(weight, ctx.tile)
        device, autocast_dtype, autocast_on = ctx.autocast
        # The weight gradient: each tile's rows written by the first chunk, added to by the others;
        # low-precision weights over several chunks sum in fp32 (bf16 sums of chunks lose bits).
        grad_weight = None
        if need_weight:
            low_sum = len(starts) > 1 and weight.dtype != lse.dtype
            grad_dtype = lse.dtype if low_sum else weight.dtype
            grad_weight = torch.empty(weight.shape, dtype=grad_dtype, device=weight.device)
            if not starts:  # no scored token: no gradient
                grad_weight.zero_()
        for index, start in enumerate(starts):
            rows = slice(start, start + ctx.chunk_size)
            h, g = hidden[rows], grad_out[rows]
            chunk_grad = None  # grad_h of the chunk, summed over tiles (in at least fp32 when several)
            for v0, v1, w in tiles:
                with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):
                    z, slope = _tile_logits(h, w, ctx.softcap)
                column, inside = _in_tile(labels[rows], v0, v1)
                dz = z.sub_(lse[rows, None]).exp_().mul_(-g[:, None])  # -g softmax(z)
                dz.scatter_add_(1, column[:, None], torch.where(inside, g, 0.0)[:, None])  # + g onehot(y)
                if slope is not None:
                    dz.mul_(slope)
                dz = dz.to(weight.dtype)
                if need_hidden and len(tiles) == 1:
                    chunk_grad = dz @ w
                elif need_hidden:
                    term = (dz @ w).to(lse.dtype)
                    chunk_grad = term if chunk_grad is None else chunk_grad.add_(term)
                if need_weight:
                    rows_of_w = grad_weight[v0:v1]
                    if index == 0 and rows_of_w.dtype == dz.dtype:
                        torch.mm(dz.t(), h, out=rows_of_w)
                    elif index == 0:
                        rows_of_w.copy_(dz.t() @ h)
                    elif rows_of_w.dtype == dz.dtype:
                        rows_of_w.addmm_(dz.t(), h)
                    else:
                        rows_of_w.add_(dz.t() @ h)  # fp32 += bf16 in place
                del z, slope, dz
            if need_hidden:
                grad_hidden[rows] = chunk_grad
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    vocab_tile: int | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[label] per token, one chunk of logits at a time.

    softcap: logits -> softcap * tanh(logits / softcap) before the softmax (Gemma 2's
    final_logit_softcapping), in the forward and the backward.
    vocab_tile: vocabulary columns per tile of logits; None: the whole vocabulary on CUDA,
    `CPU_VOCAB_TILE` elsewhere (see the module doc).

    hidden [N, D] (any float dtype; the logits are upcast to fp32 per tile), weight [V, D] (the
    output head, or the tied embedding), labels [N] with `ignore_index` for unscored positions.
    Returns [N] fp32 (fp64 for fp64 inputs), 0 at ignored positions, differentiable w.r.t. hidden and weight. Ignored
    positions are dropped before any logits are computed, so prompts and padding cost nothing.
    Peak extra memory is about two [chunk_size, vocab_tile] fp32 buffers (three with `softcap`:
    the slope dz/d(W h) is kept), independent of N.
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
    if vocab_tile is not None and vocab_tile <= 0:
        raise ValueError(f"vocab_tile must be positive, got {vocab_tile}")
    rows = (labels != ignore_index).nonzero().squeeze(1)  # the one host sync: how many are scored
    scored = rows.numel() == labels.numel()
    h, y = (hidden, labels) if scored else (hidden.index_select(0, rows), labels.index_select(0, rows))
    in_range = ((y >= 0) & (y < weight.shape[0])).all()
    if y.device.type == "cuda":
        torch._assert_async(in_range, "chunked_token_logps: a label outside [0, vocabulary size)")
    elif not in_range:
        raise ValueError(
            f"labels must be in [0, {weight.shape[0]}) or {ignore_index}; got {int(y.min())}..{int(y.max())}"
        )
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        values = _ChunkedTokenLogps.apply(h, weight, y, chunk_size, softcap, vocab_tile)
    else:  # the reference pass: forward only, nothing saved
        values, _, _ = _forward_chunks(h, weight, y, chunk_size, softcap, vocab_tile, unit=False)
    if scored:
        return values
    return torch.zeros(labels.shape[0], dtype=values.dtype, device=values.device).index_put((rows,), values)
