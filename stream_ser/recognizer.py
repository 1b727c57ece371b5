"""Incremental recognition: samples in, a rolling 3 s prediction out every 320 ms.

``StreamingRecognizer.push(samples)`` computes only the STFT frames the new
samples complete (the 240-sample window overlap is carried), emits a segment
every 32 frames once 64 exist, embeds each segment exactly once (counted), caches
its embedding's LSTM input projection, and once 8 segments exist runs the head
over the last 8 after every new segment.

Invariant (DESIGN.md 1, tested): the prediction for the window of segments
k..k+7 equals ``model.predict(wave[5120 k : 5120 k + 48000])`` within 1e-4, for
any chunking of the input.

The work is split so the multi-stream engine can batch it: :class:`SegmentStream`
turns samples into segments (per-stream state only); the model calls happen in
:meth:`StreamingRecognizer.embed_segments` and :meth:`StreamingRecognizer.predict_windows`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .adaptation import RunningStats, Stats, moments_each, speech_frames
from .audio import check_samples
from .features import frame_mean_square
from .model import EmotionModel
from .openmp import embedding_threads, intra_op_threads
from .vad import MIN_SPEECH_FRACTION, SpeechDetector, frame_masks, score_queued

ACTIVITY_THRESHOLD_DBFS = -45.0  # with vad off: a frame with RMS above this counts as sound (speech activity)
MIN_SPEECH_ACTIVITY = 0.1  # with vad off: fewer such frames in a window than this, no emotion


def frame_energy(x: np.ndarray, win: int = 400, hop: int = 160) -> np.ndarray:
    """Mean square of each STFT frame (``win`` samples every ``hop``) of x [N] -> [T] (float64): a whole
    recording's; a live stream's come with its log-Mel frames (:func:`compute_frames`), the same numbers."""
    if x.size < win:
        return np.zeros(0, np.float64)
    return frame_mean_square(torch.from_numpy(np.asarray(x, np.float32)).unfold(0, win, hop)).numpy()


def _dbfs(mean_square: np.ndarray | float) -> np.ndarray | float:
    return 10.0 * np.log10(np.maximum(mean_square, 1e-12))


@dataclass
class Prediction:
    """One rolling utterance-level prediction (times in seconds of stream time)."""

    seq: int
    window_start_s: float  # first sample of segment k
    window_end_s: float  # last sample of segment k+7
    probabilities: dict[str, float]
    label: str | None  # None: not enough speech in the window (``speech`` False), no emotion
    confidence: float
    attention: list[float]  # over the 8 segments, oldest first
    speech_activity: float  # share of the window that is speech: silero-vad chunks (energy frames with vad off)
    level_dbfs: float  # RMS level of the newest segment
    timings_ms: dict[str, float] = field(default_factory=dict)  # frontend, embed, head, total
    stream: str | None = None
    t_arrival: float = 0.0  # wall clock (time.time()) when the window's last sample arrived
    # speaker adaptation (``speaker`` normalisation): None for other models, else
    # {"on": updating from speech, "speech_s": seconds of speech behind the statistics, "enrolled": bool}
    adaptation: dict | None = None
    speech: bool = True  # speech_activity reached the threshold (vad.MIN_SPEECH_FRACTION; energy: 0.1)
    partial: bool = False  # fewer than 8 segments heard yet: the rest of the window is padding, as in training

    def to_dict(self) -> dict:
        """As ``dataclasses.asdict`` (the same dict, its inner dicts and list copies too), built field by field:
        asdict's recursive copy took about 30 us a prediction, 15 ms a hop at 512 live streams."""
        d = {name: getattr(self, name) for name in _PREDICTION_FIELDS}
        for name in ("probabilities", "timings_ms"):
            d[name] = dict(d[name])
        d["attention"] = list(self.attention)
        if self.adaptation is not None:
            d["adaptation"] = dict(self.adaptation)
        return d


_PREDICTION_FIELDS = tuple(f.name for f in fields(Prediction))


@dataclass
class Segment:
    """A finished segment waiting to be embedded."""

    index: int  # k: covers samples [5120 k, 5120 k + 10480)
    features: torch.Tensor  # [C, M, L], normalised
    activity: float
    level_dbfs: float
    arrival: float  # perf_counter time its last sample arrived
    frontend_ms: float
    embed_ms: float = 0.0  # the embedder call it went through
    adaptation: dict | None = None  # the speaker statistics it was normalised with (see Prediction)


def embed_and_project(model: EmotionModel, features: list[torch.Tensor]) -> torch.Tensor:
    """Segments [C, M, L] -> the head's cached input projections [N, dirs, 4H], in one embedder batch."""
    threads = embedding_threads(len(features), model.frontend_config.image_size,
                                getattr(model.embedder, "int8_convolutions", False))
    with torch.no_grad(), intra_op_threads(threads):
        return model.head.project(model.embed(torch.stack(features)))


class PaddingCache:
    """Head input projections of padding segments already embedded, found again by their features.

    A partial window (the first 7 hops of a stream) is completed with the padding segment, normalised
    with the statistics of the moment. Where those cannot move it (per-segment normalisation, frozen
    statistics, the ``silence_floor``, which floors all of it) it is the same segment every hop, so it
    is embedded once and the hop embeds only its new segment. Where the statistics do move it (live
    adaptation without the floor) it misses and is embedded as before: a hit needs bit-equal features,
    so the answers are those of embedding it every time. One per recognizer, or shared by an engine's
    streams; the model must not change under it."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=size)  # (features, projection)
        self.hits = self.misses = 0

    def get(self, features: torch.Tensor) -> torch.Tensor | None:
        for f, p in self._items:
            if f.shape == features.shape and torch.equal(f, features):
                self.hits += 1
                return p
        return None

    def put(self, features: torch.Tensor, projection: torch.Tensor) -> None:
        self.misses += 1
        self._items.append((features, projection))

    def projections(self, model: EmotionModel, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The projections of padding segments [C, M, L] (an engine's partial windows: one each); the ones
        not cached in one embedder call, each distinct one once. Compared all at once, one comparison per
        cached or new distinct segment, not one per segment (on a GPU each comparison waits for it)."""
        x = torch.stack(features)  # [P, C, M, L]
        out: list[torch.Tensor | None] = [None] * len(features)
        left = torch.ones(len(features), dtype=torch.bool)

        def same_as(f: torch.Tensor) -> torch.Tensor:  # [P] bool (CPU): the segments not yet placed equal to f
            return (x == f).flatten(1).all(dim=1).cpu() & left

        for f, p in self._items:
            if not left.any():
                break
            if f.shape == x.shape[1:]:
                hit = same_as(f)
                for i in hit.nonzero().flatten().tolist():
                    out[i] = p
                self.hits += int(hit.sum())
                left &= ~hit
        todo: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a distinct uncached segment, which rows it is)
        while left.any():
            f = x[int(left.nonzero()[0])]
            rows = same_as(f)
            todo.append((f, rows))
            left &= ~rows
        if todo:
            for (f, rows), p in zip(todo, embed_and_project(model, [f for f, _ in todo])):
                self.put(f, p)
                for i in rows.nonzero().flatten().tolist():
                    out[i] = p
        return out


def padding_segments(recs: list["StreamingRecognizer"]) -> list[torch.Tensor]:
    """:meth:`StreamingRecognizer.padding_segment` of several streams of one model ([C, M, L] each, the same
    numbers), in one normalisation call instead of a front-end call per stream."""
    rec = recs[0]
    cfg, fe = rec.cfg, rec.model.frontend
    floor = torch.full((1, cfg.n_mels, cfg.segment_frames), float(np.log(cfg.log_floor)), device=rec.model.device)
    with torch.no_grad():
        raw = fe.raw_segments_from_log_mel(floor)[0, 0]  # [C, M, L]: digital silence, un-normalised
        if rec.segmenter.adaptation is None:  # the same statistics for every stream: one segment for all
            return [fe.normalize(raw)] * len(recs)
        mean, std = RunningStats.current_each([r.segmenter.adaptation for r in recs])  # [P, C, M] each
        return list(fe.normalize(raw.expand(len(recs), *raw.shape), (mean, std)))


def segment_speech_mask(probs: np.ndarray, first_chunk: int, s: int, cfg) -> np.ndarray:
    """[L] bool: which frames of segment ``s`` may teach the speaker statistics, from chunk speech
    probabilities (chunk ``first_chunk`` first; :func:`~stream_ser.vad.frame_masks`), judged with the chunks
    complete when the segment completes. The one rule for live streams and whole recordings alike."""
    return segment_speech_masks([(probs, first_chunk)], [s], cfg)[0]


def segment_speech_masks(histories: list[tuple[np.ndarray, int]], segments: list[int], cfg) -> np.ndarray:
    """[N, L] bool: :func:`segment_speech_mask` of N (chunk probabilities, first chunk) and segment index
    pairs (an engine hop's new segments, from their streams' :meth:`SpeechDetector.history`), in one call."""
    s = np.asarray(segments, np.int64)
    return frame_masks([p for p, _ in histories], [f for _, f in histories], s * cfg.segment_shift,
                       cfg.segment_frames, cfg.hop_length, cfg.win_length, s * cfg.shift_samples + cfg.segment_samples)


def recording_speech_masks(wave: np.ndarray, cfg) -> torch.Tensor:
    """[S, L] bool for a whole recording [N] (enrolment, a file): :func:`segment_speech_mask` of every
    segment, from a fresh speech detector that heard all of it: the adaptation's frame masks."""
    probs = SpeechDetector().push(np.asarray(wave, np.float32))
    n = cfg.segments_for_frames(cfg.frames_for(len(wave)))
    if n == 0:
        return torch.ones(0, cfg.segment_frames, dtype=torch.bool)
    return torch.from_numpy(segment_speech_masks([(probs, 0)] * n, list(range(n)), cfg))


class SegmentStream:
    """Per-stream front-end state: samples -> log-Mel frames -> segments. No model calls.

    With a ``speaker``-normalised model the stream keeps its own
    :class:`~stream_ser.adaptation.RunningStats` (``self.adaptation``): each
    segment, when it completes, first updates them with its speech frames
    (unless ``adapt`` is False or they are frozen) and is then normalised with
    the statistics current at that moment, once.
    """

    def __init__(self, model: EmotionModel, adapt: bool = True, vad: bool = True):
        self.frontend = model.frontend
        self.vad = SpeechDetector() if vad else None
        self.cfg = model.frontend_config
        self.device = model.device
        self.adaptation: RunningStats | None = None
        self._enrolled: Stats | None = None
        if self.cfg.normalization == "speaker":
            self.adaptation = RunningStats(self.frontend.corpus_stats())
            self.adaptation.frozen = not adapt
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(0, np.float32)  # samples from the first sample of frame self.n_frames on
        # log-Mel frames [T, M] from frame self._frames_start on, on the host: appending to a small array is a
        # microsecond there, a tensor call per stream a hop (a kernel launch on a GPU) as a tensor
        self._frames = np.zeros((0, self.cfg.n_mels), np.float32)
        self._energy = np.zeros(0, np.float64)  # mean square per frame, same indexing
        self._frames_start = 0
        self.n_frames = 0
        self.n_samples = 0
        self.next_segment = 0
        self._arrivals: deque[tuple[int, float]] = deque()  # (samples received so far, time)
        self._frontend_s = 0.0
        if self.vad is not None:
            self.vad.reset()

    # --- speaker adaptation ------------------------------------------------------------
    def enroll(self, wave: np.ndarray | torch.Tensor) -> Stats:
        """Seed the speaker statistics from a recording of the speaker (16 kHz mono [N]); returns them."""
        if self.adaptation is None:
            raise ValueError("this model does not use speaker normalisation; enrolment has no effect")
        x = torch.as_tensor(check_samples(np.asarray(wave), "enrolment"))
        with torch.no_grad():
            raw = self.frontend.raw_segments_from_log_mel(self.frontend.log_mel(x.to(self.device)))
        if raw.shape[1] == 0:
            raise ValueError(f"enrolment audio is too short: at least {self.cfg.segment_samples / self.cfg.sample_rate:.2f} s needed")
        mask = recording_speech_masks(x.numpy(), self.cfg)[None] if self.vad is not None else None
        frozen = self.adaptation.frozen
        self.adaptation.frozen = False
        self.adaptation.enroll(raw, mask)
        self.adaptation.frozen = frozen
        self._enrolled = self.adaptation.current()
        return self._enrolled

    def reset_adaptation(self) -> None:
        """Back to the corpus statistics (a new speaker); an enrolment is forgotten too."""
        if self.adaptation is not None:
            self.adaptation.reset()
        self._enrolled = None

    def adaptation_info(self) -> dict | None:
        a = self.adaptation
        if a is None:
            return None
        return {"on": not a.frozen, "speech_s": round(a.speech_s, 2), "enrolled": self._enrolled is not None}

    def push(self, samples: np.ndarray, arrival: float | None = None) -> list[Segment]:
        """Samples in, the segments they complete out (``ingest``, speech detection, ``segments``)."""
        self.ingest(samples, arrival)
        if self.vad is not None:
            score_queued([self.vad])
        return self.segments()

    def ingest(self, samples: np.ndarray, arrival: float | None = None) -> None:
        """Take samples: log-Mel frames now; their speech-detection chunks wait in ``self.vad`` until
        :func:`~stream_ser.vad.score_queued` scores them (many streams' together, in the engine), which
        must happen before :meth:`segments`."""
        self.take(samples, arrival)
        compute_frames([self])

    def take(self, samples: np.ndarray, arrival: float | None = None) -> None:
        """Buffer samples and queue their speech-detection chunks; the log-Mel frames they complete wait
        for :func:`compute_frames` (one call for many streams in the engine)."""
        self.take_many([(samples, time.perf_counter() if arrival is None else arrival)])

    def take_many(self, blocks: list[tuple[np.ndarray, float]]) -> None:
        """:meth:`take` of several blocks (samples, arrival) in order, each checked and its arrival kept,
        buffered in one copy (an engine's stream brings a block every 100 ms from a websocket producer, and
        buffering them one by one was a twelfth of a 416-stream hop)."""
        xs = []
        for samples, arrival in blocks:
            x = check_samples(samples, "stream")
            if x.size:
                self.n_samples += x.size
                self._arrivals.append((self.n_samples, arrival))
                xs.append(x)
        if not xs:
            return
        t0 = time.perf_counter()
        self._buf = np.concatenate([self._buf, *xs])  # a copy, even of one block: the caller keeps its array
        if self.vad is not None:
            self.vad.queue(xs[0] if len(xs) == 1 else np.concatenate(xs))
        self._frontend_s += time.perf_counter() - t0

    def _frame_span(self) -> np.ndarray | None:
        """The buffered samples of the frames the buffer completes (None: not one yet)."""
        cfg = self.cfg
        k = cfg.frames_for(self._buf.size)
        return self._buf[: (k - 1) * cfg.hop_length + cfg.win_length] if k > 0 else None

    def _add_frames(self, log_mel: np.ndarray, energy: np.ndarray) -> None:
        """Append the log-Mel frames [k, M] the buffer completes and their mean squares [k] (float64);
        drop the samples no later frame needs."""
        k = log_mel.shape[0]
        self._energy = np.concatenate([self._energy, energy])
        self._frames = np.concatenate([self._frames, log_mel])
        self.n_frames += k
        self._buf = self._buf[k * self.cfg.hop_length:]

    def segments(self) -> list[Segment]:
        """The segments the frames ingested so far complete (each once)."""
        return make_segments([self])[0]

    def _due(self) -> list[tuple[int, np.ndarray]]:
        """(index, static log-Mel [L, M], time first) of every segment the frames complete, oldest first."""
        cfg, out = self.cfg, []
        s = self.next_segment
        while self.n_frames >= cfg.segment_frames + s * cfg.segment_shift:
            a = s * cfg.segment_shift - self._frames_start
            out.append((s, self._frames[a: a + cfg.segment_frames]))
            s += 1
        return out

    def _energy_of(self, s: int) -> np.ndarray:
        """[L] the mean square of each frame of segment ``s`` (float64; not let go yet)."""
        a = s * self.cfg.segment_shift - self._frames_start
        return self._energy[a: a + self.cfg.segment_frames]

    def _finish(self, s: int, seg: torch.Tensor, frontend_s: float, adaptation: dict | None,
                level: float, activity: float | None) -> Segment:
        """Segment ``s`` with its normalised features [C, M, L], ``adaptation`` (the statistics it was
        normalised with, from :func:`_adapt_each`), its ``level`` (dBFS) and, without a speech detector,
        its ``activity`` (share of frames over the level gate): its speech activity and arrival, and the
        frames before the next segment's start let go."""
        cfg = self.cfg
        if self.vad is not None:
            activity = self.vad.speech_fraction(s * cfg.shift_samples, s * cfg.shift_samples + cfg.segment_samples)
        # arrival of the segment's last sample
        last = s * cfg.shift_samples + cfg.segment_samples
        while len(self._arrivals) > 1 and self._arrivals[0][0] < last:
            self._arrivals.popleft()
        arrival = self._arrivals[0][1]
        # frames before the next segment's start are not needed any more
        self.next_segment = s + 1
        keep_from = self.next_segment * cfg.segment_shift - self._frames_start
        self._frames = self._frames[keep_from:]
        self._energy = self._energy[keep_from:]
        self._frames_start += keep_from
        fe_ms = 1e3 * (self._frontend_s + frontend_s)
        self._frontend_s = 0.0
        return Segment(s, seg, activity, level, arrival, fe_ms, adaptation=adaptation)


def compute_frames(streams: list[SegmentStream]) -> None:
    """The log-Mel frames that the buffered samples of several streams (of one model) complete, in one
    front-end call: a frame is a function of its own 400 samples (``stream_ser.features``), so this is
    what each stream would compute alone, without a call per stream. Each stream is charged its share of
    the time."""
    todo = [(st, span) for st in streams if (span := st._frame_span()) is not None]
    if not todo:
        return
    t0 = time.perf_counter()
    with torch.no_grad():  # [k_i, M] and [k_i] each
        lms, energies = todo[0][0].frontend.log_mel_many([span for _, span in todo], energy=True, host=True)
    share = (time.perf_counter() - t0) / len(todo)
    for (st, _), x, e in zip(todo, lms, energies):
        st._add_frames(x, e)
        st._frontend_s += share


def _adapt_each(jobs: list, n: torch.Tensor, sm: torch.Tensor, ss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         list[dict]]:
    """Add each job's (stream, segment) speech-frame moments (counts [J], sums and sums of squares
    [J, C, M]) to its stream's running statistics, in order -> the (mean, std) [J, C, M] each segment is
    normalised with (its stream's, current after the segment's own update) and what each prediction says
    of them. Round r takes the r-th new segment of every stream, so a stream that brought several sees
    them one after another, as alone."""
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for k, (st, _, _) in enumerate(jobs):
        r = seen[id(st)] = seen.get(id(st), -1) + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(k)
    mean = std = None
    infos: list = [None] * len(jobs)
    for ks in rounds:
        RunningStats.add_each([jobs[k][0].adaptation for k in ks], n[ks], sm[ks], ss[ks])
        for k in ks:
            infos[k] = jobs[k][0].adaptation_info()
        m, d = RunningStats.current_each([jobs[k][0].adaptation for k in ks])
        if len(rounds) == 1:
            return m, d, infos
        if mean is None:
            mean, std = m.new_empty(len(jobs), *m.shape[1:]), d.new_empty(len(jobs), *d.shape[1:])
        mean[ks], std[ks] = m, d
    return mean, std, infos


def make_segments(streams: list[SegmentStream]) -> list[list[Segment]]:
    """The segments the frames ingested so far complete, for several streams (of one model) at once, each
    segment once: the deltas of all in one call; each stream's running statistics updated segment by
    segment, in order, with each segment normalised by the statistics current after its own update (as
    one stream alone does); then all normalised in one call. Speech detection must have scored the
    streams' chunks first. -> each stream's segments, oldest first."""
    jobs = [(st, s, static) for st in streams for s, static in st._due()]
    if not jobs:
        return [[] for _ in streams]
    t0 = time.perf_counter()
    fe = jobs[0][0].frontend
    with torch.no_grad():
        statics = np.stack([frames.T for _, _, frames in jobs])  # [N, M, L], stacked on the host: one copy over
        raw = fe._with_deltas(torch.from_numpy(statics).to(fe.window.device))  # [N, C, M, L]
        if jobs[0][0].adaptation is None:  # one model, so no stream adapts (not speaker-normalised)
            feats, infos = fe.normalize(raw), [None] * len(jobs)
        else:  # every segment's speech-frame moments in one call, added stream by stream in order
            # [N, L]: the frames each stream's speech detector kept (those with no verdict yet too), all in
            # one call; for a stream without a detector, its frames over the level gate (speech_frames)
            heard = [k for k, (st, _, _) in enumerate(jobs) if st.vad is not None]
            masks = (torch.empty(len(jobs), raw.shape[-1], dtype=torch.bool) if len(heard) == len(jobs)
                     else speech_frames(raw).cpu())
            if heard:
                masks[heard] = torch.from_numpy(segment_speech_masks(
                    [jobs[k][0].vad.history() for k in heard], [jobs[k][1] for k in heard], jobs[0][0].cfg))
            # on the segments' device (on a GPU, only the sums come back: [N, C, M], not the segments)
            n, sm, ss = (t.cpu() for t in moments_each(raw, masks))
            mean, std, infos = _adapt_each(jobs, n, sm, ss)
            feats = fe.normalize(raw, (mean, std))
        # every segment's level, and its activity by the level gate, in one call (before _finish lets go)
        energy = np.stack([st._energy_of(s) for st, s, _ in jobs])  # [N, L]
        levels = _dbfs(energy.mean(axis=1)).tolist()
        gated = (_dbfs(energy) > ACTIVITY_THRESHOLD_DBFS).mean(axis=1).tolist()
    share = (time.perf_counter() - t0) / len(jobs)
    out: dict[int, list[Segment]] = {id(st): [] for st in streams}
    for (st, s, _), f, info, level, activity in zip(jobs, feats, infos, levels, gated):
        out[id(st)].append(st._finish(s, f, share, info, level, activity))
    return [out[id(st)] for st in streams]


def check_streamable(model: EmotionModel) -> None:
    """ValueError, saying why, for a model that cannot run live: one that normalises whole utterances."""
    if model.frontend_config.normalization == "utterance":
        raise ValueError("this model normalises whole utterances (the paper's preprocessing), so it cannot run "
                         "live: it cannot stream without the whole utterance. Retrain it with --normalization "
                         "speaker, segment or corpus")


class StreamingRecognizer:
    """``push(samples) -> list[Prediction]``, ``reset()``; counters prove each segment is embedded once.

    Counters: ``segments_seen``, ``embedder_calls`` (one per segment batch),
    ``segments_embedded`` (segments through the CNN), ``predictions``.
    """

    def __init__(self, model: EmotionModel, stream: str | None = None, adapt: bool = True, vad: bool = True,
                 partial: bool = True, padding_cache: PaddingCache | None = None):
        check_streamable(model)
        self.model = model.eval()
        self.labels = list(model.labels)
        self.cfg = model.frontend_config
        self.window = self.cfg.segments_per_utterance
        self.stream = stream
        self.segmenter = SegmentStream(model, adapt=adapt, vad=vad)
        self.partial = partial  # predict from the first segment on, padding the window as training pads
        self.padding_cache = padding_cache or PaddingCache()  # kept across reset(): it depends on the model only
        self.min_speech = MIN_SPEECH_FRACTION if vad else MIN_SPEECH_ACTIVITY
        self.segments_seen = self.embedder_calls = self.segments_embedded = self.predictions = 0
        self.reset()
        if partial and self.padding_cache.size:  # embed the padding segment of a fresh stream now, not in its
            # first hop (where it was the slowest hop of a run); a hit, no CNN call, once a stream of the model has
            with torch.no_grad(), intra_op_threads(1):  # as in a hop (``stream_ser.openmp``)
                self.padding_cache.projections(self.model, [self.padding_segment()])

    def reset(self, adaptation: bool = True) -> None:
        """Forget all audio: the next sample is sample 0 of a new stream. Counters keep counting.

        ``adaptation``: also forget the speaker statistics (back to the corpus's; a new speaker).
        """
        self.segmenter.reset()
        if adaptation:
            self.segmenter.reset_adaptation()
        # the window: its segments' head input projections [dirs, 4H] and the segments, oldest first
        self._projections: deque[torch.Tensor] = deque(maxlen=self.window)
        self._segments: deque[Segment] = deque(maxlen=self.window)
        self._seq = 0
        self._flush_end = -1  # n_samples once the last flush's zeros are in: nothing more to flush then

    def enroll(self, wave: np.ndarray | torch.Tensor) -> Stats:
        """Seed the speaker statistics from a recording of the speaker (see :meth:`SegmentStream.enroll`)."""
        return self.segmenter.enroll(wave)

    @property
    def adaptation(self) -> RunningStats | None:
        """The stream's running speaker statistics (None unless the model uses ``speaker`` normalisation)."""
        return self.segmenter.adaptation

    def push(self, samples: np.ndarray, arrival: float | None = None) -> list[Prediction]:
        """Feed samples (16 kHz mono float32, int16, or [N, channels]; any length); get the predictions they complete.
        Runs on one intra-op thread but for CNN batches worth more (``stream_ser.openmp``)."""
        with intra_op_threads(1):
            return self._push(samples, arrival)

    def _push(self, samples: np.ndarray, arrival: float | None) -> list[Prediction]:
        segs = self.segmenter.push(samples, arrival)
        if not segs:
            return []
        # one segment completing a partial window (the usual live hop): its padding segment, normalised
        # with the statistics of this moment as in predict_window, rides in the same embedder batch
        # (one call of 2 instead of 2 calls of 1: FC6/FC7's weights are read once)
        # (and none at all when the padding segment is one embedded before: PaddingCache)
        pad_feat = (self.padding_segment() if len(segs) == 1 and self.partial and len(self._segments) + 1 < self.window
                    else None)
        pad = self.padding_cache.get(pad_feat) if pad_feat is not None else None
        if pad is not None:
            pad_feat = None
        projections, embed_ms = self.embed_segments([s.features for s in segs], pad_feat)
        if pad_feat is not None:
            pad = projections.pop()
            self.padding_cache.put(pad_feat, pad)
        out = []
        for seg, proj in zip(segs, projections):
            if self.add_segment(seg, proj, embed_ms):
                out.append(self.predict_window(pad))
        return out

    def embed_segments(self, features: list[torch.Tensor],
                       padding: torch.Tensor | None = None) -> tuple[list[torch.Tensor], float]:
        """One embedder call for segments [C, M, L] (and a padding segment after them, not counted as a
        segment) -> (head input projections [dirs, 4H], ms)."""
        t0 = time.perf_counter()
        proj = embed_and_project(self.model, features + ([padding] if padding is not None else []))
        self.embedder_calls += 1
        self.segments_embedded += len(features)
        return list(proj), 1e3 * (time.perf_counter() - t0)

    def add_segment(self, seg: Segment, proj: torch.Tensor, embed_ms: float) -> bool:
        """Cache one embedded segment; True when a prediction is due (the window is full, or
        ``partial`` and this is one of the first 7 segments since the start or a reset)."""
        self.segments_seen += 1
        seg.embed_ms = embed_ms
        self._projections.append(proj)
        self._segments.append(seg)
        return len(self._segments) == self.window or self.partial

    def window_projections(self, padding: torch.Tensor | None = None) -> torch.Tensor:
        """The current window's projections [8, dirs, 4H], oldest first; a window not yet full is completed
        with the projection of a padding segment (what a zero-padded utterance gives in training).
        ``padding``: that projection when the caller has embedded it already (the engine, in one batch)."""
        return torch.stack(self.window_projection_list(padding))

    def window_projection_list(self, padding: torch.Tensor | None = None) -> list[torch.Tensor]:
        """:meth:`window_projections` as a list of 8 [dirs, 4H] (an engine stacks many windows' in one call)."""
        proj = list(self._projections)
        if len(proj) < self.window:
            pad = (padding if padding is not None
                   else self.padding_cache.projections(self.model, [self.padding_segment()])[0])
            proj += [pad] * (self.window - len(proj))
        return proj

    @property
    def window_is_full(self) -> bool:
        return len(self._segments) == self.window

    def padding_segment(self) -> torch.Tensor:
        """The segment of digital silence (log-Mel at the floor, zero deltas), normalised with the
        statistics of the moment [C, M, L]: embedded once per partial window."""
        return padding_segments([self])[0]

    def flush_samples(self) -> int:
        """How many zeros complete every segment that holds a sample heard, so that the end of a source
        yields a final window padded as a short utterance is offline (where the 3 s window's zero padding
        completes every segment that starts before the audio ends); 0 if nothing is pending."""
        cfg, seg = self.cfg, self.segmenter
        n = seg.n_samples
        if n == 0 or n == self._flush_end:
            return 0  # nothing heard, or only the padding of the last flush since
        # the last segment that starts before sample n (segments overlap: sample n-1 lies in up to two)
        last = (n - 1) // cfg.shift_samples
        if last < seg.next_segment:
            return 0  # already made
        zeros = last * cfg.shift_samples + cfg.segment_samples - n
        self._flush_end = n + zeros
        return zeros

    def flush(self) -> list[Prediction]:
        """End of the stream: predictions for the audio after the last full segment (see :meth:`flush_samples`)."""
        n = self.flush_samples()
        return self.push(np.zeros(n, np.float32)) if n else []

    def predict_window(self, padding: torch.Tensor | None = None) -> Prediction:
        """Run the head over the cached window (call when :meth:`add_segment` returned True); ``padding``:
        the padding segment's projection if already embedded (see :meth:`window_projections`)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            logits, alpha = self.model.head.infer(self.window_projections(padding)[None])
            probs = self.model.probabilities(logits)[0].cpu().tolist()
        return self.make_prediction(probs, alpha[0].cpu().tolist(), 1e3 * (time.perf_counter() - t0))

    def make_prediction(self, probs: list[float], alpha: list[float], head_ms: float) -> Prediction:
        """The prediction for the cached window from the head's class probabilities [K] and attention over
        its segments [8], as lists (an engine converts a whole batch's in one call each)."""
        segs = self._segments
        first, last = segs[0], segs[-1]
        sr = self.cfg.sample_rate
        top = max(range(len(probs)), key=probs.__getitem__)  # the first of equal maxima, as np.argmax
        activity = math.fsum(s.activity for s in segs) / len(segs)
        speech = activity >= self.min_speech
        self._seq += 1
        self.predictions += 1
        return Prediction(
            seq=self._seq,
            window_start_s=first.index * self.cfg.shift_samples / sr,
            window_end_s=(last.index * self.cfg.shift_samples + self.cfg.segment_samples) / sr,
            probabilities=dict(zip(self.labels, probs)),
            label=self.labels[top] if speech else None, confidence=probs[top],
            attention=list(alpha),
            speech_activity=activity,
            level_dbfs=last.level_dbfs,
            timings_ms={"frontend": last.frontend_ms, "embed": last.embed_ms, "head": head_ms,
                        "total": 1e3 * (time.perf_counter() - last.arrival)},
            stream=self.stream,
            t_arrival=time.time() - (time.perf_counter() - last.arrival),
            adaptation=last.adaptation,
            speech=speech,
            partial=len(segs) < self.window,
        )

    @property
    def counters(self) -> dict[str, int]:
        return {"segments_seen": self.segments_seen, "segments_embedded": self.segments_embedded,
                "embedder_calls": self.embedder_calls, "predictions": self.predictions}


def warm_up(model: EmotionModel, vad: bool = True) -> list[Prediction]:
    """Run one throwaway stream through the live path, hop by hop, over a full window and a hop more of quiet
    noise (partial windows of 1 to 7 segments, then full ones), so that the first real stream does not pay
    the one-time costs of these shapes: oneDNN's primitives on a CPU, cuDNN's plans and the allocator's
    pools on a GPU (where partial-window hops carried one stream's p99 outliers, 2026-11-26). Nothing of it
    is kept: its recognizer, padding cache and statistics are its own. Returns its predictions; ValueError for a
    model that cannot run live (:func:`check_streamable`)."""
    cfg = model.frontend_config
    n = cfg.segment_samples + cfg.segments_per_utterance * cfg.shift_samples
    noise = np.random.default_rng(0).normal(0.0, 0.01, n).astype(np.float32)
    rec = StreamingRecognizer(model, stream="warm-up", vad=vad, padding_cache=PaddingCache())
    return [p for i in range(0, n, cfg.shift_samples) for p in rec.push(noise[i:i + cfg.shift_samples])]
