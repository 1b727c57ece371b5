"""OpenMP's wait policy and the intra-op thread count of the live recognizer (imports nothing heavy).

By default libgomp's worker threads spin for a while after each parallel region. On a machine where
other work holds the cores, the worker a small op waits for has often lost its core, so each of a
hop's many small parallel ops (the head's LSTM steps, the speaker statistics) costs a scheduler slice
of 4-8 ms instead of microseconds. On this 2-core machine, with all of a hop on two threads, one
stream's per-hop p99 was 298 ms (another PyTorch job running) and 142 ms (two busy processes) with the
default policy, 24 and 29 ms with ``PASSIVE``, where the workers sleep; with the hop on one thread
(below), 13-17 ms either way (``python -m bench.under_load``; docs/benchmarks.md). libgomp reads the
policy once, when torch loads, so it must be in the environment before the first ``import torch``.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

OMP_WAIT_POLICY = "PASSIVE"
# One live hop is many small tensor operations (log-Mel frames, deltas, statistics, the head's LSTM steps)
# and one CNN call. On one thread the small ones take microseconds; spread over two, each waits for a
# worker, which on a busy machine may have lost its core. Measured on this 2-core machine with the bundled
# model (64 px), one stream: idle, per-hop p50 / p99 3.8 / 8.7 ms on two threads, 4.0 / 6.1 on one; with
# another PyTorch job running, 8.9 / 298 ms on two, 4.3 / 13.0 on one. So a hop runs on one thread, and
# only CNN batches worth the second core (and engine hops of many streams, for throughput) use them all.
PARALLEL_MIN_PIXELS = 227 * 227  # segments x image pixels of a CNN batch worth all threads (one 227 px segment)
PARALLEL_MIN_STREAMS = 8  # an engine hop feeding this many streams runs on all threads throughout


def prefer_passive_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already chose a policy. -> whether the
    policy in force is PASSIVE: False when torch had loaded before (too late) or the user chose another."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    return "torch" not in sys.modules and os.environ["OMP_WAIT_POLICY"].upper() == OMP_WAIT_POLICY


_state = threading.local()  # per thread: OpenMP's thread count is a per-thread setting


def available_threads() -> int:
    """The intra-op threads this thread had before the outermost :func:`intra_op_threads` block."""
    import torch
    outer = getattr(_state, "outer", None)
    return outer[0] if outer else torch.get_num_threads()


@contextmanager
def intra_op_threads(n: int):
    """Run torch on ``n`` intra-op threads inside the block (restored after; nests)."""
    import torch
    before = torch.get_num_threads()
    outer = _state.__dict__.setdefault("outer", [])
    outer.append(before)
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        outer.pop()
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def embedding_threads(n_segments: int, image_size: int, int8_convolutions: bool = False) -> int:
    """Threads for one CNN batch of ``n_segments`` at ``image_size`` px: all of them once the batch is
    worth it (:data:`PARALLEL_MIN_PIXELS`), else those in force (one, inside a live hop). A single segment
    through int8 convolutions runs on one: their kernels split one image badly (measured at 227 px:
    3.4 ms on one thread, 9-13 ms on two; from two segments on, two threads win)."""
    import torch
    if int8_convolutions and n_segments < 2:
        return 1  # (also inside an engine hop of many streams, which runs on all threads)
    if n_segments * image_size * image_size >= PARALLEL_MIN_PIXELS:
        return available_threads()
    return torch.get_num_threads()


def hop_threads(n_streams: int) -> int:
    """Threads for an engine hop feeding ``n_streams`` streams (see :data:`PARALLEL_MIN_STREAMS`)."""
    return available_threads() if n_streams >= PARALLEL_MIN_STREAMS else 1
