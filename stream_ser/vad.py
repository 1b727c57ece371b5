"""Speech detection: silero-vad, streaming, one speech probability per 32 ms chunk.

silero-vad's model ships inside its PyPI wheel (``silero_vad/data/silero_vad.jit``),
so nothing is downloaded. The file is loaded directly: importing the
``silero_vad`` package would set torch to one thread for the whole process.
The model is a small recurrent network with its own state, so every stream has
its own :class:`SpeechDetector`. One stream's chunks are scored on one thread
(on 2 busy threads the tiny ops cost 80 ms a chunk here instead of 0.3 ms); the
chunks of many streams scored together use all threads, as an engine hop does
(``stream_ser.openmp.hop_threads``: 256 streams' hop 43 -> 26 ms on 2 cores).

A window counts as speech when at least :data:`MIN_SPEECH_FRACTION` of its
chunks have a speech probability above :data:`SPEECH_PROB`; otherwise it gets no
emotion (``label`` None, ``speech`` False) wherever predictions go.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import torch

from .openmp import hop_threads, intra_op_threads

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


_MODEL: torch.jit.ScriptModule | None = None
_MODEL_LOCK = threading.Lock()  # the shared model holds the recurrent state of the batch it is scoring


def _shared_model() -> torch.jit.ScriptModule:
    """One silero-vad TorchScript copy per process; detectors keep only their own recurrent state."""
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            path = model_path()  # VadError when silero-vad is not installed
            try:
                with warnings.catch_warnings():  # torch 2.11 marks torch.jit.load deprecated; it is silero's format
                    warnings.simplefilter("ignore", DeprecationWarning)
                    model = torch.jit.load(str(path), map_location="cpu").eval()
                model.reset_states()
                with intra_op_threads(1), torch.inference_mode():
                    model(torch.zeros(1, CHUNK_SAMPLES), SAMPLE_RATE)
                state, context = model._state, model._context  # the state the batched scoring swaps in and out
            except Exception as e:  # a damaged install, or a silero-vad without this state layout
                raise VadError(f"cannot load the silero-vad model ({type(e).__name__}: {str(e)[:200]})") from None
            if state.shape[:2] != (2, 1) or context.shape[0] != 1:
                raise VadError(f"unexpected silero-vad state shapes {tuple(state.shape)} / {tuple(context.shape)}")
            _MODEL = model
        return _MODEL


class SpeechDetector:
    """``push(samples)`` (16 kHz float32 mono, any length), ``speech_fraction(start, end)``, ``reset()``.

    Chunk ``i`` covers samples ``[512 i, 512 i + 512)`` of the stream; a trailing
    partial chunk waits for the next push. Many streams' detectors are scored
    together by :func:`score_queued` (one model call per chunk round for all of
    them: what lets one engine carry many streams); ``push`` is that for one.
    """

    def __init__(self):
        self.model = _shared_model()
        self.reset()

    def reset(self) -> None:
        st = self.model._state
        self._state = torch.zeros(st.shape[0], 1, *st.shape[2:])  # the recurrent state of this stream
        self._context = torch.zeros(1, *self.model._context.shape[1:])  # the last samples before its next chunk
        self._pending = np.zeros(0, np.float32)
        self._queued = torch.zeros(0, CHUNK_SAMPLES)  # full chunks waiting to be scored
        self._probs: deque[float] = deque(maxlen=HISTORY_CHUNKS)
        self.n_chunks = 0  # chunks scored since the start of the stream
        self.n_speech = 0  # ... of which speech (probability above SPEECH_PROB)

    def queue(self, samples: np.ndarray) -> int:
        """Add samples; the chunks they complete wait for :func:`score_queued`. Returns the chunks waiting."""
        x = np.concatenate([self._pending, samples]) if self._pending.size else np.asarray(samples, np.float32)
        n = x.size // CHUNK_SAMPLES
        self._pending = x[n * CHUNK_SAMPLES:].copy()
        if n:
            chunks = torch.from_numpy(np.ascontiguousarray(x[: n * CHUNK_SAMPLES], np.float32)).reshape(n, CHUNK_SAMPLES)
            self._queued = torch.cat([self._queued, chunks]) if len(self._queued) else chunks
        return len(self._queued)

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Score every chunk the new samples complete; returns their speech probabilities."""
        self.queue(samples)
        return score_queued([self])[0]

    def _record(self, probs: np.ndarray) -> None:
        self._probs.extend(probs.tolist())
        self.n_chunks += len(probs)
        self.n_speech += int((probs > SPEECH_PROB).sum())


    def overall_fraction(self) -> float:
        """Share of every chunk scored since the last reset that is speech (0 if none)."""
        return self.n_speech / self.n_chunks if self.n_chunks else 0.0

    def history(self) -> tuple[np.ndarray, int]:
        """The kept chunk probabilities (the last ``HISTORY_CHUNKS``) and the index of the first of them."""
        return np.asarray(self._probs, np.float32), self.n_chunks - len(self._probs)

    def speech_fraction(self, start: int, end: int) -> float:
        """Share of the scored chunks whose centre lies in samples ``[start, end)`` that are speech (0 if none)."""
        first_kept = self.n_chunks - len(self._probs)
        lo = max(first_kept, int(np.ceil((start - CHUNK_SAMPLES / 2) / CHUNK_SAMPLES)))
        hi = min(self.n_chunks, int(np.ceil((end - CHUNK_SAMPLES / 2) / CHUNK_SAMPLES)))
        if hi <= lo:
            return 0.0
        p = np.fromiter((self._probs[i - first_kept] for i in range(lo, hi)), np.float32, hi - lo)
        return float((p > SPEECH_PROB).mean())


def frame_mask(probs: np.ndarray, first_chunk: int, first_frame: int, n_frames: int, hop: int, win: int,
               end: int) -> np.ndarray:
    """[n_frames] bool for the feature frames ``first_frame ...`` (frame t: samples [t hop, t hop + win)),
    from chunk speech probabilities ``probs`` (chunk ``first_chunk`` first): False where the 32 ms chunk
    holding the frame's centre is complete by sample ``end`` and was scored non-speech; True otherwise
    (speech, or no verdict: then the level gate alone decides). Only chunks complete by ``end`` count,
    so the mask does not depend on how the audio was chunked when it arrived."""
    centres = (first_frame + np.arange(n_frames)) * hop + win // 2
    chunk = centres // CHUNK_SAMPLES
    known = ((chunk + 1) * CHUNK_SAMPLES <= end) & (chunk >= first_chunk) & (chunk < first_chunk + len(probs))
    mask = np.ones(n_frames, bool)
    mask[known] = probs[chunk[known] - first_chunk] > SPEECH_PROB
    return mask


def score_queued(detectors: list[SpeechDetector]) -> list[np.ndarray]:
    """Score every queued chunk of every detector -> each one's new speech probabilities, in order.

    The network is recurrent, so a stream's chunks go one after another; the streams go side by side:
    round r scores the r-th queued chunk of every detector that has one, in one batch (the same
    probabilities as scoring each stream alone, to float rounding: tested). With N streams a hop costs
    10 model calls instead of 10 N, and the per-stream Python work is done once a call, not once a round:
    the detectors are ordered by queued chunks, most first, so the ones still scoring in round r are a
    prefix of that order; their states are gathered once, carried from round to round in the batch, and
    handed back (as views of the batch's state) when a detector's chunks run out.
    """
    counts = [len(d._queued) for d in detectors]
    out = [np.empty(c, np.float32) for c in counts]
    active = sorted((i for i, c in enumerate(counts) if c), key=lambda i: -counts[i])
    if active:
        model = detectors[0].model
        dets = [detectors[i] for i in active]
        rounds = counts[active[0]]
        with _MODEL_LOCK, intra_op_threads(hop_threads(len(dets))), torch.inference_mode():
            if all(len(d._queued) == rounds for d in dets):
                chunks = torch.stack([d._queued for d in dets])  # [n, rounds, 512]
            else:
                chunks = torch.zeros(len(dets), rounds, CHUNK_SAMPLES)
                for k, d in enumerate(dets):
                    chunks[k, :len(d._queued)] = d._queued
            probs = np.empty((len(dets), rounds), np.float32)
            state = torch.cat([d._state for d in dets], 1)
            context = torch.cat([d._context for d in dets], 0)
            n = len(dets)
            for r in range(rounds):
                m = n
                while m and len(dets[m - 1]._queued) <= r:  # these are done: their state is final
                    m -= 1
                if m < n:
                    _hand_back(dets[m:n], state[:, m:n], context[m:n])
                    state, context, n = state[:, :m].contiguous(), context[:m].contiguous(), m
                model._state, model._context = state, context
                model._last_batch_size = n
                model._last_sr = SAMPLE_RATE
                probs[:n, r] = model(chunks[:n, r], SAMPLE_RATE)[:, 0].numpy()
                state, context = model._state, model._context
            _hand_back(dets[:n], state, context)
        for k, i in enumerate(active):
            out[i][:] = probs[k, :counts[i]]
    for d, p in zip(detectors, out):
        if len(p):
            d._queued = d._queued[len(p):]
        d._record(p)
    return out


def _hand_back(dets: list[SpeechDetector], state: torch.Tensor, context: torch.Tensor) -> None:
    """Give each detector its row of a batch's recurrent state [2, n, H] and context [n, S]: views (the
    model makes new tensors each call, so nothing writes into them later)."""
    for d, st, cx in zip(dets, state.unbind(1), context.unbind(0)):
        d._state, d._context = st.unsqueeze(1), cx.unsqueeze(0)


def speech_fraction_of(wave: np.ndarray) -> float:
    """Share of speech chunks in a whole recording (16 kHz float32 mono), from a fresh detector."""
    det = SpeechDetector()
    det.push(np.asarray(wave, np.float32))
    return det.overall_fraction()
