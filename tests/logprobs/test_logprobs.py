import pytest
import torch

from dpokit.logprobs import sequence_logps, token_logps


def direct(logits, labels):
    """log_softmax + gather over labelled positions only, in float64."""
    logp = torch.log_softmax(logits.double(), -1)
    sums, counts = [], []
    for row in range(labels.shape[0]):
        total, n = 0.0, 0
        for t in range(labels.shape[1]):
            if labels[row, t] != -100:
                total += logp[row, t, labels[row, t]].item()
                n += 1
        sums.append(total)
        counts.append(n)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


def make(n=4, t=9, v=17):
    logits = torch.randn(n, t, v) * 3
    labels = torch.randint(0, v, (n, t))
    labels[:, :3] = -100  # a prompt
    labels[1, 7:] = -100  # padding
    return logits, labels


def test_sequence_logps_sum_matches_direct_computation():
    logits, labels = make()
    got, counts = sequence_logps(logits, labels)
    want, want_counts = direct(logits, labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == want_counts.tolist()


def test_sequence_logps_average_divides_by_response_tokens():
    logits, labels = make()
    got, _ = sequence_logps(logits, labels, average_logps=True)
    want, counts = direct(logits, labels)
    torch.testing.assert_close(got.double(), want / counts, rtol=1e-5, atol=1e-5)


def test_token_logps_is_zero_on_ignored_positions():
    logits, labels = make()
    per_token = token_logps(logits, labels)
    assert torch.all(per_token[labels == -100] == 0)
    assert torch.all(per_token[labels != -100] < 0)


def test_sequence_without_response_tokens_is_an_error():
    logits, labels = make()
    labels[2] = -100
    with pytest.raises(ValueError, match=r"sequence\(s\) \[2\]"):
        sequence_logps(logits, labels)


def test_gradient_matches_log_softmax_path():
    logits, labels = make()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    sequence_logps(a, labels)[0].sum().backward()
    mask = labels != -100
    torch.log_softmax(b, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
