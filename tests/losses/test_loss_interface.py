"""How recipes call losses: token counts and ground-truth rewards from the batch, reference-free
losses never touching the reference, and the metrics of a combined (preference + SFT) loss."""

import pytest
import torch

from dpokit.data import PaddedBatch
from dpokit.losses import get_loss
from dpokit.models import lora_llama
from dpokit.training import PairMetrics, PolicyLogps, evaluate_preference, policy_logps, preference_loss

TINY = dict(
    vocab_size=61, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32, rope_theta=10_000.0
)


def batch():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 61, (4, 10), generator=g)
    labels[:, :3] = -100
    labels[0, 6:] = -100  # chosen of pair 0: 3 tokens
    labels[3, 8:] = -100  # rejected of pair 1: 5 tokens
    return PaddedBatch(input_ids=torch.randint(0, 61, (4, 10), generator=g), labels=labels, num_pairs=2, num_tokens=40)


def test_preference_loss_supplies_token_counts_and_ground_truth_rewards():
    b = batch()
    policy = PolicyLogps(torch.tensor([-3.0, -8.0]), torch.tensor([-9.0, -4.0]))
    ref = PolicyLogps(torch.tensor([-4.0, -7.0]), torch.tensor([-8.0, -6.0]))
    out = preference_loss(get_loss("sigmoid_norm", beta=1.0), policy, ref, b)
    lengths_c, lengths_r = torch.tensor([3.0, 7.0]), torch.tensor([7.0, 5.0])
    want = -torch.nn.functional.logsigmoid(
        (policy.chosen - ref.chosen) / lengths_c - (policy.rejected - ref.rejected) / lengths_r
    )
    torch.testing.assert_close(out.losses, want)
    # averaged log-probs: the loss must not divide again
    averaged = preference_loss(get_loss("sigmoid_norm", beta=1.0), policy, ref, b, average_logps=True)
    torch.testing.assert_close(
        averaged.losses, -torch.nn.functional.logsigmoid(policy.chosen - ref.chosen - policy.rejected + ref.rejected)
    )
    # RPO reads per-pair ground-truth rewards from the batch when present
    b.chosen_reward, b.rejected_reward = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    rpo = preference_loss(get_loss("rpo_sq", beta=0.5), policy, ref, b)
    h = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)
    torch.testing.assert_close(rpo.losses, (0.5 * h - torch.tensor([1.0, -1.0])) ** 2)


def test_reference_free_loss_needs_no_reference():
    out = preference_loss(
        get_loss("simpo", beta=2.0, gamma=0.5),
        PolicyLogps(torch.tensor([-3.0, -8.0]), torch.tensor([-9.0, -4.0])),
        None,
        batch(),
    )
    assert torch.isfinite(out.losses).all()
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(get_loss("dpo", beta=0.1), PolicyLogps(torch.zeros(2), torch.zeros(2)), None, batch())


class ExplodingReference:
    def logps(self, batch):
        raise AssertionError("the reference forward ran for a reference-free loss")


def test_evaluation_skips_the_reference_forward_for_reference_free_losses():
    model = lora_llama(lora_targets=["q_proj"], lora_rank=4, lora_alpha=8.0, **TINY)
    metrics = evaluate_preference(model, ExplodingReference(), [batch()], get_loss("orpo", beta=0.1), device="cpu")
    policy = policy_logps(model, batch())
    with torch.no_grad():
        want = get_loss("orpo", beta=0.1)(
            policy.chosen, policy.rejected, chosen_lengths=torch.tensor([3, 7]), rejected_lengths=torch.tensor([7, 5])
        ).losses.mean()
    assert metrics["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_metrics_report_total_preference_and_sft_parts():
    b = batch()
    policy = PolicyLogps(torch.tensor([-3.0, -8.0]), torch.tensor([-9.0, -4.0]))
    ref = PolicyLogps(torch.tensor([-4.0, -7.0]), torch.tensor([-8.0, -6.0]))
    out = preference_loss(get_loss("combined", preference_loss="dpo", beta=0.1, sft_loss_weight=0.5), policy, ref, b)
    metrics = PairMetrics()
    metrics.add(out, policy.chosen, policy.rejected)
    means = metrics.means()
    dpo = get_loss("dpo", beta=0.1)(*policy, *ref).losses.mean().item()
    assert means["preference_loss"] == pytest.approx(dpo)
    assert means["sft_loss"] == pytest.approx(5.5)
    assert means["loss"] == pytest.approx(dpo + 0.5 * 5.5)
