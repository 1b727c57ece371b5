"""Speed perturbation by resampling (paper section 3.2): 0.8, 0.9, 1.0, 1.1, 1.2.

Playing a signal ``f`` times faster is resampling it from ``f * 16 kHz`` to 16 kHz:
the duration becomes ``N / f`` and the pitch moves with the speed, like a tape.
Applied to training speakers only (the fold builder enforces it).
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torchaudio.functional as AF

PAPER_SPEEDS = (0.8, 0.9, 1.0, 1.1, 1.2)
SPEED_SETS = {1: (1.0,), 3: (0.9, 1.0, 1.1), 5: PAPER_SPEEDS}  # Table 2's x1 / x3 / x5


def speed_perturb(wave: torch.Tensor, factor: float) -> torch.Tensor:
    """[..., N] -> [..., ~N / factor]; ``factor`` > 1 is faster (shorter)."""
    if factor <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    if factor == 1.0:
        return wave
    ratio = Fraction(factor).limit_denominator(100)  # 1.1 -> 11/10: a small polyphase filter
    return AF.resample(wave, orig_freq=ratio.numerator, new_freq=ratio.denominator)
