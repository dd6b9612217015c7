"""retain_freed_cpu_memory: a large block freed and allocated again comes back without page faults
(with glibc's defaults every round faults the whole block in anew)."""

import resource
import sys

import pytest
import torch

from dpokit.training import retain_freed_cpu_memory


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_block_is_reused_without_page_faults():
    if not retain_freed_cpu_memory():
        pytest.skip("not glibc: mallopt is not there")
    assert retain_freed_cpu_memory() is True  # a second call is a no-op
    pages = (64 << 20) // resource.getpagesize()  # a 64 MiB block: above glibc's default mmap threshold
    faults = []
    for _ in range(6):
        before = minor_faults()
        block = torch.ones(64 << 20, dtype=torch.uint8)  # touched: resident
        faults.append(minor_faults() - before)
        assert int(block[-1]) == 1
        del block
    # glibc settles where the block lives within the first rounds; from then on it is reused
    assert min(faults[2:]) < pages // 10, f"faults per round {faults}: the block is given back every time"
