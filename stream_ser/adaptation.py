"""Speaker statistics for the ``speaker`` normalisation (beyond the paper).

Each channel (log-Mel, delta, delta-delta) and Mel bin of a segment is
standardised with the mean and standard deviation of *that speaker's* speech
frames, so contrasts within a speaker (loudness, spectral tilt, pitch range)
survive while the speaker's voice and the microphone drop out. This is what
lifts a classic eGeMAPS + SVM from 63 to 80 % UAR on EMO-DB.

Where the statistics come from:

- **offline** (:func:`speaker_stats`): all segments of the speaker's own
  utterances as the model sees them (the 3 s windows), speech frames only, no
  labels — for the training, validation and test speakers alike; like an
  enrolment recording would give.
- **live** (:class:`RunningStats`): one object per stream, updated with every
  segment as it completes (speech frames only), before that segment is
  normalised with the statistics then current; the segment is then embedded
  once (DESIGN.md invariant 3). It starts from the training corpus statistics
  (stored in the checkpoint) weighted as ``prior_frames`` frames of speech, so
  the first predictions are sensible and the speaker's own statistics take over
  as speech arrives. ``enroll()`` seeds it from a recording; ``reset()`` goes
  back to the corpus; ``frozen`` stops updates (then streaming equals offline
  exactly, DESIGN.md invariant 1).

Which frames count as speech:

- **offline training and evaluation** (no speech detector): a frame whose total
  log-Mel power (log-sum-exp over the Mel bins of the static channel) is above
  :data:`SPEECH_GATE_LOG_POWER`, about -55 dBFS frame RMS, which leaves out
  digital silence, the zero padding of short utterances and quiet pauses of
  these studio recordings;
- **live, enrolment and whole files with a speech detector** (silero-vad, the
  default): the frames of the 32 ms chunks the detector called speech (or has
  no verdict on yet), and no level threshold but one that leaves out digital
  silence (:data:`DIGITAL_SILENCE_LOG_POWER`, about -92 dBFS). A room's fan,
  keyboard or music is often louder than
  -55 dBFS (the detector keeps it out), and a quiet microphone puts speech under
  it: with the level gate, a stream 20 dB quieter kept half its speech frames,
  so its statistics, and its answers, moved with the microphone's gain. On the
  studio corpora at their recorded level the two definitions agree on nearly
  every frame, so the statistics a model was trained with are the ones it gets.

While a stream has seen little speech, the corpus prior it pools with follows the
speaker's level (:meth:`RunningStats.current`): a gain shifts every static
log-Mel bin by one constant, so only the prior's spectral shape and spread are
taken, not the corpus's recording level. Statistics are over frames of the segments, so the
overlap of consecutive segments counts most frames twice, identically offline and live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# --- constants ----------------------------------------------------------------------
SPEECH_GATE_LOG_POWER = -9.5  # natural log of summed Mel power; ~ -55 dBFS frame RMS (EMO-DB and RAVDESS speech)
DIGITAL_SILENCE_LOG_POWER = -18.0  # ~ -92 dBFS: with a speech detector, only digital silence and padding are out
PRIOR_FRAMES = 300.0  # live warm-up: corpus statistics count as 3 s of speech frames
MIN_FRAMES = 2.0  # fewer speech frames than this: statistics fall back to the prior
STD_FLOOR = 1e-3  # a bin that never varied does not blow up


def speech_frames(raw: torch.Tensor) -> torch.Tensor:
    """Un-normalised segments [..., C, M, L] -> bool mask [..., L] of the frames that count as speech."""
    return torch.logsumexp(raw[..., 0, :, :], dim=-2) > SPEECH_GATE_LOG_POWER


def _moments(raw: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speech-frame count, sum and sum of squares per channel and Mel bin ([], [C, M], [C, M]; float64).

    ``mask`` ([..., L] bool, as ``raw`` without C and M): the frames a speech detector kept, which then
    count instead of those over the level gate (digital silence excepted)."""
    C, M, L = raw.shape[-3:]
    n, s, ss = moments_each(raw.reshape(-1, C, M, L), None if mask is None else mask.reshape(-1, L))
    return n.sum(), s.sum(dim=0), ss.sum(dim=0)


def moments_each(raw: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_moments` of each of N segments [N, C, M, L] at once: counts [N], sums and sums of squares
    [N, C, M] (float64); ``mask`` [N, L] as there. What :meth:`RunningStats.add` takes.

    Each segment's sums over its L = 64 frames are taken in float32, as two batched matrix-vector products
    (relative error about 1e-7: a sum of 64 values), and handed on in float64, in which the running sums
    accumulate over segments. Elementwise products and sums in float64 cost 9x as much: 47 ms of a 416-stream
    engine hop on this 2-core CPU, a sixth of its recognizer thread's time (bench.server_capacity under py-spy)."""
    x = raw.float()
    N, C, M, L = x.shape
    if mask is None:
        keep = speech_frames(x)
    else:
        keep = mask.to(x.device).bool() & (torch.logsumexp(x[:, 0], dim=-2) > DIGITAL_SILENCE_LOG_POWER)
    w = keep.float()[:, :, None]  # [N, L, 1]
    rows = x.reshape(N, C * M, L)
    s = torch.bmm(rows, w).view(N, C, M)
    ss = torch.bmm(rows.square(), w).view(N, C, M)
    return w.sum(dim=(1, 2)).double(), s.double(), ss.double()


@dataclass
class Stats:
    """Mean and standard deviation per channel and Mel bin ([C, M] each) and the speech frames they saw."""

    mean: torch.Tensor
    std: torch.Tensor
    frames: float

    @property
    def speech_s(self) -> float:
        """Seconds of speech behind the statistics (10 ms frames; overlapping segments count twice)."""
        return self.frames * 0.01 / 2.0


def speaker_stats(raw: torch.Tensor, prior: Stats | None = None, mask: torch.Tensor | None = None) -> Stats:
    """Statistics of one speaker from all their un-normalised segments [..., C, M, L] (speech frames only;
    ``mask`` [..., L]: also only the frames a speech detector kept).

    With fewer than :data:`MIN_FRAMES` speech frames, ``prior`` is returned (or zeros/ones).
    """
    n, s, ss = _moments(raw, mask)
    if float(n) < MIN_FRAMES:
        if prior is not None:
            return prior
        C, M = raw.shape[-3:-1]
        return Stats(torch.zeros(C, M), torch.ones(C, M), 0.0)
    mean = s / n
    std = (ss / n - mean.square()).clamp_min(0).sqrt().clamp_min(STD_FLOOR)
    return Stats(mean.float(), std.float(), float(n))


def stats_by_group(raw: torch.Tensor, groups: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-utterance statistics from each utterance's group (speaker).

    raw: [U, S, C, M, L] un-normalised; groups: U speaker names ->
    (mean [U, C, M], std [U, C, M]), every utterance of a speaker getting that
    speaker's statistics over all their utterances.
    """
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    C, M = raw.shape[-3:-1]
    mean = raw.new_zeros(len(groups), C, M)
    std = raw.new_ones(len(groups), C, M)
    for idx in index.values():
        st = speaker_stats(raw[idx])
        mean[idx] = st.mean.to(raw)
        std[idx] = st.std.to(raw)
    return mean, std


class RunningStats:
    """Per-stream running statistics, starting from a prior (the corpus statistics).

    ``update(raw_segment [C, M, L])`` adds the segment's speech frames;
    ``current()`` gives the :class:`Stats` to normalise with. Sums are kept in
    float64 so hours of audio do not lose precision, and the frame count as a Python float (whole
    numbers, exact to 2**53), so reading it is no tensor operation: an engine hop's tensor operations
    do not grow with its streams (``tests/test_engine.py``).
    """

    def __init__(self, prior: Stats, prior_frames: float = PRIOR_FRAMES):
        self.prior = Stats(prior.mean.double().cpu(), prior.std.double().cpu(), 0.0)
        self.prior_frames = float(prior_frames)
        self.frozen = False
        self.reset()

    def reset(self) -> None:
        """Back to the prior: no speech seen."""
        self._n = 0.0  # speech frames seen
        self._s = torch.zeros_like(self.prior.mean)
        self._ss = torch.zeros_like(self.prior.mean)
        self._cache: Stats | None = None

    @property
    def frames(self) -> float:
        return self._n

    @property
    def speech_s(self) -> float:
        return self._n * 0.01 / 2.0

    def update(self, raw: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the speech frames of un-normalised segments [..., C, M, L] (no-op when frozen); ``mask``
        [..., L]: the frames the stream's speech detector kept (see :func:`_moments`)."""
        if self.frozen:
            return
        self.add(*_moments(raw.detach().cpu(), mask))

    def add(self, n: torch.Tensor, s: torch.Tensor, ss: torch.Tensor) -> None:
        """Add speech-frame moments (count [], sums [C, M], sums of squares [C, M]; from :func:`_moments`
        or one row of :func:`moments_each`); no-op when frozen or when they hold no frame."""
        RunningStats.add_each([self], torch.as_tensor(n).reshape(1), s[None], ss[None])

    @staticmethod
    def add_each(stats: list["RunningStats"], n: torch.Tensor, s: torch.Tensor, ss: torch.Tensor) -> None:
        """Add row k of the moments (counts [N], sums and sums of squares [N, C, M]; from
        :func:`moments_each`) to ``stats[k]``, for N different statistics (an engine hop's streams) in three
        tensor calls instead of three per stream; a frozen one, or a row without a speech frame, adds nothing.
        :meth:`add` is this for one."""
        counts = n.tolist()
        keep = [k for k, st in enumerate(stats) if not st.frozen and counts[k] != 0]
        if not keep:
            return
        mine = [stats[k] for k in keep]
        s_rows, ss_rows = s.unbind(0), ss.unbind(0)
        torch._foreach_add_([st._s for st in mine], [s_rows[k] for k in keep])
        torch._foreach_add_([st._ss for st in mine], [ss_rows[k] for k in keep])
        for k, st in zip(keep, mine):
            st._n += counts[k]
            st._cache = None

    def enroll(self, raw: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Replace everything seen so far with an enrolment recording's segments [..., C, M, L]."""
        self.reset()
        self.update(raw, mask)

    def current(self) -> Stats:
        """Prior and speech seen so far, pooled: the prior weighs as ``prior_frames`` frames.

        Once speech has been seen, the prior's static channel (0) is moved to the speaker's level: by
        the mean over Mel bins of (speaker mean - prior mean). A microphone's gain adds one constant to
        every static log-Mel bin; without the shift the corpus prior would pull a quiet or loud stream's
        statistics towards the corpus's recording level for its first minutes, and its answers with them.
        The deltas do not depend on the level."""
        if self._cache is None:
            RunningStats.current_each([self])
        return self._cache

    @staticmethod
    def current_each(stats: list["RunningStats"]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`current` of many streams' statistics in one set of tensor operations (an engine hop
        normalises every stream's new segment at once; per stream, these were 15 small operations) ->
        (mean, std) [N, C, M] float32. Each one's :meth:`current` is then cached."""
        todo = [st for st in stats if st._cache is None]
        if todo:
            pm = torch.stack([st.prior.mean for st in todo])  # [n, C, M] float64
            ps = torch.stack([st.prior.std for st in todo])
            n0 = torch.tensor([st.prior_frames for st in todo], dtype=torch.float64)[:, None, None]
            n = torch.tensor([st._n for st in todo], dtype=torch.float64)[:, None, None]
            s = torch.stack([st._s for st in todo])
            ss = torch.stack([st._ss for st in todo])
            seen = n[:, 0] > 0  # [n, 1]
            shift = (s[:, 0] / torch.where(seen, n[:, 0], 1.0)).mean(dim=-1, keepdim=True) \
                - pm[:, 0].mean(dim=-1, keepdim=True)  # [n, 1]
            prior_mean = pm.clone()
            prior_mean[:, 0] += torch.where(seen, shift, 0.0)  # the level shift, once speech was seen
            tot = n0 + n
            mean = (n0 * prior_mean + s) / tot
            var = (n0 * (ps.square() + prior_mean.square()) + ss) / tot - mean.square()
            std = var.clamp_min(0).sqrt().clamp_min(STD_FLOOR)
            nothing = (tot <= 0)  # no prior weight and no speech: the prior itself
            mean, std = torch.where(nothing, pm, mean).float(), torch.where(nothing, ps, std).float()
            # each one's own copy (a view would keep the whole batch alive), made by numpy: the statistics
            # live on the host whatever the model's device, and a tensor operation per stream is what an
            # engine hop must not have (a kernel launch each where they run on a GPU; tests/test_engine.py)
            mean_rows, std_rows = mean.numpy(), std.numpy()
            for k, st in enumerate(todo):
                st._cache = Stats(torch.from_numpy(mean_rows[k].copy()), torch.from_numpy(std_rows[k].copy()), st._n)
            if len(todo) == len(stats):
                return mean, std
        return torch.stack([st._cache.mean for st in stats]), torch.stack([st._cache.std for st in stats])
