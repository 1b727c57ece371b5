"""Frozen configuration dataclasses, saved inside every checkpoint and rebuilt from it.

The defaults are the paper's (Zhang et al. 2021, sections 2.2 and 3.2); see
``../shared/DESIGN.md``. Derived sizes (samples per frame, per segment, per
utterance) are properties so that they can never disagree with the fields.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field

# --- constants (the paper's values) -------------------------------------------
SAMPLE_RATE_HZ = 16_000
PREEMPHASIS = 0.97
WIN_MS = 25.0  # Hamming window
HOP_MS = 10.0
N_FFT = 512
N_MELS = 64
F_MIN_HZ = 20.0
F_MAX_HZ = 8_000.0
LOG_FLOOR = 1e-10  # power floor before the natural log: log(1e-10) = -23.03
DELTA_N = 2  # regression half-width, eq. (2): window of 2N+1 = 5 frames
SEGMENT_FRAMES = 64  # 64 frames = 63 * 10 ms + 25 ms = 655 ms
SEGMENT_SHIFT_FRAMES = 32  # 320 ms
IMAGE_SIZE = 227  # AlexNet input
UTTERANCE_S = 3.0  # truncate longer, zero-pad shorter -> 8 segments
ONSET_DBFS = -45.0  # start_at_speech: the first 10 ms frame with RMS above this is the speech onset
ONSET_MARGIN_S = 0.1  # ... and the 3 s window starts this long before it

NORMALIZATIONS = ("segment", "corpus", "speaker", "utterance", "none")
EMODB_LABELS = ("anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral")


@dataclass(frozen=True)
class FrontendConfig:
    """Everything that decides what a segment image looks like.

    ``normalization`` (see ``stream_ser.features.Frontend.normalize``):

    - ``"segment"`` (default): each channel of each 64x64 segment is standardised
      to zero mean and unit variance over the segment. A segment then depends on
      its own 655 ms only (DESIGN.md invariant 2), and the microphone gain drops
      out, which matters for live use.
    - ``"corpus"``: per channel and Mel bin, mean and std of the training
      segments, stored in the checkpoint. Keeps loudness; depends on the gain.
    - ``"speaker"``: per channel and Mel bin, mean and std of the speaker's own
      speech frames (``stream_ser.adaptation``): offline from all the speaker's
      utterances (no labels), live from running statistics per stream that start
      at the training corpus statistics (stored in the checkpoint).
    - ``"utterance"``: the paper's per-utterance waveform standardisation. Needs
      the whole utterance, so it is an offline-only ablation; the live recognizer
      refuses a model trained with it.
    - ``"none"``: raw log-Mel, delta, delta-delta.
    """

    sample_rate: int = SAMPLE_RATE_HZ
    preemphasis: float = PREEMPHASIS
    win_length: int = 400  # samples, 25 ms
    hop_length: int = 160  # samples, 10 ms
    n_fft: int = N_FFT
    n_mels: int = N_MELS
    f_min: float = F_MIN_HZ
    f_max: float = F_MAX_HZ
    mel_scale: str = "slaney"  # librosa's default Mel scale (htk=False)
    mel_norm: str | None = "slaney"  # librosa's default area normalisation
    log_floor: float = LOG_FLOOR
    delta_n: int = DELTA_N
    channels: int = 3  # 1: static, 2: + delta, 3: + delta-delta
    segment_frames: int = SEGMENT_FRAMES
    segment_shift: int = SEGMENT_SHIFT_FRAMES
    image_size: int = IMAGE_SIZE
    utterance_s: float = UTTERANCE_S
    normalization: str = "segment"
    norm_eps: float = 1e-5
    # True: an utterance's 3 s window starts 100 ms before its speech onset instead of at
    # sample 0, so leading silence (about 1 s in every RAVDESS file) does not fill the window
    start_at_speech: bool = False
    # > 0 (``speaker``/``corpus`` normalisation only): a normalised log-Mel value below -silence_floor
    # is set to -silence_floor and its delta and delta-delta to 0, so that silence looks the same
    # whatever its level: EMO-DB's zero padding sits at about -3.8, RAVDESS's studio noise at -2.5,
    # a live room's fan wherever the microphone puts it. 0: off (models trained before it).
    silence_floor: float = 0.0
    # > 0 (with start_at_speech): the speech onset is the first 10 ms frame within this many dB of the
    # utterance's loudest one, not the first above ONSET_DBFS, so that where the window starts does not
    # depend on the recording's level (bench/level_robustness.py). 0: the absolute threshold.
    onset_below_peak_db: float = 0.0

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.channels not in (1, 2, 3):
            raise ValueError(f"channels must be 1, 2 or 3, got {self.channels}")
        for name in ("sample_rate", "win_length", "hop_length", "n_fft", "n_mels", "segment_frames"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.image_size < 63:  # AlexNet's third max-pool needs a 3 x 3 map: 63 px in
            raise ValueError(f"image_size must be at least 63 px (AlexNet's smallest input), got {self.image_size}")
        if not 0 < self.utterance_s <= 60:
            raise ValueError(f"utterance_s must be in (0, 60], got {self.utterance_s}")
        if self.win_length > self.n_fft:
            raise ValueError("win_length must not exceed n_fft")
        if not 1 <= self.segment_shift <= self.segment_frames:
            raise ValueError("segment_shift must be in 1..segment_frames")
        if self.onset_below_peak_db < 0:
            raise ValueError(f"onset_below_peak_db must be >= 0 (0: off), got {self.onset_below_peak_db}")
        if self.onset_below_peak_db and not self.start_at_speech:
            raise ValueError("onset_below_peak_db places the speech onset: it needs start_at_speech")
        if self.silence_floor < 0:
            raise ValueError(f"silence_floor must be >= 0 (0: off), got {self.silence_floor}")
        if self.silence_floor and self.normalization not in ("speaker", "corpus"):
            raise ValueError("silence_floor needs the 'speaker' or 'corpus' normalisation (a floor in "
                             f"per-bin standard deviations), not {self.normalization!r}")

    # --- derived sizes (computed once: a live engine reads them for every stream every hop) -----------
    @functools.cached_property
    def segment_samples(self) -> int:
        """Samples one segment spans: (frames - 1) * hop + window (10 480 = 655 ms)."""
        return (self.segment_frames - 1) * self.hop_length + self.win_length

    @functools.cached_property
    def shift_samples(self) -> int:
        """Samples between the starts of consecutive segments (5 120 = 320 ms)."""
        return self.segment_shift * self.hop_length

    @functools.cached_property
    def utterance_samples(self) -> int:
        return int(round(self.utterance_s * self.sample_rate))

    @functools.cached_property
    def utterance_frames(self) -> int:
        return self.frames_for(self.utterance_samples)

    @functools.cached_property
    def segments_per_utterance(self) -> int:
        """Segments in one utterance window (8 for the paper's 3 s)."""
        return self.segments_for_frames(self.utterance_frames)

    @functools.cached_property
    def hop_s(self) -> float:
        return self.shift_samples / self.sample_rate

    def frames_for(self, n_samples: int) -> int:
        """STFT frames (no centring) in ``n_samples`` samples."""
        if n_samples < self.win_length:
            return 0
        return 1 + (n_samples - self.win_length) // self.hop_length

    def segments_for_frames(self, n_frames: int) -> int:
        if n_frames < self.segment_frames:
            return 0
        return 1 + (n_frames - self.segment_frames) // self.segment_shift

    def log_mel_key(self) -> str:
        """Short hash of the fields that decide the log-Mel frames (feature cache key)."""
        keys = ("sample_rate", "preemphasis", "win_length", "hop_length", "n_fft", "n_mels",
                "f_min", "f_max", "mel_scale", "mel_norm", "log_floor", "utterance_s", "start_at_speech")
        extra = {"onset_below_peak_db": self.onset_below_peak_db} if self.onset_below_peak_db else {}  # keeps old keys
        blob = json.dumps({k: getattr(self, k) for k in keys} | {"utt_norm": self.normalization == "utterance"} | extra,
                          sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FrontendConfig":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class ModelConfig:
    """The network: AlexNet segment embedder + BLSTM-attention head (or the baseline).

    ``arch``: ``"dcnn_blstmwa"`` (the paper's model) or ``"cnn_lstm"`` (the paper's
    2-CNN-LSTM baseline, Table 5).
    """

    labels: tuple[str, ...] = EMODB_LABELS
    arch: str = "dcnn_blstmwa"
    embed_dim: int = 4096  # AlexNet FC7
    lstm_hidden: int = 128  # per direction
    attention: bool = True  # False: mean of the BLSTM outputs (Table 3 ablation)
    dnn: tuple[int, ...] = (512, 256, 256)
    dropout: float = 0.5
    baseline_lstm: int = 512

    def __post_init__(self) -> None:
        if self.arch not in ("dcnn_blstmwa", "cnn_lstm"):
            raise ValueError(f"unknown arch {self.arch!r}")
        if len(self.labels) < 2:
            raise ValueError("need at least two labels")
        # tuples survive the JSON-like round trip through the checkpoint as lists
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "dnn", tuple(self.dnn))

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        d["dnn"] = list(self.dnn)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return _from_dict(cls, d)


def _from_dict(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**d)


__all__ = ["FrontendConfig", "ModelConfig", "EMODB_LABELS", "NORMALIZATIONS", "field"]
