"""bf16 weights for compute, fp32 master weights for the optimizer (single device).

Pure bf16 training loses small updates: bf16 keeps 8 significant bits, so a weight w only moves
when its update exceeds about |w| * 2^-9. With AdamW the update is about the learning rate: at
lr 1e-5 and |w| ~ 0.02 that is 5e-4 relative, under the rounding threshold of 2e-3, and most
weights never change. Autocast avoids the loss by keeping fp32 weights, but re-casts every
weight to bf16 on every forward (policy and reference) plus the activations between ops.

`MasterWeights` keeps the model itself in bf16 (forward, backward and gradients in bf16, no casts)
and an fp32 copy of every trainable parameter for the optimizer. After each update the fp32 values
are rounded into the model once. Memory per trainable parameter: bf16 weight 2 + bf16 gradient 2
+ fp32 master 4 + fp32 gradient 4 (one buffer kept across steps) + AdamW moments 8 = 20 bytes, where
fp32 weights under autocast take 16.

    master = MasterWeights(model.parameters())
    optimizer = torch.optim.AdamW(master.parameters(), lr=1e-5)
    ...
    loss.backward()
    master.gradients_to_master()        # bf16 .grad -> fp32 .grad of the master copies
    clip_and_step(master.parameters(), optimizer, scheduler, ...)   # or optimizer.step()
    master.master_to_model()            # round the updated fp32 weights into the bf16 model

Under FSDP2 use its `MixedPrecisionPolicy(param_dtype=bf16)` instead: the sharded fp32 parameters
are the master weights there.
"""

from __future__ import annotations

from typing import Iterable

import torch


class MasterWeights:
    """fp32 copies of a model's trainable (low-precision) parameters."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.model_params = [p for p in params if p.requires_grad]
        self.master = [p.detach().to(torch.float32).clone().requires_grad_(True) for p in self.model_params]
        # fp32 gradient buffers kept across steps: a fresh one per step costs page faults on the CPU
        # (and an allocation on CUDA); the optimizer's zero_grad(set_to_none) only drops the alias.
        self._grads = [torch.empty_like(m) for m in self.master]

    def parameters(self) -> list[torch.Tensor]:
        """The fp32 tensors to hand to the optimizer."""
        return self.master

    @torch.no_grad()
    def gradients_to_master(self) -> None:
        """Move the model's gradients onto the master copies (as fp32) and free the model's."""
        for param, master, buffer in zip(self.model_params, self.master, self._grads):
            master.grad = None if param.grad is None else buffer.copy_(param.grad)
            param.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Round the master weights into the model's parameters (in place, model dtype)."""
        for param, master in zip(self.model_params, self.master):
            param.copy_(master)

    def state_dict(self) -> dict:
        """The master weights, for exact resume (the model's bf16 weights alone lose bits)."""
        return {"master": [m.detach().clone() for m in self.master]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = state["master"]
        if len(saved) != len(self.master):
            raise ValueError(f"master-weight state has {len(saved)} tensors, the model {len(self.master)}")
        for master, value in zip(self.master, saved):
            if master.shape != value.shape:
                raise ValueError(f"master-weight shape {tuple(value.shape)} != parameter {tuple(master.shape)}")
            master.copy_(value)
        self.master_to_model()
