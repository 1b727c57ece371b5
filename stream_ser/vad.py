"""Speech detection: silero-vad, streaming, one speech probability per 32 ms chunk.

silero-vad's model ships inside its PyPI wheel (``silero_vad/data/silero_vad.jit``),
so nothing is downloaded. The file is loaded directly: importing the
``silero_vad`` package would set torch to one thread for the whole process.
Its 16 kHz network is rebuilt from that file's weights as :class:`SileroNet`, a
plain module with no state of its own (checked against the TorchScript model when
it is loaded): every stream's :class:`SpeechDetector` holds its recurrent state,
so one shared network scores any number of streams, from any thread. One stream's
chunks are scored on one thread (tiny ops split over 2 busy threads wait for the
second worker: 80 ms a chunk here once); the chunks of many streams scored together
use all threads, as an engine hop does (``stream_ser.openmp.hop_threads``).

A window counts as speech when at least :data:`MIN_SPEECH_FRACTION` of its
chunks have a speech probability above :data:`SPEECH_PROB`; otherwise it gets no
emotion (``label`` None, ``speech`` False) wherever predictions go.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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


class SileroNet(nn.Module):
    """silero-vad's 16 kHz network, rebuilt from the wheel's TorchScript weights, with its state outside.

    The network: the magnitude of a 256-point STFT (hop 128) of the chunk's 512 samples after the last 64 of
    the one before (the context), reflect-padded by 64 (4 frames); four 1-D convolutions with ReLUs down to one
    128-vector; an LSTM cell (the only memory, 128 units); ReLU, a linear unit and a sigmoid: the chunk's speech
    probability. The encoder has no memory, so :meth:`encode` takes every queued chunk of every stream in one
    batch and only :meth:`step` goes chunk by chunk. The STFT is an FFT of the windowed frames rather than
    silero's convolution with its 258 basis rows (the same transform, checked when built). Against the
    TorchScript model called chunk by chunk (2026-11-27, 2 threads here): one stream's hop of 10 chunks 2.1 ->
    0.8 ms; an engine hop of 256 streams' chunks 48 -> 28 ms (profiled; ``docs/benchmarks.md``).
    """

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        net = scripted._model  # the 16 kHz half of the TorchScript model
        stft = net.stft
        basis = stft.forward_basis_buffer[:, 0, :].float()  # [2 (n_fft / 2 + 1), n_fft]: cos rows, then -sin rows
        self.n_fft, self.hop = int(stft.filter_length), int(stft.hop_length)
        self.pad = int(stft.padding.padding[1])
        self.context_samples = int(net.context_size_samples)
        self.register_buffer("window", basis[0].clone())  # the DC row is the window itself
        k = torch.arange(self.n_fft // 2 + 1, dtype=torch.float64)[:, None]
        angle = 2 * np.pi * k * torch.arange(self.n_fft, dtype=torch.float64)[None] / self.n_fft
        dft = torch.cat([torch.cos(angle), -torch.sin(angle)]) * self.window.double()
        if basis.shape != dft.shape or not torch.allclose(basis.double(), dft, atol=1e-4):
            raise ValueError("its STFT basis is not a windowed DFT")
        convs = []
        for i in range(4):
            rc = getattr(net.encoder, str(i)).reparam_conv
            conv = nn.Conv1d(rc.weight.shape[1], rc.weight.shape[0], rc.weight.shape[2], stride=tuple(rc.stride),
                             padding=tuple(rc.padding))
            conv.weight.data.copy_(rc.weight)
            conv.bias.data.copy_(rc.bias)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)
        rnn = net.decoder.rnn
        self.cell = nn.LSTMCell(rnn.weight_ih.shape[1], rnn.weight_hh.shape[1])
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(self.cell, name).data.copy_(getattr(rnn, name))
        head = getattr(net.decoder.decoder, "2")  # (dropout, ReLU, this 1x1 convolution, sigmoid)
        self.out = nn.Linear(head.weight.shape[1], 1)
        self.out.weight.data.copy_(head.weight[:, :, 0])
        self.out.bias.data.copy_(head.bias)
        self.hidden = self.cell.hidden_size
        self.eval()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Chunks with their context [N, context + 512] -> the LSTM cell's inputs [N, 128]."""
        x = F.pad(x[:, None], (0, self.pad), mode="reflect")[:, 0]
        frames = x.unfold(-1, self.n_fft, self.hop) * self.window  # [N, 4, n_fft]
        y = torch.fft.rfft(frames).abs().transpose(1, 2).contiguous()  # [N, n_fft / 2 + 1, 4]
        for conv in self.convs:
            y = F.relu(conv(y))
        return y[..., 0]

    def step(self, features: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One chunk of each stream: inputs [n, 128] and states h, c [n, 128] -> (probabilities [n], h, c)."""
        h, c = self.cell(features, (h, c))
        return torch.sigmoid(self.out(F.relu(h)))[:, 0], h, c


_MODEL: SileroNet | None = None
_MODEL_LOCK = threading.Lock()  # (building it once; scoring needs no lock: the network holds no state)


def _checked(net: SileroNet, scripted: torch.jit.ScriptModule) -> None:
    """The rebuilt network against the TorchScript model on a few chunks of a chirp in noise: the same
    probabilities, or this silero-vad is not the network :class:`SileroNet` rebuilds."""
    with intra_op_threads(1), torch.inference_mode():
        diff = _difference(net, scripted)
    if not diff < 1e-4:
        raise ValueError(f"the rebuilt network differs from silero-vad's by {diff:.2g}")


def _difference(net: SileroNet, scripted: torch.jit.ScriptModule) -> float:
    """Largest difference of the two networks' probabilities over 6 chunks (a chirp in noise), state carried."""
    t = torch.arange(6 * CHUNK_SAMPLES) / SAMPLE_RATE
    noise = torch.randn(len(t), generator=torch.Generator().manual_seed(0))
    x = 0.3 * torch.sin(2 * np.pi * (150 + 900 * t) * t) + 0.05 * noise
    chunks = x.view(-1, CHUNK_SAMPLES)
    scripted.reset_states()
    want = torch.cat([scripted(ch[None], SAMPLE_RATE)[:, 0] for ch in chunks])
    context = torch.cat([torch.zeros(1, net.context_samples), chunks[:-1, -net.context_samples:]])
    feats = net.encode(torch.cat([context, chunks], 1))
    h = c = torch.zeros(1, net.hidden)
    got = []
    for f in feats:
        p, h, c = net.step(f[None], h, c)
        got.append(p)
    return float((torch.cat(got) - want).abs().max())


def _shared_model() -> SileroNet:
    """One :class:`SileroNet` per process; detectors keep their own recurrent state."""
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            path = model_path()  # VadError when silero-vad is not installed
            try:
                with warnings.catch_warnings():  # torch 2.11 marks torch.jit.load deprecated; it is silero's format
                    warnings.simplefilter("ignore", DeprecationWarning)
                    scripted = torch.jit.load(str(path), map_location="cpu").eval()
                with intra_op_threads(1), torch.no_grad():
                    net = SileroNet(scripted).requires_grad_(False)
                _checked(net, scripted)
            except Exception as e:  # a damaged install, or a silero-vad whose network is another one
                raise VadError(f"cannot load the silero-vad model ({type(e).__name__}: {str(e)[:200]})") from None
            _MODEL = net
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
        self._state = torch.zeros(2, 1, self.model.hidden)  # this stream's recurrent state (the cell's h and c)
        self._context = torch.zeros(1, self.model.context_samples)  # the last samples before its next chunk
        self._pending = np.zeros(0, np.float32)  # samples not scored yet: the full chunks among them are queued
        self._probs = np.zeros(0, np.float32)  # the last HISTORY_CHUNKS chunks' probabilities, oldest first
        self.n_chunks = 0  # chunks scored since the start of the stream
        self.n_speech = 0  # ... of which speech (probability above SPEECH_PROB)

    def queue(self, samples: np.ndarray) -> int:
        """Add samples; the chunks they complete wait for :func:`score_queued`. Returns the chunks waiting."""
        self._pending = np.concatenate([self._pending, np.asarray(samples, np.float32)])  # a copy: ours
        return self.queued

    @property
    def queued(self) -> int:
        """Full chunks waiting for :func:`score_queued`."""
        return self._pending.size // CHUNK_SAMPLES

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Score every chunk the new samples complete; returns their speech probabilities."""
        self.queue(samples)
        return score_queued([self])[0]

    def _record(self, probs: np.ndarray) -> None:
        if len(probs):  # an array, not a deque of floats: history() and speech_fraction() are slices of it
            self._probs = np.concatenate([self._probs[max(0, len(self._probs) + len(probs) - HISTORY_CHUNKS):],
                                          probs[-HISTORY_CHUNKS:]])
        self.n_chunks += len(probs)
        self.n_speech += int((probs > SPEECH_PROB).sum())


    def overall_fraction(self) -> float:
        """Share of every chunk scored since the last reset that is speech (0 if none)."""
        return self.n_speech / self.n_chunks if self.n_chunks else 0.0

    def history(self) -> tuple[np.ndarray, int]:
        """The kept chunk probabilities (the last ``HISTORY_CHUNKS``) and the index of the first of them."""
        return self._probs, self.n_chunks - len(self._probs)

    def speech_fraction(self, start: int, end: int) -> float:
        """Share of the scored chunks whose centre lies in samples ``[start, end)`` that are speech (0 if none)."""
        first_kept = self.n_chunks - len(self._probs)
        lo = max(first_kept, int(np.ceil((start - CHUNK_SAMPLES / 2) / CHUNK_SAMPLES)))
        hi = min(self.n_chunks, int(np.ceil((end - CHUNK_SAMPLES / 2) / CHUNK_SAMPLES)))
        if hi <= lo:
            return 0.0
        return np.count_nonzero(self._probs[lo - first_kept: hi - first_kept] > SPEECH_PROB) / (hi - lo)


def frame_masks(probs: list[np.ndarray], first_chunk, first_frame, n_frames: int, hop: int, win: int,
                end) -> np.ndarray:
    """[N, n_frames] bool, row k for the feature frames ``first_frame[k] ...`` (frame t: samples
    [t hop, t hop + win)) from chunk speech probabilities ``probs[k]`` (chunk ``first_chunk[k]`` first):
    False where the 32 ms chunk holding the frame's centre is complete by sample ``end[k]`` and was scored
    non-speech; True otherwise (speech, or no verdict: then the level gate alone decides). Only chunks
    complete by ``end`` count, so the mask does not depend on how the audio was chunked when it arrived.
    All rows in one set of array operations (an engine hop's segments, one per stream; or every segment
    of a recording, all with the same ``probs``)."""
    first = np.asarray(first_chunk, np.int64)[:, None]
    lengths = np.fromiter((len(p) for p in probs), np.int64, len(probs))[:, None]
    centres = (np.asarray(first_frame, np.int64)[:, None] + np.arange(n_frames)) * hop + win // 2
    chunk = centres // CHUNK_SAMPLES  # [N, n_frames]
    known = (((chunk + 1) * CHUNK_SAMPLES <= np.asarray(end, np.int64)[:, None]) & (chunk >= first)
             & (chunk < first + lengths))
    if all(p is probs[0] for p in probs):  # one recording's segments: its probabilities once
        flat, offset = np.asarray(probs[0]), np.zeros(len(probs), np.int64)
    else:  # every row's probabilities, one after another; row k's start at offset[k]
        flat, offset = np.concatenate(probs), np.cumsum(lengths) - lengths[:, 0]
    mask = np.ones(chunk.shape, bool)
    mask[known] = flat[(chunk - first + offset[:, None])[known]] > SPEECH_PROB
    return mask


def score_queued(detectors: list[SpeechDetector]) -> list[np.ndarray]:
    """Score every queued chunk of every detector -> each one's new speech probabilities, in order.

    The encoder has no memory (a chunk's input is its 512 samples after the last 64 before it, known from
    the audio), so every queued chunk of every detector is encoded in one batch. The recurrent cell then
    goes round by round: round r steps every detector that has an r-th chunk, side by side (the same
    probabilities as each stream scored alone, to float rounding: tested). With N streams a hop costs one
    encoder call and 10 cell steps instead of 10 N model calls. The detectors are ordered by queued chunks,
    most first, so the ones still stepping in round r are a prefix of that order.
    """
    counts = [d.queued for d in detectors]
    out = [np.empty(c, np.float32) for c in counts]
    active = sorted((i for i, c in enumerate(counts) if c), key=lambda i: -counts[i])
    if active:
        net = detectors[0].model
        dets = [detectors[i] for i in active]
        lengths = [counts[i] for i in active]
        n, rounds, cs = len(dets), lengths[0], net.context_samples
        even = lengths[-1] == rounds  # every detector has the same number of chunks queued (the usual hop)
        with intra_op_threads(hop_threads(n)), torch.inference_mode():
            if even:
                chunks = torch.from_numpy(np.stack([d._pending[:rounds * CHUNK_SAMPLES] for d in dets])
                                          ).view(n, rounds, CHUNK_SAMPLES)
            else:
                chunks = torch.zeros(n, rounds, CHUNK_SAMPLES)
                for k, d in enumerate(dets):
                    chunks[k, :lengths[k]] = torch.from_numpy(
                        d._pending[:lengths[k] * CHUNK_SAMPLES]).view(lengths[k], CHUNK_SAMPLES)
            context = torch.cat([torch.cat([d._context for d in dets])[:, None], chunks[:, :-1, -cs:]], 1)
            x = torch.cat([context, chunks], 2)  # [n, rounds, cs + 512]: each chunk after its context
            if even:
                feats = net.encode(x.view(n * rounds, -1)).view(n, rounds, -1)
            else:  # only real chunks (row-major: stream by stream, each in order)
                valid = torch.arange(rounds)[None] < torch.tensor(lengths)[:, None]
                encoded = net.encode(x[valid])
                feats = encoded.new_zeros(n, rounds, encoded.shape[-1])
                feats[valid] = encoded
            state = torch.cat([d._state for d in dets], 1)  # [2, n, H]
            h, c = state[0], state[1]
            probs = torch.empty(n, rounds)
            m = n
            for r in range(rounds):
                while lengths[m - 1] <= r:  # these are done (lengths[0] == rounds, so m stays >= 1)
                    m -= 1
                probs[:m, r], hm, cm = net.step(feats[:m, r], h[:m], c[:m])
                h, c = (hm, cm) if m == n else (torch.cat([hm, h[m:]]), torch.cat([cm, c[m:]]))
            # each detector's rows as views (nothing writes into them: the next call makes new tensors)
            state = torch.stack([h, c])  # [2, n, H]
            context = chunks[torch.arange(n), torch.tensor(lengths) - 1, -cs:]  # [n, cs]: each one's last samples
            for k, d in enumerate(dets):
                d._state, d._context = state[:, k:k + 1], context[k:k + 1]
            probs = probs.numpy()
        for k, i in enumerate(active):
            out[i][:] = probs[k, :counts[i]]
    for d, p in zip(detectors, out):
        if len(p):
            d._pending = d._pending[len(p) * CHUNK_SAMPLES:]
        d._record(p)
    return out


def speech_fraction_of(wave: np.ndarray) -> float:
    """Share of speech chunks in a whole recording (16 kHz float32 mono), from a fresh detector."""
    det = SpeechDetector()
    det.push(np.asarray(wave, np.float32))
    return det.overall_fraction()
