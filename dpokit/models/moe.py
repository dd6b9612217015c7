"""Sparse mixture-of-experts MLP (Qwen3-MoE) and its router load-balancing statistics.

A sparse layer replaces the gated MLP by `n_experts` SwiGLU experts and a router `gate`
(Linear(dim, n_experts), no bias). Per token:

    p = softmax(gate(x)) in fp32;  (w, e) = top_k(p);  w /= sum(w) if norm_topk_prob
    y = sum_j w_j * expert_{e_j}(x)

Each expert runs once per forward on the tokens routed to it (gathered, then scattered back), so
the work is top_k expert MLPs per token, never all of them. Every expert runs even on zero tokens:
its parameters then get a zero gradient rather than none, so FSDP2 reduce-scatters the same
gradients on every rank.

Module names follow Hugging Face (`mlp.gate`, `mlp.experts.{e}.gate_proj/up_proj/down_proj`), so
the published per-expert checkpoint keys load by the usual prefix rename.

Load balancing (Switch Transformer eq. 4-6, as transformers' `load_balancing_loss_func`): over
all sparse layers and all counted tokens together,

    f_e = (top-k assignments to e) / N,   P_e = (sum of p_e) / N,   aux = n_experts * sum_e f_e P_e

with N = counted tokens x sparse layers. `route_statistics` collects f and P during one forward,
with a weight per token (0 for padding, 2 for a prompt stored once for two sequences).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MoE:
    """The decoder's `moe` switch (field names after Qwen3MoeConfig's in brackets).

    n_experts [num_experts], top_k [num_experts_per_tok], expert_hidden_dim [moe_intermediate_size],
    norm_topk_prob: renormalise the top-k probabilities to sum to 1.
    Layer i is sparse when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0;
    the others keep the dense MLP of the decoder's hidden_dim [intermediate_size].
    router_aux_loss_coef: weight of the load-balancing loss added to the training loss.
    """

    n_experts: int
    top_k: int
    expert_hidden_dim: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001

    def __post_init__(self):
        if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"need 1 <= top_k ({self.top_k}) <= n_experts ({self.n_experts})")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        object.__setattr__(self, "mlp_only_layers", tuple(sorted(set(self.mlp_only_layers))))

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` (0-based) has the expert MLP."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


class RouterStatistics:
    """Weighted sums of one forward's routing, over every sparse layer (see the module docstring).

    The assignment counts are summed as the layers run; each layer's probabilities [N, n_experts]
    are kept and weighted in `loss`, outside the blocks: an autograd op inside a block would save
    tensors that an activation-checkpointing recomputation (which collects nothing) does not."""

    def __init__(self, token_weights: torch.Tensor, n_experts: int, top_k: int):
        self.weights = token_weights.reshape(-1).float()
        self.n_experts, self.top_k = n_experts, top_k
        self.assignments = torch.zeros(n_experts, device=self.weights.device)
        self.probs: list[torch.Tensor] = []

    @property
    def layers(self) -> int:
        return len(self.probs)

    def add(self, probs: torch.Tensor, experts: torch.Tensor) -> None:
        """probs [N, n_experts] (fp32, differentiable), experts [N, top_k] chosen by one layer."""
        if self.weights.numel() != probs.shape[0]:
            raise ValueError(f"{self.weights.numel()} token weights for {probs.shape[0]} routed tokens")
        with torch.no_grad():
            weights = self.weights.to(probs.device)
            counts = torch.zeros(self.n_experts, device=probs.device)
            counts.index_add_(0, experts.reshape(-1), weights.repeat_interleave(self.top_k))
            self.assignments = self.assignments.to(probs.device) + counts
        self.probs.append(probs)

    def loss(self) -> torch.Tensor:
        """n_experts * sum_e f_e P_e (differentiable through P)."""
        if not self.probs:
            raise ValueError("no sparse layer was run inside `route_statistics`")
        weights = self.weights.to(self.probs[0].device)
        probabilities = sum(weights @ p for p in self.probs)
        rows = (weights.sum() * len(self.probs)).clamp(min=1)  # a batch with no counted token gives 0, not NaN
        return self.n_experts * (self.assignments / rows * probabilities / rows).sum()


class SparseMoE(nn.Module):
    """Router + experts of one sparse layer. The experts are gated MLPs built by `expert` (the
    decoder passes its `GatedMLP`); the router is a plain Linear whatever the linear factory."""

    def __init__(self, dim: int, moe: MoE, expert: Callable[[], nn.Module]):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk_prob = moe.n_experts, moe.top_k, moe.norm_topk_prob
        self.gate = nn.Linear(dim, moe.n_experts, bias=False)
        self.experts = nn.ModuleList(expert() for _ in range(moe.n_experts))
        self.statistics: RouterStatistics | None = None  # set by `route_statistics`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(flat), dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        if self.statistics is not None:
            self.statistics.add(probs, experts)
        # Assignments sorted by expert: one contiguous run of (token, slot) per expert.
        order = experts.reshape(-1).argsort(stable=True)
        counts = torch.bincount(experts.reshape(-1), minlength=self.n_experts).tolist()
        out = torch.zeros_like(flat)
        for expert, assigned in zip(self.experts, order.split(counts)):
            tokens = assigned // self.top_k
            y = expert(flat[tokens]) * weights.reshape(-1)[assigned, None]
            out = out.index_add(0, tokens, y)
        return out.reshape(x.shape)


def sparse_layers(model: nn.Module) -> list[SparseMoE]:
    """The model's sparse MoE MLPs, in layer order."""
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


@contextlib.contextmanager
def route_statistics(model: nn.Module, token_weights: torch.Tensor) -> Iterator[RouterStatistics | None]:
    """Collect the load-balancing statistics of the forwards run inside the block, each token of
    the forward's input (flattened [B * T]) weighted by `token_weights` (0 = not counted).

    Yields None for a model without sparse layers. Only the forward inside counts: a recomputation
    in the backward (activation checkpointing) happens after the block and adds nothing.
    """
    layers = sparse_layers(model)
    if not layers:
        yield None
        return
    stats = RouterStatistics(token_weights, layers[0].n_experts, layers[0].top_k)
    for layer in layers:
        layer.statistics = stats
    try:
        yield stats
    finally:
        for layer in layers:
            layer.statistics = None


def active_parameter_fractions(model: nn.Module) -> dict[int, float]:
    """id(parameter) -> the fraction of tokens that multiply with it, for expert parameters
    (top_k / n_experts on average); parameters not listed are used by every token."""
    fractions = {}
    for layer in sparse_layers(model):
        for p in layer.experts.parameters():
            fractions[id(p)] = layer.top_k / layer.n_experts
    return fractions
