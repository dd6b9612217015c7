"""CPU training without page faults: glibc keeps large freed blocks for reuse.

A training step on the CPU allocates the same large temporaries every step (logits chunks, the
output head's gradient and its fp32 copy, activations). glibc's malloc serves every block above
`M_MMAP_THRESHOLD` (at most 32 MiB by default) with a fresh `mmap` and returns it with `munmap` on
free, so each step touches those pages anew: one page fault per 4 KiB, paid inside casts and
matmuls (docs/benchmarks.md "Step overheads": 674,000 minor faults in 4 timed steps of the
full-parameter benchmark step, 57,000 with this setting). On CUDA the caching allocator does this
already.

`retain_freed_cpu_memory()` raises the mmap threshold and the trim threshold so that freed blocks
stay in the process's heap and the next step reuses them: the resident size stays at the step's
peak instead of dropping between steps (the peak itself, what `max RSS` reports, moves by a few
percent either way). It changes nothing off glibc (macOS, musl) and is a no-op when called again.
The recipes call it when the step runs on the CPU (the device, or FSDP2's CPU offload).
"""

from __future__ import annotations

import ctypes
import functools

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap (a whole step's largest temporaries); glibc releases
# before 2.26 take at most 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX), the fallback.
MMAP_THRESHOLD_BYTES = 1 << 30
MMAP_THRESHOLD_FALLBACK_BYTES = 32 << 20
# Free memory at the heap's top is given back to the system only above this much (an int).
TRIM_THRESHOLD_BYTES = 2**31 - 1


@functools.cache
def retain_freed_cpu_memory() -> bool:
    """Tell glibc's malloc to keep large freed blocks for reuse. True when it took effect."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    mmap_ok = mmap_ok or mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK_BYTES) == 1
    trim_ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return mmap_ok and trim_ok
