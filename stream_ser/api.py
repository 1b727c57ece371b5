"""The Python API: ``load_model()`` -> ``.recognize(path_or_array)`` for a whole file, ``.stream(rate)`` live.

    import stream_ser
    model = stream_ser.load_model()                  # the bundled model (or a checkpoint path)
    r = model.recognize("speech.wav")                # or (array, sample_rate=...)
    r.label, r.confidence, r.probabilities, r.windows
    s = model.stream(sample_rate=48_000)
    for w in s.push(chunk): ...                      # a rolling 3 s window every 320 ms

The whole-file answer is the prediction the offline evaluation makes: the
utterance's 3 s window (zero-padded when shorter), with a speaker-normalised
model normalised by the file's own speech statistics pooled with the corpus's
(as a live stream would hold after hearing the file). ``windows`` are the rolling
predictions the live recognizer emits for the same audio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adaptation import RunningStats
from .audio import AudioError, check_samples, load_audio
from .recognizer import (ACTIVITY_THRESHOLD_DBFS, MIN_SPEECH_ACTIVITY, Prediction, StreamingRecognizer, _dbfs,
                         frame_energy, recording_speech_masks)
from .vad import MIN_SPEECH_FRACTION, speech_fraction_of


@dataclass
class Window:
    """One rolling 3 s prediction (times in seconds from the start of the audio)."""

    start_s: float
    end_s: float
    label: str | None  # None: not enough speech in the window
    confidence: float
    probabilities: dict[str, float]
    speech_activity: float  # share of the window that is speech (silero-vad)
    speech: bool
    partial: bool = False  # fewer than 8 segments of audio yet (the first 2.9 s): padded as in training

    @classmethod
    def from_prediction(cls, p: Prediction) -> "Window":
        return cls(p.window_start_s, p.window_end_s, p.label, p.confidence, p.probabilities,
                   p.speech_activity, p.speech, p.partial)


@dataclass
class Result:
    """What :meth:`EmotionRecognizer.recognize` returns for one file or array."""

    label: str | None  # None when the audio holds no speech
    confidence: float  # probability of the top label
    probabilities: dict[str, float]
    speech_activity: float  # share of the audio that is speech (silero-vad 32 ms chunks; energy with vad off)
    duration_s: float
    windows: list[Window] = field(default_factory=list)

    @property
    def speech(self) -> bool:
        return self.label is not None

    def to_dict(self) -> dict:
        return asdict(self) | {"speech": self.speech}


def to_mono_16k(audio, sample_rate: int | None, target: int = 16_000, source: str = "array") -> np.ndarray:
    """A numpy/torch array [N], [N, C] or [C, N] (C <= 8) at ``sample_rate`` -> float32 mono [N'] at ``target``."""
    if sample_rate is None:
        raise ValueError("sample_rate is required for an array (e.g. recognize(x, sample_rate=16000))")
    if not isinstance(sample_rate, (int, np.integer)) or not 1_000 <= int(sample_rate) <= 384_000:
        raise ValueError(f"sample_rate must be an integer number of Hz (1000-384000), got {sample_rate!r}")
    x = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if x.ndim == 2 and x.shape[0] <= 8 < x.shape[1]:
        x = x.T  # channels first -> [N, C]
    x = check_samples(x, source)
    if int(sample_rate) != target and x.size:
        import soxr
        x = soxr.resample(x, int(sample_rate), target).astype(np.float32)
    return x


def _activity(x: np.ndarray, vad: bool) -> tuple[float, bool]:
    """(share of speech, enough for an emotion) as the live recognizer judges a window."""
    if vad:
        frac = speech_fraction_of(x)
        return frac, frac >= MIN_SPEECH_FRACTION
    energy = frame_energy(x)
    frac = float((_dbfs(energy) > ACTIVITY_THRESHOLD_DBFS).mean()) if energy.size else 0.0
    return frac, frac >= MIN_SPEECH_ACTIVITY


class Stream:
    """Live use from Python: ``push(chunk) -> list[Window]`` at any sample rate; ``reset()``."""

    def __init__(self, model, sample_rate: int = 16_000, vad: bool = True):
        self.model = model
        self.sample_rate = int(sample_rate)
        self.recognizer = StreamingRecognizer(model, vad=vad)
        self._resampler = None
        if self.sample_rate != model.frontend_config.sample_rate:
            import soxr
            self._resampler = soxr.ResampleStream(self.sample_rate, model.frontend_config.sample_rate, 1,
                                                  dtype="float32")

    def push(self, chunk) -> list[Window]:
        x = check_samples(chunk.detach().cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk),
                          "chunk")
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x)
        return [Window.from_prediction(p) for p in self.recognizer.push(x)]

    def flush(self) -> list[Window]:
        """The end of the audio: the window(s) holding its last samples, padded as a short file is."""
        return [Window.from_prediction(p) for p in self.recognizer.flush()]

    def reset(self) -> None:
        self.recognizer.reset()


class EmotionRecognizer:
    """A loaded model with the whole-file and streaming entry points (see the module docstring)."""

    def __init__(self, model, vad: bool = True):
        self.model = model.eval()
        self.vad = vad  # silero-vad decides what is speech; False: the energy threshold

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model.labels

    def describe(self) -> str:
        return self.model.describe()

    def recognize(self, audio, sample_rate: int | None = None, windows: bool = True) -> Result:
        """A file path (any rate libsndfile reads, mono or multi-channel) or an array with ``sample_rate``."""
        fc = self.model.frontend_config
        if isinstance(audio, (str, Path)):
            x = load_audio(audio, fc.sample_rate).numpy()
            if sample_rate is not None:
                raise ValueError("sample_rate is only for arrays; a file says its own")
        else:
            x = to_mono_16k(audio, sample_rate, fc.sample_rate)
        if x.size == 0:
            raise AudioError("array" if not isinstance(audio, (str, Path)) else audio, "no samples")
        wave = torch.from_numpy(x)
        stats = None
        fe = self.model.frontend
        if fc.normalization == "speaker":
            rs = RunningStats(fe.corpus_stats())
            with torch.no_grad():
                raw = fe.raw_segments_from_log_mel(fe.log_mel(wave.to(self.model.device)))
            rs.update(raw, recording_speech_masks(x, fc)[None] if self.vad and raw.shape[1] else None)
            cur = rs.current()
            stats = (cur.mean, cur.std)
        probs = self.model.predict([wave], stats=stats)[0].numpy()
        wins = []
        if windows:
            rec = StreamingRecognizer(self.model, vad=self.vad)
            preds = rec.push(x)
            det = rec.segmenter.vad
            if det is not None:  # the file's speech share from the detector the windows used: silero runs once
                activity = det.overall_fraction()
                speech = activity >= MIN_SPEECH_FRACTION
            else:
                activity, speech = _activity(x, False)
            wins = [Window.from_prediction(p) for p in preds + rec.flush()]
        else:
            activity, speech = _activity(x, self.vad)
        top = int(np.argmax(probs))
        label = self.labels[top] if speech else None
        return Result(label, float(probs[top]), {lab: float(p) for lab, p in zip(self.labels, probs)}, activity,
                      x.size / fc.sample_rate, wins)

    def stream(self, sample_rate: int = 16_000) -> Stream:
        return Stream(self.model, sample_rate, vad=self.vad)


def load_model(path: str | Path | None = None, device: str = "cpu", precision: str = "auto",
               vad: bool = True) -> EmotionRecognizer:
    """The bundled model (``path=None``) or a checkpoint, on ``device`` ("cpu", "cuda", "cuda:N").

    ``precision``: "auto" (int8 on the CPU: FC6/FC7 and the head's LSTM input projection, and the convolutions
    where the checkpoint holds their activation ranges; fp32 on a GPU), "int8", "int8x2" (the convolutions'
    activations as two int8 levels: closer to fp32, slower than "int8"), "fp32", or "bf16" / "fp16" (the CNN
    in half precision, for a GPU).
    ``vad``: silero-vad decides which windows hold speech (False: an energy threshold).
    """
    from .model import CheckpointError, load_checkpoint
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} asked for, but torch sees no CUDA device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise CheckpointError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if path is None:
        from .assets import default_checkpoint
        path = default_checkpoint()
        if path is None:
            raise CheckpointError("no bundled model in this install; pass load_model(path) to a checkpoint")
    return EmotionRecognizer(load_checkpoint(path, device, precision), vad=vad)
