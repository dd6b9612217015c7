"""Op name -> where the time goes: the groups of every step-overhead table (the runners' --profile
and op_timing.py). Ops are matched by their base name ("aten::add_.Tensor" -> "add", trailing
underscore dropped), so "aten::expand" is not an exp and "aten::rsqrt" not the optimizer's sqrt."""

from __future__ import annotations

MATMUL, ATTENTION = "matmul (linear layers, output head)", "attention (SDPA)"
LOGPROBS, OPTIMIZER = "softmax / logsumexp / log-probs", "optimizer (AdamW)"
CASTS, ELEMENTWISE = "dtype casts (autocast)", "elementwise (norms, RoPE, SwiGLU, residual)"

MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation"}
ATTENTION_MARKS = ("scaled_dot_product", "flash_attention", "efficient_attention", "flex_attention")
LOGPROB_OPS = {
    "logsumexp",
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
    "_softmax_backward_data",
    "_log_softmax_backward_data",
    "exp",
    "log",
    "expm1",
    "special_expm1",
    "gather",
    "amax",
    "maximum",
    "scatter",
    "scatter_add",
}
OPTIMIZER_OPS = {"lerp", "addcdiv", "addcmul", "sqrt"}
CAST_OPS = {"to", "_to_copy", "copy"}
ELEMENTWISE_OPS = {
    "mul",
    "add",
    "sub",
    "div",
    "neg",
    "silu",
    "silu_backward",
    "gelu",
    "gelu_backward",
    "sigmoid",
    "tanh",
    "rsqrt",
    "pow",
    "mean",
    "cat",
    "where",
    "index",
    "index_select",
    "index_add",
    "index_put",
    "masked_fill",
    "tril",
    "eq",
    "ne",
}


def op_group(name: str) -> str:
    """The group of an op named as the profiler ("aten::mm") or the dispatcher ("aten::mm.default")
    names it; "other" when no group claims it."""
    base = name.split("::")[-1].split(".")[0].lower()
    plain = base.rstrip("_") or base
    if plain in MATMUL_OPS:
        return MATMUL
    if any(mark in base for mark in ATTENTION_MARKS):
        return ATTENTION
    if plain in LOGPROB_OPS:
        return LOGPROBS
    if "adam" in name.lower() or base.startswith("_foreach") or plain in OPTIMIZER_OPS:  # + "Optimizer.step#AdamW.step"
        return OPTIMIZER
    if plain in CAST_OPS:
        return CASTS
    if plain in ELEMENTWISE_OPS or "rms_norm" in base:
        return ELEMENTWISE
    return "other"
