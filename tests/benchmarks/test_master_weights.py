"""MasterWeights: bf16 model + fp32 optimizer copies equals AdamW on fp32 weights fed the same
gradients, and keeps the small updates that pure bf16 AdamW rounds away."""

import sys
from pathlib import Path

import torch

from dpokit.models import llama

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from master_weights import MasterWeights  # noqa: E402


def tiny_bf16_model(seed=0):
    torch.manual_seed(seed)
    model = llama(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    return model.to(torch.bfloat16)


def loss_of(model, tokens):
    return model(tokens).float().logsumexp(-1).mean()


def test_updates_equal_fp32_adamw_given_the_same_gradients():
    model = tiny_bf16_model()
    master = MasterWeights(model.parameters())
    optimizer = torch.optim.AdamW(master.parameters(), lr=1e-3)
    reference = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    reference_opt = torch.optim.AdamW(reference, lr=1e-3)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss_of(model, tokens).backward()
        for ref, param in zip(reference, model.parameters()):
            ref.grad = param.grad.float()
        master.gradients_to_master()
        assert all(p.grad is None for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        master.master_to_model()
        reference_opt.step()
        reference_opt.zero_grad(set_to_none=True)
    for ref, fp32, param in zip(reference, master.parameters(), model.parameters()):
        assert torch.equal(fp32, ref)
        assert param.dtype == torch.bfloat16 and torch.equal(param, ref.to(torch.bfloat16))


def test_keeps_the_small_updates_pure_bf16_adamw_loses():
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    pure = tiny_bf16_model()
    mixed = tiny_bf16_model()
    start = [p.detach().clone() for p in pure.parameters()]
    master = MasterWeights(mixed.parameters())
    pure_opt = torch.optim.AdamW(pure.parameters(), lr=1e-5, weight_decay=0.0)
    mixed_opt = torch.optim.AdamW(master.parameters(), lr=1e-5, weight_decay=0.0)
    for _ in range(20):
        loss_of(pure, tokens).backward()
        pure_opt.step()
        pure_opt.zero_grad(set_to_none=True)
        loss_of(mixed, tokens).backward()
        master.gradients_to_master()
        mixed_opt.step()
        mixed_opt.zero_grad(set_to_none=True)
        master.master_to_model()

    def moved_fraction(params):
        changed = sum(int((p.detach() != s).sum()) for p, s in zip(params, start) if s.dim() == 2)
        return changed / sum(s.numel() for s in start if s.dim() == 2)

    # 20 steps of ~1e-5 on N(0, 0.02) weights: ~20 x 1e-5 = 2e-4 accumulated, over bf16's half-ulp
    # for most weights once summed in fp32, never when each 1e-5 step is rounded on its own.
    assert moved_fraction(pure.parameters()) < 0.05
    assert moved_fraction(mixed.parameters()) > 0.3
    assert moved_fraction([m.to(torch.bfloat16) for m in master.parameters()]) > 0.3


def test_state_dict_round_trip_restores_master_and_model():
    model = tiny_bf16_model()
    master = MasterWeights(model.parameters())
    with torch.no_grad():
        for m in master.parameters():
            m.add_(1e-4)  # below bf16 resolution for most entries: only the fp32 copy holds it
    saved = master.state_dict()
    other = tiny_bf16_model(seed=5)
    restored = MasterWeights(other.parameters())
    restored.load_state_dict(saved)
    for a, b in zip(restored.parameters(), master.parameters()):
        assert torch.equal(a, b)
    for p, m in zip(other.parameters(), master.parameters()):
        assert torch.equal(p, m.to(torch.bfloat16))
