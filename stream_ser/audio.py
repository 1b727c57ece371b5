"""Reading audio files and checking sample blocks: 16 kHz mono float32 out, one error type in.

Files are read with ``soundfile`` (WAV, FLAC, and what libsndfile reads), any
integer or float format; multi-channel audio is mixed to mono; other sample
rates are resampled with ``torchaudio.functional.resample``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

TARGET_RATE_HZ = 16_000
MAX_ABS_SAMPLE = 1_000.0  # float audio is in [-1, 1]; a little over is clipping, this far over is not audio


class AudioError(ValueError):
    """A file or block of samples that cannot be used; the message names the file and the cause."""

    def __init__(self, source: str | Path, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def check_samples(x: np.ndarray, source: str = "samples") -> np.ndarray:
    """Return ``x`` as a float32 mono 1-D array, or raise :class:`AudioError` for NaN/inf or bad shapes."""
    x = np.asarray(x)
    if x.dtype.kind in "iu":  # scale integers to [-1, 1] before mixing channels (a mean would lose the dtype)
        info = np.iinfo(x.dtype)
        x = x.astype(np.float32) / float(max(abs(info.min), info.max))
    elif x.dtype.kind != "f":
        raise AudioError(source, f"samples must be numbers, got dtype {x.dtype}")
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.ndim != 1:
        raise AudioError(source, f"expected mono samples [N] or [N, channels], got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    if x.size == 0 or -MAX_ABS_SAMPLE <= x.min() and x.max() <= MAX_ABS_SAMPLE:  # NaN fails both tests
        return x  # the usual block: two reductions, no temporary array (a live engine checks every block)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise AudioError(source, f"{bad} of {x.size} samples are NaN or infinite")
    peak = float(np.abs(x).max())  # e.g. a float file scaled by 1e30: its power overflows to inf, then NaN
    raise AudioError(source, f"samples reach {peak:.3g}; float audio must lie in [-1, 1] "
                             f"(more than {MAX_ABS_SAMPLE:g} is not audio: wrongly scaled?)")


def resample(x: np.ndarray | torch.Tensor, orig_hz: int, new_hz: int = TARGET_RATE_HZ) -> torch.Tensor:
    """Band-limited resampling of a whole signal [N] -> [N * new/orig] (soxr, very high quality).

    soxr handles any ratio in linear time; a polyphase filter with the exact rational
    ratio (torchaudio's) took 1.7 s for 1 s of 24 414 Hz audio.
    """
    t = torch.as_tensor(x, dtype=torch.float32)
    if orig_hz == new_hz:
        return t
    import soxr
    return torch.from_numpy(soxr.resample(t.numpy(), int(orig_hz), int(new_hz), quality="VHQ").astype(np.float32))


def load_audio(path: str | Path, sample_rate: int = TARGET_RATE_HZ) -> torch.Tensor:
    """Read an audio file as float32 mono [N] at ``sample_rate``.

    Raises :class:`AudioError` (naming the file) for a missing, empty, truncated
    or non-audio file, and for NaN or infinite samples.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "file not found")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(path, f"not a readable audio file ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(path, "no samples (zero-length audio)")
    x = check_samples(data, str(path))
    return resample(x, int(rate), sample_rate)
