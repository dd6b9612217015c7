"""prepare_blocks' memory knobs: activation checkpointing and offloading change where activations
live, never the numbers (log-probs and gradients against the plain model)."""

import copy

import pytest
import torch

from dpokit.data import collate_preference_pairs
from dpokit.models import llama, prepare_blocks
from dpokit.models.blocks import ActivationOffload
from dpokit.training import policy_logps

PAIRS = [
    {"prompt_ids": [1, 2, 3, 4, 5], "chosen_ids": [6, 7, 8], "rejected_ids": [9, 10]},
    {"prompt_ids": [11, 12], "chosen_ids": [13, 14, 15, 16], "rejected_ids": [17, 18, 19]},
]


def logps_and_grads(model, device):
    model.zero_grad(set_to_none=True)
    out = policy_logps(model, collate_preference_pairs(PAIRS, pad_id=0).to(device))
    (out.chosen - 2 * out.rejected).sum().backward()
    return torch.cat([out.chosen, out.rejected]).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_knobs_keep_the_numbers(device):
    torch.manual_seed(0)
    plain = llama(vocab_size=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)
    plain = plain.to(device)
    want_logps, want_grads = logps_and_grads(plain, device)
    for knobs in (
        dict(activation_offloading=True),
        dict(activation_checkpointing=True, activation_offloading=True),
    ):
        model = copy.deepcopy(plain)
        prepare_blocks(model, **knobs)
        logps, grads = logps_and_grads(model, device)
        torch.testing.assert_close(logps, want_logps, rtol=1e-6, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-6, msg=f"{knobs}: {name}")


def test_offloading_inside_compiled_blocks_is_refused():
    model = llama(vocab_size=32, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=16)
    with pytest.raises(ValueError, match="activation offloading inside compiled blocks is not supported"):
        prepare_blocks(model, activation_offloading=True, compile_blocks=True)


def test_offloading_leaves_cpu_tensors_and_the_numbers_alone():
    offload = ActivationOffload(min_bytes=0)
    t = torch.randn(4, 4)
    assert offload.pack(t) is t and offload.unpack(t) is t
    check_knobs_keep_the_numbers("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="activation offloading moves CUDA tensors only")
def test_offloaded_cuda_activations_come_back_exactly():
    offload = ActivationOffload(min_bytes=0)
    t = torch.randn(256, 256, device="cuda")
    packed = offload.pack(t)
    device, host, _ = packed
    assert host.device.type == "cpu" and host.is_pinned()
    assert torch.equal(offload.unpack(packed), t)
    weight = torch.nn.Parameter(torch.randn(256, 256, device="cuda"))
    offload.keep = {weight.untyped_storage().data_ptr()}
    view = weight.t()  # what F.linear saves: a view, not a Parameter
    assert offload.pack(view) is view  # saved weights stay where they are
    expanded = torch.randn(256, 1, device="cuda").expand(256, 256)
    assert offload.pack(expanded) is expanded  # not materialised on the host
    check_knobs_keep_the_numbers("cuda")
