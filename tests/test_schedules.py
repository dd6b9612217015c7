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
