"""OpenMP's wait policy for the live recognizer (imports nothing heavy; call before torch loads).

By default libgomp's worker threads spin for a while after each parallel region. On a machine where
other work holds the cores, the worker a small op waits for has often lost its core, so each of a
hop's many small parallel ops (the head's LSTM steps, the speaker statistics) costs a scheduler slice
of 4-8 ms instead of microseconds. On this 2-core machine, with another PyTorch job running, one
stream's per-hop p99 was 110-490 ms with the default policy and about 20 ms with ``PASSIVE``, where the
workers sleep (``python -m bench.under_load``; figures in docs/benchmarks.md). libgomp reads the policy
once, when torch loads, so it must be in the environment before the first ``import torch``.
"""

from __future__ import annotations

import os
import sys

OMP_WAIT_POLICY = "PASSIVE"


def prefer_passive_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already chose a policy. -> whether the
    policy in force is PASSIVE: False when torch had loaded before (too late) or the user chose another."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    return "torch" not in sys.modules and os.environ["OMP_WAIT_POLICY"].upper() == OMP_WAIT_POLICY
