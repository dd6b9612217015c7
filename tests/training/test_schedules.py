import math

import torch

from dpokit.training import warmup_cosine_schedule


def test_warmup_then_cosine_to_min_ratio():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_schedule(opt, total_steps=20, warmup_steps=4, min_lr_ratio=0.1)
    lrs = []
    for _ in range(21):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == [1 / 5, 2 / 5, 3 / 5, 4 / 5]
    assert lrs[4] == 1.0
    assert math.isclose(lrs[12], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert math.isclose(lrs[20], 0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def lrs_of_run(total_steps: int, warmup_steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_schedule(opt, total_steps=total_steps, warmup_steps=warmup_steps)
    lrs = []
    for _ in range(total_steps):  # the LR each of the run's steps uses
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_warmup_warning_names_both_numbers_and_the_peak_the_run_reaches():
    from dpokit.training import warmup_warning

    assert warmup_warning(warmup_steps=29, total_steps=30) is None
    assert max(lrs_of_run(30, 29)) == 1.0
    message = warmup_warning(warmup_steps=50, total_steps=30)
    assert "warmup_steps=50" in message and "30 steps" in message
    peak = max(lrs_of_run(30, 50))
    assert peak < 1.0 and f"{peak:.0%}" in message
    assert warmup_warning(warmup_steps=30, total_steps=30) is not None
