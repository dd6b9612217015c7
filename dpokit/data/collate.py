"""Collation of preference pairs into one padded batch: chosen rows first, then rejected rows,
so the policy (and the reference) runs a single forward per step.

`labels[i, t]` is the token that position t predicts (input_ids[i, t + 1]) when that token is part
of the response, else IGNORE_INDEX: logits and labels line up with no further shifting.
"""

from __future__ import annotations

import torch

from dpokit.data.batch import PaddedBatch, pair_rewards
from dpokit.logprobs import IGNORE_INDEX


def collate_preference_pairs(items: list[dict], *, pad_id: int, pad_to_multiple_of: int = 1) -> PaddedBatch:
    """items -> a `PaddedBatch`: input_ids and labels [2B, T], with chosen_reward / rejected_reward [B]
    when every item carries rewards.

    Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected. Padding is on the right, so plain
    causal attention never lets a real token see a pad.
    """
    sequences, labels = [], []
    for response_key in ("chosen_ids", "rejected_ids"):
        for item in items:
            prompt, response = item["prompt_ids"], item[response_key]
            sequences.append(prompt + response)
            # Position t predicts token t+1; only response tokens are trained on.
            labels.append([IGNORE_INDEX] * (len(prompt) - 1) + response + [IGNORE_INDEX])
    longest = max(len(s) for s in sequences)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    label_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (seq, lab) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        label_ids[row, : len(lab)] = torch.tensor(lab)
    # Rewards from the data (NeMo-Aligner format), for the losses that use them (RPO).
    chosen_reward, rejected_reward = pair_rewards(items)
    return PaddedBatch(
        input_ids=input_ids,
        labels=label_ids,
        num_pairs=len(items),
        num_tokens=sum(len(s) for s in sequences),
        chosen_reward=chosen_reward,
        rejected_reward=rejected_reward,
    )
