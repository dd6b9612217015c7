"""Which tokens of a preference batch count in the MoE router's load-balancing loss, and with
what weight (`dpokit.models.moe.route_statistics`).

The loss describes the routing of the batch's sequences, not of a memory layout, so every layout
of the same pairs gives the same value:

* padded rows: the real tokens of each row (prompt + response), never the right padding;
* packed rows: every token of a document, never the pack's padding;
* prefix-shared rows: the shared prompt tokens count twice, once for each of the two sequences
  they stand for, as in the padded rows where the prompt is routed once per sequence (the last
  prompt token is stored in both branches already).
"""

from __future__ import annotations

import torch
from torch import nn

from dpokit.data.batch import PackedBatch, PreferenceBatch
from dpokit.logprobs import IGNORE_INDEX


def routed_token_weights(batch: PreferenceBatch) -> torch.Tensor:
    """float [rows, T]: how many sequences of the batch each position stands for (0 = padding)."""
    if isinstance(batch, PackedBatch):
        weights = (batch.document_ids >= 0).float()
        if batch.prefix_sharing:
            weights = weights * (1 + (batch.branch_ids == 0).float())
        return weights
    # Right-padded rows (`collate_preference_pairs`): a row's last real token follows its last label.
    labels = batch.labels
    width = labels.shape[-1]
    columns = torch.arange(width, device=labels.device)
    last_label = torch.where(labels != IGNORE_INDEX, columns, -1).amax(-1, keepdim=True)
    return (columns <= last_label + 1).float()


def router_aux_loss_coef(model: nn.Module) -> float | None:
    """The load-balancing loss weight of an MoE decoder (its `moe.router_aux_loss_coef`, from
    config.json), None for a model without experts."""
    moe = getattr(model, "args", {}).get("moe")
    return None if moe is None else moe.router_aux_loss_coef
