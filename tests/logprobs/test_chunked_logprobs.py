"""chunked_token_logps against the materialised log_softmax + gather path, its memory behaviour,
and policy_logps (the recipes' default path) against the materialised model forward."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dpokit.data import PaddedBatch
from dpokit.logprobs import chunked_token_logps, length_desensitized_logps
from dpokit.models import disable_adapter, llama, lora_llama
from dpokit.training import policy_logps

N, D, V = 45, 24, 97


def plain(hidden, weight, labels, softcap=None):
    """log_softmax(hidden @ weight.T) gathered at the labels; 0 where ignored."""
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, -1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    return torch.where(mask, picked, 0.0)


def make(dtype=torch.float32, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, D, generator=g) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / 3).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    return hidden, weight, labels


def twins(hidden, weight):
    return hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_(weight.requires_grad)


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 1000])
@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("softcap", [None, 1.5], ids=["plain", "softcapped"])
@pytest.mark.parametrize("vocab_tile", [V, 10, 32], ids=["one-tile", "tiles-of-10", "uneven-tiles"])
def test_values_and_both_gradients_match_materialised_path(chunk_size, weight_grad, softcap, vocab_tile):
    hidden, weight, labels = make(weight_grad=weight_grad)
    h2, w2 = twins(hidden, weight)
    got = chunked_token_logps(hidden, weight, labels, chunk_size=chunk_size, softcap=softcap, vocab_tile=vocab_tile)
    want = plain(h2, w2, labels, softcap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(N)  # a non-uniform downstream gradient, like DPO's per-sequence weights
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-5, atol=1e-5)
    if weight_grad:
        torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-5, atol=1e-5)
    assert torch.all(got[labels == -100] == 0)


@pytest.mark.parametrize("softcap", [None, 0.7], ids=["plain", "softcapped"])
@pytest.mark.parametrize("vocab_tile", [None, 4])
def test_gradcheck_float64(softcap, vocab_tile):
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, -100, 0, 10, 3, -100, 7])
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_token_logps(h, w, labels, chunk_size=2, softcap=softcap, vocab_tile=vocab_tile),
        (hidden, weight),
    )
    frozen = weight.detach()  # the unit-gradient path (a frozen head)
    assert torch.autograd.gradcheck(
        lambda h: chunked_token_logps(h, frozen, labels, chunk_size=2, softcap=softcap, vocab_tile=vocab_tile),
        (hidden,),
    )


@pytest.mark.parametrize("softcap", [None, 1.5], ids=["plain", "softcapped"])
def test_no_grad_reference_pass_matches_and_builds_no_graph(softcap):
    hidden, weight, labels = make()
    with torch.no_grad():
        got = chunked_token_logps(hidden, weight, labels, chunk_size=7, softcap=softcap, vocab_tile=20)
    assert not got.requires_grad
    torch.testing.assert_close(got, plain(hidden, weight, labels, softcap).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [8, 1000])  # several chunks (fp32 accumulation), one (bf16 directly)
@pytest.mark.parametrize("vocab_tile", [V, 30])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_bfloat16_inputs_match_materialised_bf16_logits(chunk_size, vocab_tile, weight_grad):
    hidden, weight, labels = make(torch.bfloat16, weight_grad=weight_grad)
    h2, w2 = twins(hidden, weight)
    got = chunked_token_logps(hidden, weight, labels, chunk_size=chunk_size, vocab_tile=vocab_tile)
    want = plain(h2, w2, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 softmax
    got.sum().backward()
    want.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), h2.grad.float(), rtol=2e-2, atol=2e-2)
    if weight_grad:
        assert weight.grad.dtype == torch.bfloat16
        torch.testing.assert_close(weight.grad.float(), w2.grad.float(), rtol=2e-2, atol=2e-2)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("weight_grad", [True, False])
def test_never_more_than_one_chunk_of_logits(weight_grad):
    """No op in the forward or the backward produces a tensor larger than one chunk of logits
    (or the weight-sized gradient), and nothing logits-sized is saved for the backward."""
    hidden, weight, labels = make(weight_grad=weight_grad)
    labels[:] = 3  # every row scored
    chunk = 5
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with LargestTensor() as mode:
            out = chunked_token_logps(hidden, weight, labels, chunk_size=chunk)
            (out * torch.randn(N)).sum().backward()
    assert mode.largest <= max(chunk * V, V * D, N * D)
    assert max(saved) <= max(V * D, N * D)
    with LargestTensor() as materialised:
        plain(*twins(hidden, weight), labels).sum().backward()
    assert materialised.largest >= N * V  # the check can see a full logits tensor


def test_shape_errors_are_clear():
    hidden, weight, labels = make()
    with pytest.raises(ValueError, match="hidden size 24 does not match the weight's 23"):
        chunked_token_logps(hidden, weight[:, :23], labels)
    with pytest.raises(ValueError, match=r"labels \[N\]"):
        chunked_token_logps(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="vocab_tile must be positive, got 0"):
        chunked_token_logps(hidden, weight, labels, vocab_tile=0)


TINY = dict(
    vocab_size=61, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32, rope_theta=10_000.0
)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 61, (6, 14), generator=g)
    labels = torch.randint(0, 61, (6, 14), generator=g)
    labels[:, :4] = -100
    labels[1, 9:] = -100
    labels[4, 11:] = -100
    return PaddedBatch(input_ids=input_ids, labels=labels, num_pairs=3, num_tokens=input_ids.numel())


def compare_paths(model, params, **kwargs):
    b = batch()
    grads = []
    for materialize in (False, True):
        for p in params:
            p.grad = None
        out = policy_logps(model, b, materialize_logits=materialize, chunk_size=5, **kwargs)
        upstream = torch.tensor([0.3, -1.2, 0.7])
        ((out.chosen * upstream).sum() + (out.rejected * upstream.flip(0)).sum()).backward()
        grads.append((out, [p.grad.clone() for p in params]))
    (lean, lean_grads), (full, full_grads) = grads
    torch.testing.assert_close(lean.chosen, full.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean.rejected, full.rejected, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(lean_grads, full_grads):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def _perturb_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)


def test_policy_logps_lora_with_adapter_on_output_head():
    model = lora_llama(lora_targets=["q_proj", "v_proj", "lm_head"], lora_rank=4, lora_alpha=8.0, **TINY)
    _perturb_adapters(model)  # B = 0 at init would hide a missing adapter term
    params = [p for p in model.parameters() if p.requires_grad]
    assert any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    compare_paths(model, params)
    with torch.no_grad(), disable_adapter(model):  # the reference pass: adapters off, no grad
        lean = policy_logps(model, batch(), chunk_size=5)
        full = policy_logps(model, batch(), materialize_logits=True)
    torch.testing.assert_close(lean.chosen, full.chosen, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        on = policy_logps(model, batch(), chunk_size=5)
    assert not torch.allclose(on.chosen, lean.chosen)  # the head adapter does contribute


@pytest.mark.parametrize("logit_softcap", [None, 0.5], ids=["plain", "softcapped"])
def test_policy_logps_full_finetune_tied_and_untied(logit_softcap):
    for tie in (True, False):
        model = llama(tie_embeddings=tie, logit_softcap=logit_softcap, **TINY)
        compare_paths(model, list(model.parameters()))


def test_policy_logps_average_and_ld_alpha_match_materialised():
    model = lora_llama(lora_targets=["q_proj"], lora_rank=4, lora_alpha=8.0, **TINY)
    compare_paths(model, [p for p in model.parameters() if p.requires_grad], average_logps=True)
    compare_paths(model, [p for p in model.parameters() if p.requires_grad], ld_alpha=0.5)


def test_length_desensitized_logps_matches_loop():
    b = batch()
    per_token = torch.randn(6, 14)
    per_token[b.labels == -100] = 0
    got = length_desensitized_logps(per_token, b.labels, 3, ld_alpha=0.25)
    mask = b.labels != -100
    counts = mask.sum(-1).tolist()
    want = []
    for row in range(6):
        shared = min(counts[row % 3], counts[row % 3 + 3])
        seen, total = 0, 0.0
        for t in range(14):
            if mask[row, t]:
                seen += 1
                total += per_token[row, t].item() * (1.0 if seen <= shared else 0.25)
        want.append(total)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(length_desensitized_logps(per_token, b.labels, 3, ld_alpha=1.0), per_token.sum(-1))


@pytest.mark.parametrize("weight_grad", [True, False])
def test_no_scored_token_gives_zero_gradients(weight_grad):
    hidden, weight, labels = make(weight_grad=weight_grad)
    labels[:] = -100
    out = chunked_token_logps(hidden, weight, labels, vocab_tile=30)
    (out * 2).sum().backward()
    assert torch.all(out == 0) and torch.all(hidden.grad == 0)
    if weight_grad:
        assert torch.all(weight.grad == 0)


def test_a_label_outside_the_vocabulary_is_refused():
    hidden, weight, labels = make()
    labels[1] = V
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\) or -100; got [0-9]+..{V}$"):
        chunked_token_logps(hidden, weight, labels)


@pytest.mark.parametrize("vocab_tile", [V, 30])
def test_frozen_bf16_head_keeps_a_confident_tokens_small_gradient_precise(vocab_tile):
    """The unit gradient (1 - p_y) W[y] - sum_{v != y} p_v W_v of a token with p_y near 1 is small;
    it must not come out of a difference of two large bf16-rounded terms: per token, the chunked
    path's error (against float64 of the same bf16 inputs) stays within that of the materialised
    bf16 logits path (the bf16 rounding of the logits themselves bounds both)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(V, D, generator=g).bfloat16()
    labels = torch.randint(0, V, (N,), generator=g)
    scale = torch.linspace(0.02, 0.5, N)[:, None]  # hidden states along their label's row: p_y 0.1 .. 0.999+
    hidden = (weight[labels].float() * scale + 0.05 * torch.randn(N, D, generator=g)).bfloat16().requires_grad_()
    h2 = hidden.detach().clone().requires_grad_()
    h64 = hidden.detach().double().requires_grad_()
    chunked_token_logps(hidden, weight, labels, vocab_tile=vocab_tile).sum().backward()
    plain(h2, weight, labels).sum().backward()
    torch.log_softmax(h64 @ weight.double().t(), -1).gather(1, labels[:, None]).sum().backward()
    p_label = torch.softmax(h64.detach() @ weight.double().t(), -1).gather(1, labels[:, None]).squeeze(1)
    assert p_label.max() > 0.999 and p_label.min() < 0.5  # confident and unsure tokens

    def error(grad):
        return (grad.double() - h64.grad).norm(dim=1) / h64.grad.norm(dim=1)

    chunked, materialised = error(hidden.grad), error(h2.grad)
    worst = (chunked - 2 * materialised).argmax()
    assert torch.all(chunked <= 2 * materialised + 2e-3), (
        f"token {worst} (p_y {p_label[worst]:.5f}): error {chunked[worst]:.3g} vs materialised {materialised[worst]:.3g}"
    )


def test_autocast_backward_recomputes_the_forwards_logits():
    """Under autocast the forward's logits are bf16; the backward (where autocast is off) must
    recompute those same logits, or its softmax does not sum to 1 against the forward's logsumexp.
    Reference: float64 from the forward's bf16 logits, the gradient through the fp32 weights."""
    hidden, weight, labels = make()
    labels[:] = labels.clamp(min=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_token_logps(hidden, weight, labels, vocab_tile=30)
    upstream = torch.randn(N, dtype=torch.float64)
    (got * upstream.float()).sum().backward()
    z = (hidden.detach().bfloat16() @ weight.detach().bfloat16().t()).double()
    dz = upstream[:, None] * (F.one_hot(labels, V).double() - torch.softmax(z, -1))
    torch.testing.assert_close(got.double(), torch.log_softmax(z, -1).gather(1, labels[:, None]).squeeze(1))
    torch.testing.assert_close(hidden.grad.double(), dz @ weight.detach().double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weight.grad.double(), dz.t() @ hidden.detach().double(), rtol=1e-4, atol=1e-4)
