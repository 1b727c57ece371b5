"""Speech detection: silero-vad, streaming, one speech probability per 32 ms chunk.

silero-vad's model ships inside its PyPI wheel (``silero_vad/data/silero_vad.jit``),
so nothing is downloaded. The file is loaded directly: importing the
``silero_vad`` package would set torch to one thread for the whole process.
The model is a small recurrent network with its own state, so every stream has
its own :class:`SpeechDetector`; its calls run on one thread (on 2 threads the
tiny ops cost 80 ms a chunk here instead of 0.3 ms).

A window counts as speech when at least :data:`MIN_SPEECH_FRACTION` of its
chunks have a speech probability above :data:`SPEECH_PROB`; otherwise it gets no
emotion (``label`` None, ``speech`` False) wherever predictions go.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16_000
CHUNK_SAMPLES = 512  # 32 ms: the chunk silero-vad takes at 16 kHz
SPEECH_PROB = 0.5  # a chunk is speech above this probability (silero's default)
MIN_SPEECH_FRACTION = 0.15  # a 3 s window needs about 0.45 s of speech to get an emotion
HISTORY_CHUNKS = 400  # 12.8 s of chunk probabilities kept per stream (a window needs 2.9 s)


class VadError(RuntimeError):
    """silero-vad is missing or its model cannot be loaded."""


_JIT_PATH: Path | None = None


def model_path() -> Path:
    """The silero-vad TorchScript file inside the installed wheel (found without importing the package)."""
    global _JIT_PATH
    if _JIT_PATH is None:
        spec = importlib.util.find_spec("silero_vad")
        if spec is None or not spec.submodule_search_locations:
            raise VadError("speech detection needs the silero-vad package (pip install silero-vad); "
                           "or turn it off (--no-vad, vad=False)")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.jit"
        if not path.is_file():
            raise VadError(f"silero-vad is installed but its model is missing: {path}")
        _JIT_PATH = path
    return _JIT_PATH


@contextmanager
def one_thread():
    """Run torch on one intra-op thread inside the block (restored after)."""
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


class SpeechDetector:
    """``push(samples)`` (16 kHz float32 mono, any length), ``speech_fraction(start, end)``, ``reset()``.

    Chunk ``i`` covers samples ``[512 i, 512 i + 512)`` of the stream; a trailing
    partial chunk waits for the next push.
    """

    def __init__(self):
        path = model_path()  # VadError when silero-vad is not installed
        try:
            with warnings.catch_warnings():  # torch 2.11 marks torch.jit.load deprecated; it is silero's format
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:  # a damaged install
            raise VadError(f"cannot load the silero-vad model ({type(e).__name__}: {str(e)[:200]})") from None
        self.reset()

    def reset(self) -> None:
        self.model.reset_states()
        self._pending = np.zeros(0, np.float32)
        self._probs: deque[float] = deque(maxlen=HISTORY_CHUNKS)
        self.n_chunks = 0  # chunks scored since the start of the stream
        self.n_speech = 0  # ... of which speech (probability above SPEECH_PROB)

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Score every chunk the new samples complete; returns their speech probabilities."""
        x = np.concatenate([self._pending, samples]) if self._pending.size else np.asarray(samples, np.float32)
        n = x.size // CHUNK_SAMPLES
        self._pending = x[n * CHUNK_SAMPLES:].copy()
        if n == 0:
            return np.zeros(0, np.float32)
        chunks = torch.from_numpy(np.ascontiguousarray(x[: n * CHUNK_SAMPLES], np.float32)).reshape(n, CHUNK_SAMPLES)
        out = np.empty(n, np.float32)
        with one_thread(), torch.inference_mode():
            for i in range(n):  # the network is recurrent: one chunk after another
                out[i] = float(self.model(chunks[i:i + 1], SAMPLE_RATE))
        self._probs.extend(out.tolist())
        self.n_chunks += n
        self.n_speech += int((out > SPEECH_PROB).sum())
        return out

    def overall_fraction(self) -> float:
        """Share of every chunk scored since the last reset that is speech (0 if none)."""
        return self.n_speech / self.n_chunks if self.n_chunks else 0.0

    def speech_fraction(self, start: int, end: int) -> float:
        """Share of the scored chunks whose centre lies in samples ``[start, end)`` that are speech (0 if none)."""
        first_kept = self.n_chunks - len(self._probs)
        lo = max(first_kept, int(np.ceil((start - CHUNK_SAMPLES / 2) / CHUNK_SAMPLES)))
        hi = min(self.n_chunks, int(np.ceil((end - CHUNK_SAMPLES / 2) / CHUNK_SAMPLES)))
        if hi <= lo:
            return 0.0
        p = np.fromiter((self._probs[i - first_kept] for i in range(lo, hi)), np.float32, hi - lo)
        return float((p > SPEECH_PROB).mean())


def speech_fraction_of(wave: np.ndarray) -> float:
    """Share of speech chunks in a whole recording (16 kHz float32 mono), from a fresh detector."""
    det = SpeechDetector()
    det.push(np.asarray(wave, np.float32))
    return det.overall_fraction()
