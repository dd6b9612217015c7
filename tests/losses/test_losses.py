import math

import pytest
import torch

from dpokit.losses import dpo_loss


def reference_dpo(pc, pr, rc, rr, beta, eps):
    """The DPO formula on python floats, written independently of the implementation."""
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = beta * ((a - c) - (b - d))
        log_sig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
        out.append((-(1 - eps) * log_sig(h) - eps * log_sig(-h), beta * (a - c), beta * (b - d)))
    return out


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_loss_matches_float64_formula(beta, label_smoothing):
    inputs = [torch.randn(32, dtype=torch.float64) * 20 - 50 for _ in range(4)]
    out = dpo_loss(*inputs, beta=beta, label_smoothing=label_smoothing)
    expected = reference_dpo(*[t.tolist() for t in inputs], beta, label_smoothing)
    torch.testing.assert_close(
        out.losses, torch.tensor([e[0] for e in expected], dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([e[1] for e in expected], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([e[2] for e in expected], dtype=torch.float64))


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps = torch.randn(8)
    out = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    torch.testing.assert_close(out.losses, torch.full((8,), math.log(2.0)))
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_dpo_loss_extreme_gaps_stay_finite():
    pc, pr, ref = torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0]), torch.zeros(2)
    out = dpo_loss(pc, pr, ref, ref, beta=1.0, label_smoothing=0.1)
    assert torch.isfinite(out.losses).all()
    assert out.losses[0] < out.losses[1]


def test_dpo_loss_gradcheck():
    inputs = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, beta=0.3, label_smoothing=0.2).losses, inputs)


def test_dpo_rewards_are_detached():
    inputs = [torch.randn(3, requires_grad=True) for _ in range(4)]
    out = dpo_loss(*inputs, beta=0.1)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad


def test_label_smoothing_out_of_range_is_an_error():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
