"""Keep large freed blocks in the process: glibc malloc's two thresholds (imports nothing heavy).

PyTorch takes every CPU tensor from malloc and frees it when its last reference goes. glibc serves a
block above its mmap threshold (128 KiB at first, raised as such blocks are freed, but never past
32 MiB) with a fresh ``mmap`` that it unmaps when freed, and it gives the heap's free top back to the
kernel once it exceeds the trim threshold. Either way the next block of that size comes from the
kernel again, a page fault per 4 KiB page it touches. A live engine hop makes the same large
temporaries every 320 ms (256 streams: 8192 frames of 512 samples, a 16 MiB FFT buffer, the spectrum,
the power) and a training step larger ones (activations, gradients), so they paid those faults every
time. Measured on this 2-core machine (2026-11-27): the log-Mel of 8192 frames on one thread 32 -> 11 ms;
an engine hop of 512 bundled-model streams fed as fast as possible, median 290-316 -> 215-240 ms (``python
-m bench.profile_engine --checkpoint bundled --streams 512 --hops 20 --timing``, with and without
``--default-malloc``); one stage-1 training step (32 images of 227 px) 659 -> 482 ms.

:func:`keep_freed_memory` raises both thresholds to 1 GiB (in one run, 256 MiB bought half the hop's
gain, 64 MiB none), so freed blocks stay in the heap for the next hop or step. The cost: the process
keeps the memory of its peak instead of returning it between peaks; at 512 streams its peak (max RSS)
went from 2.5 to 3.4 GiB. The console scripts (``stream-ser``, ``ser-offline``) and the benchmarks call
it first; a program using the Python API may.

It also makes every thread allocate from the one main heap (``M_ARENA_MAX`` = 1). glibc gives other
threads arenas of their own, made of heaps of at most 64 MiB, and a block larger than that is mmapped and
unmapped every time whatever the thresholds say: the live recognizer runs in a thread of its own, and so
do an engine's shards. Measured (2026-11-27, 2-core AMD EPYC, int8, 227 px, 224 streams fed as fast as
possible, one run each): two shards stepping in threads, median 596 ms a hop with per-thread arenas, 296
ms with the main heap for all (their CNN images, 69 MB a shard, had been faulted in anew every hop).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30  # blocks up to this size come from (and go back to) the heap


def user_chose_arenas() -> bool:
    """The environment already sets glibc's number of malloc arenas."""
    return "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", "")


def user_chose() -> bool:
    """The environment already sets glibc's malloc thresholds (``MALLOC_*_THRESHOLD_``, ``GLIBC_TUNABLES``)."""
    return ("MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory(max_block_bytes: int = KEEP_BYTES) -> bool:
    """Serve blocks up to ``max_block_bytes`` from the heap and keep up to that much free at its top
    (glibc's ``mallopt``), for the whole process and all its threads (one arena, unless the environment
    sets ``MALLOC_ARENA_MAX``), from now on. -> whether it is set: False off Linux,
    with another C library (musl's ``mallopt`` does nothing), or when the environment chose the
    thresholds itself (then that choice stands)."""
    if not sys.platform.startswith("linux") or user_chose():
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        if not hasattr(libc, "gnu_get_libc_version"):
            return False  # not glibc
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not user_chose_arenas():  # every thread on the main heap, where the thresholds keep large blocks
        mallopt(M_ARENA_MAX, 1)
    return mallopt(M_MMAP_THRESHOLD, max_block_bytes) == 1 and mallopt(M_TRIM_THRESHOLD, max_block_bytes) == 1
