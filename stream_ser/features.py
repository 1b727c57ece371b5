"""The front-end: waveform -> log-Mel frames -> 3-channel segments -> CNN images.

One ``nn.Module`` used by training, offline evaluation and the live recognizer,
so that every stage sees the same numbers. Window and Mel filterbank are buffers
(``.to(device)`` moves them); every method is batched.

Two choices keep streaming exactly equal to offline (DESIGN.md invariants 1-2):

- Frames are cut first and pre-emphasis is applied *inside each 25 ms frame*
  (``y[0] = x[0]``, ``y[n] = x[n] - 0.97 x[n-1]``, as Kaldi does), so a frame is a
  function of its own 400 samples. With whole-signal pre-emphasis the first frame
  of a window would depend on the sample before the window, and the live window
  could never equal the offline one exactly. Only one sample per frame differs
  from the paper's filter, at the window's tapered edge.
- Deltas are computed inside each 64-frame segment with replicated edges and the
  normalisation is per segment (default) or from corpus statistics, never per
  utterance, so a segment depends on its own 655 ms only and can be embedded once.

Frame ``t`` covers samples ``[t*hop, t*hop + win)``. The 400-sample windowed frame
is zero-padded to 512 for the FFT; the power spectrum equals librosa's (which
centres the window in the 512 frame) because the two differ by a circular shift.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import nn

from .config import FrontendConfig


# A channel flatter than this (std in log-Mel units) carries no information: digital silence or the
# zero padding of a short utterance, whose log-Mel is the constant log floor. Dividing its float
# rounding residue (about 1e-6, and different on CPU and CUDA) by a std near 0 would turn it into
# O(1) noise, so the scale is floored. Real audio's channels vary by far more (>0.05).
MIN_NORM_STD = 1e-2


def _scale(std: torch.Tensor, eps: float) -> torch.Tensor:
    """The normalisation divisor: std + eps, floored at MIN_NORM_STD (flat channels stay ~0)."""
    return (std + eps).clamp_min(MIN_NORM_STD)


def _deltas(x: torch.Tensor, n: int) -> torch.Tensor:
    """Regression deltas along the last axis with replicated edges: sum_k k (x[t+k] - x[t-k]) / (2 sum_k k^2),
    k = 1..n (torchaudio's ``compute_deltas`` with ``mode="replicate"``, to float rounding; as slices
    instead of a 1-channel conv1d over every row, which costs half as much again here). x: [..., L]."""
    lead, L = x.shape[:-1], x.shape[-1]
    p = F.pad(x.reshape(-1, 1, L), (n, n), mode="replicate").reshape(*lead, L + 2 * n)
    out = sum(k * (p[..., n + k: n + k + L] - p[..., n - k: n - k + L]) for k in range(1, n + 1))
    return out / (2 * sum(k * k for k in range(1, n + 1)))


def frame_mean_square(frames: torch.Tensor) -> torch.Tensor:
    """[..., win] raw frames -> [...] their mean square in float64 (the level meter's and the energy
    gate's measure: the same numbers whether a recording is framed whole or a stream hop by hop). The norm
    accumulates in float64 without a float64 copy of the frames (half the time of squaring one, and at 512
    live streams that copy was 52 MB a hop)."""
    return torch.linalg.vector_norm(frames, dim=-1, dtype=torch.float64).square() / frames.shape[-1]


def _split_rows(a: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """``a`` [sum counts, ...] -> views of its consecutive row blocks, ``counts[i]`` rows each (np.split's
    own bookkeeping cost more than the slicing, a stream a hop)."""
    ends = np.cumsum(counts).tolist()
    return [a[e - c:e] for e, c in zip(ends, counts)]


def _window_starts(sizes: np.ndarray, counts: np.ndarray, stride: int) -> np.ndarray:
    """Items of ``sizes`` [I] elements laid end to end, each cut into ``counts`` [I] windows every ``stride``
    elements -> every window's first element in the joined sequence [sum counts]: item i's window k starts
    at (sizes before i) + k stride."""
    first = np.cumsum(counts) - counts
    return (np.repeat(np.cumsum(sizes) - sizes, counts)
            + stride * (np.arange(int(counts.sum())) - np.repeat(first, counts)))


class Frontend(nn.Module):
    """Log-Mel / delta / delta-delta segments and their CNN images.

    Shapes: ``B`` batch, ``N`` samples (16 kHz, float in [-1, 1]), ``T`` frames,
    ``S`` segments, ``C`` channels (1-3), ``M`` = 64 Mel bins, ``L`` = 64 frames
    per segment.
    """

    def __init__(self, config: FrontendConfig | None = None):
        super().__init__()
        self.config = cfg = config or FrontendConfig()
        self.register_buffer("window", torch.hamming_window(cfg.win_length, periodic=True), persistent=False)
        fb = AF.melscale_fbanks(
            n_freqs=cfg.n_fft // 2 + 1, f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels,
            sample_rate=cfg.sample_rate, norm=cfg.mel_norm, mel_scale=cfg.mel_scale,
        )  # [F, M]
        self.register_buffer("mel_fb", fb, persistent=False)
        # corpus-level statistics per channel and Mel bin (used when normalization == "corpus")
        self.register_buffer("norm_mean", torch.zeros(3, cfg.n_mels))
        self.register_buffer("norm_std", torch.ones(3, cfg.n_mels))

    # --- frames ------------------------------------------------------------------
    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Natural log of Mel power, floored at ``config.log_floor``.

        wave: [B, N] or [N] float -> [B, M, T] with T = 1 + (N - 400) // 160 (0 if N < 400).
        """
        cfg = self.config
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        wave = wave.to(self.window.dtype)
        if wave.shape[-1] < cfg.win_length:
            return wave.new_zeros(wave.shape[0], cfg.n_mels, 0)
        frames = wave.unfold(-1, cfg.win_length, cfg.hop_length)  # [B, T, win]
        return self._log_mel_frames(frames).transpose(1, 2)

    def _log_mel_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """[..., win] raw frames -> [..., M] log-Mel (pre-emphasis inside each frame, window, FFT, Mel, log)."""
        cfg = self.config
        win = cfg.win_length
        # pre-emphasis, window and the FFT's zero padding in one buffer, two passes over the frames:
        # buf[n] = w[n] x[n] - a w[n] x[n-1] for n >= 1, buf[0] = w[0] x[0], buf[win:] = 0 (the same
        # numbers as preemphasis, then window, then rfft(n=n_fft), without the three intermediate copies)
        buf = frames.new_zeros(*frames.shape[:-1], cfg.n_fft)
        torch.mul(frames, self.window, out=buf[..., :win])
        if cfg.preemphasis:
            buf[..., 1:win].addcmul_(frames[..., :-1], self.window[1:], value=-cfg.preemphasis)
        spec = torch.fft.rfft(buf)  # [..., F]
        power = spec.real.square() + spec.imag.square()
        return (power @ self.mel_fb).clamp_min_(cfg.log_floor).log_()  # [..., M]

    def log_mel_many(self, waves, energy: bool = False, host: bool = False):
        """Several waveforms (a list of [N_i]) -> their log-Mel frames, a list of [T_i, M] (:meth:`log_mel`
        of each, transposed), through one FFT and one filterbank product: a frame depends on its own
        samples only, so batching changes nothing but the number of calls. The waveforms are joined on the
        host and moved in one copy (one per waveform was a transfer per live stream a hop on a GPU).

        ``energy``: also each frame's mean square (:func:`frame_mean_square`, [T_i] float64 on the CPU) ->
        (log-Mel list, energy list): the live level meter's, from the same frames in one call.

        ``host``: numpy arrays instead (float32 [T_i, M]; energies float64 [T_i]), brought to the host in one
        copy: a live engine keeps its streams' frames there (a tensor call per stream a hop, each a kernel
        launch on a GPU, was what its frame buffers cost)."""
        cfg = self.config
        frames, counts = self._frames_many(waves)  # [sum T_i, win], [T_i]
        log_mel = self._log_mel_frames(frames) if len(frames) else self.window.new_zeros(0, cfg.n_mels)
        if host:  # one copy to the host for all waveforms, split there (views, no tensor call per waveform)
            log_mel = _split_rows(log_mel.cpu().numpy(), counts)
        else:
            log_mel = list(log_mel.split(counts))  # [T_i, M] each
        if not energy:
            return log_mel
        ms = frame_mean_square(frames).cpu()
        return log_mel, _split_rows(ms.numpy(), counts) if host else list(ms.split(counts))

    def _frames_many(self, waves) -> tuple[torch.Tensor, list[int]]:
        """Waveforms (a list of [N_i], numpy arrays or tensors) -> every one's STFT frames, one after
        another, on the front-end's device [sum T_i, win], and the frame counts [T_i]. A fixed number of
        calls for any number of waveforms: the samples are joined on the host and moved in one copy, and
        the frames are gathered from them by their start indices, computed on the host."""
        cfg = self.config
        if not waves:
            return self.window.new_zeros(0, cfg.win_length), []
        if isinstance(waves[0], np.ndarray):
            joined = torch.from_numpy(np.concatenate([w.reshape(-1) for w in waves]).astype(np.float32, copy=False))
            lengths = np.fromiter((w.size for w in waves), np.int64, len(waves))
        else:
            flat = [w if w.dim() == 1 else w.reshape(-1) for w in waves]  # (no view per file where none is needed)
            joined = torch.cat(flat) if len(flat) > 1 else flat[0]
            lengths = np.fromiter((w.numel() for w in waves), np.int64, len(waves))
        counts = np.where(lengths >= cfg.win_length, 1 + (lengths - cfg.win_length) // cfg.hop_length, 0)
        starts = _window_starts(lengths, counts, cfg.hop_length)  # frame j of waveform i: its j-th hop
        joined = joined.to(self.window)
        if len(joined) < cfg.win_length:
            return self.window.new_zeros(0, cfg.win_length), counts.tolist()
        frames = joined.unfold(0, cfg.win_length, 1)[torch.from_numpy(starts).to(joined.device)]
        return frames, counts.tolist()

    def segments_many(self, waves, stats=None) -> list[torch.Tensor]:
        """Whole files of any lengths at once: a list of [N_i] -> a list of segments [S_i, C, M, L], each
        equal to ``segments(wave)[0]``. The frames of every file go through one FFT and one filterbank
        product, and the segments of every file through one delta and one normalisation call, so a corpus
        costs a few large operations instead of a few small ones per file. The segments are gathered from
        the joined log-Mel frames by start indices computed on the host (as :meth:`_frames_many` gathers
        frames), not cut file by file: four views per file were most of a call's host time for a whole
        corpus, which on a GPU is what bounds it. ``stats`` as in :meth:`normalize` (one speaker's, shared
        by all the files)."""
        cfg = self.config
        frames, counts = self._frames_many(waves)  # [sum T_i, win], [T_i]
        n_segs = [cfg.segments_for_frames(t) for t in counts]
        total = sum(n_segs)
        if not total:
            return [self.window.new_zeros(0, cfg.channels, cfg.n_mels, cfg.segment_frames) for _ in n_segs]
        log_mel = self._log_mel_frames(frames)  # [sum T_i, M]
        # segment k of file i: its k-th shift of frames
        starts = _window_starts(np.asarray(counts, np.int64), np.asarray(n_segs, np.int64), cfg.segment_shift)
        windows = log_mel.unfold(0, cfg.segment_frames, 1)  # [sum T_i - L + 1, M, L], a view
        # index_select writes a contiguous result (indexing would keep the view's frame-major strides, and
        # the deltas' reshape would copy it again)
        static = torch.index_select(windows, 0, torch.from_numpy(starts).to(log_mel.device))  # [sum S_i, M, L]
        return list(self.normalize(self._with_deltas(static), stats).split(n_segs))

    def _with_deltas(self, static: torch.Tensor) -> torch.Tensor:
        """[..., M, L] static segments -> [..., C, M, L] with delta and delta-delta inside each segment."""
        cfg = self.config
        chans = [static]
        if cfg.channels >= 2:
            chans.append(_deltas(static, cfg.delta_n))
        if cfg.channels >= 3:
            chans.append(_deltas(chans[1], cfg.delta_n))
        return torch.stack(chans, dim=-3)

    # --- segments ----------------------------------------------------------------
    def raw_segments_from_log_mel(self, log_mel: torch.Tensor) -> torch.Tensor:
        """[B, M, T] -> un-normalised segments [B, S, C, M, L]; deltas inside each segment."""
        cfg = self.config
        B, M, T = log_mel.shape
        S = cfg.segments_for_frames(T)
        if S == 0:
            return log_mel.new_zeros(B, 0, cfg.channels, M, cfg.segment_frames)
        static = log_mel.unfold(-1, cfg.segment_frames, cfg.segment_shift)  # [B, M, S, L]
        return self._with_deltas(static.permute(0, 2, 1, 3))  # [B, S, C, M, L]

    def segments_from_log_mel(self, log_mel: torch.Tensor, stats=None) -> torch.Tensor:
        """[B, M, T] -> normalised segments [B, S, C, M, L]; ``stats`` as in :meth:`normalize`."""
        return self.normalize(self.raw_segments_from_log_mel(log_mel), stats)

    def segments(self, wave: torch.Tensor, stats=None) -> torch.Tensor:
        """wave [B, N] -> segments [B, S, C, 64, 64] (64 frames every 32)."""
        return self.segments_from_log_mel(self.log_mel(wave), stats)

    def normalize(self, seg: torch.Tensor, stats=None) -> torch.Tensor:
        """The one normalisation both packages use; seg [..., C, M, L] (un-normalised).

        ``segment``: per channel over the segment's M x L values; ``corpus``:
        per channel and Mel bin with the stored statistics; ``speaker``: per
        channel and Mel bin with ``stats`` = (mean, std) of the speaker, each
        [C, M] (one speaker) or [B, C, M] (one per item of a [B, S, C, M, L]
        batch); without ``stats`` the stored corpus statistics (the live
        warm-up); ``utterance`` and ``none``: unchanged (the paper standardises
        the waveform instead, see :meth:`prepare_utterance`).
        """
        cfg = self.config
        if cfg.normalization == "segment":
            # two passes (mean, then the centred values' mean square): as exact as Tensor.std, whose
            # multi-dimension reduction is 15x slower on the CPU and was a third of the front-end's time
            centred = seg - seg.mean(dim=(-2, -1), keepdim=True)
            std = centred.square().mean(dim=(-2, -1), keepdim=True).sqrt()
            return centred / _scale(std, cfg.norm_eps)
        if cfg.normalization == "speaker" and stats is not None:
            mean, std = (t.to(seg) for t in stats)
            if mean.dim() == 3:  # one per batch item: [B, C, M] -> [B, 1.., C, M, 1]
                shape = (mean.shape[0],) + (1,) * (seg.dim() - 4) + mean.shape[1:] + (1,)
                mean, std = mean.reshape(shape), std.reshape(shape)
            else:
                mean, std = mean[..., None], std[..., None]
            return self._floor_silence((seg - mean) / _scale(std, cfg.norm_eps))
        if cfg.normalization in ("corpus", "speaker"):
            C = seg.shape[-3]
            mean = self.norm_mean[:C, :, None]
            std = self.norm_std[:C, :, None]
            return self._floor_silence((seg - mean) / _scale(std, cfg.norm_eps))
        return seg

    def _floor_silence(self, z: torch.Tensor) -> torch.Tensor:
        """``silence_floor`` > 0: normalised static values under -floor become -floor, and their
        deltas 0 (a flat region's), elementwise per Mel bin and frame; z [..., C, M, L]."""
        floor = self.config.silence_floor
        if not floor:
            return z
        quiet = z[..., :1, :, :] < -floor  # [..., 1, M, L], broadcast over the delta channels
        return torch.cat([z[..., :1, :, :].clamp_min(-floor), z[..., 1:, :, :].masked_fill(quiet, 0.0)], dim=-3)

    def set_corpus_stats(self, raw_segments: torch.Tensor) -> None:
        """Fit the stored statistics on un-normalised segments [..., C, M, L].

        ``corpus``: all frames; ``speaker``: speech frames only, as the speaker
        statistics are (they are the live warm-up, see ``stream_ser.adaptation``).
        """
        C = raw_segments.shape[-3]
        x = raw_segments.reshape(-1, C, raw_segments.shape[-2], raw_segments.shape[-1])
        self.norm_mean.zero_()
        self.norm_std.fill_(1.0)
        if self.config.normalization == "speaker":
            from .adaptation import speaker_stats
            st = speaker_stats(x)
            self.norm_mean[:C] = st.mean.to(self.norm_mean)
            self.norm_std[:C] = st.std.to(self.norm_std)
            return
        self.norm_mean[:C] = x.mean(dim=(0, 3)).to(self.norm_mean)
        self.norm_std[:C] = x.std(dim=(0, 3)).to(self.norm_std)

    def corpus_stats(self):
        """The stored statistics as ``stream_ser.adaptation.Stats`` ([C, M] each)."""
        from .adaptation import Stats
        C = self.config.channels
        return Stats(self.norm_mean[:C].detach().cpu().clone(), self.norm_std[:C].detach().cpu().clone(), 0.0)

    # --- images ------------------------------------------------------------------
    def images(self, segments: torch.Tensor) -> torch.Tensor:
        """[..., C, M, L] -> [..., C, size, size] by bilinear interpolation (no-op if already that size)."""
        size = self.config.image_size
        lead = segments.shape[:-3]
        x = segments.reshape(-1, *segments.shape[-3:])
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.reshape(*lead, *x.shape[-3:])

    # --- utterances --------------------------------------------------------------
    def prepare_utterance(self, wave: torch.Tensor) -> torch.Tensor:
        """One utterance [N] -> [utterance_samples]: truncated or zero-padded at the end.

        With ``normalization == "utterance"`` the waveform is first standardised to
        zero mean and unit variance (the paper's preprocessing; offline only).
        """
        cfg = self.config
        wave = wave.reshape(-1).to(self.window.dtype)
        if cfg.start_at_speech:
            wave = wave[self.speech_onset(wave):]
        if cfg.normalization == "utterance" and wave.numel() > 1:
            wave = (wave - wave.mean()) / (wave.std() + cfg.norm_eps)
        n = cfg.utterance_samples
        if wave.numel() >= n:
            return wave[:n]
        return F.pad(wave, (0, n - wave.numel()))

    def speech_onset(self, wave: torch.Tensor) -> int:
        """First sample of the 3 s window with ``start_at_speech``: ``ONSET_MARGIN_S`` before the first
        10 ms frame whose RMS is above ``ONSET_DBFS`` (or, with ``onset_below_peak_db``, within that many
        dB of the loudest frame's; 0 when there is none). wave: [N]."""
        from .config import ONSET_DBFS, ONSET_MARGIN_S
        cfg = self.config
        if wave.numel() < cfg.win_length:
            return 0
        frames = wave.unfold(0, cfg.win_length, cfg.hop_length)
        power = frames.square().mean(dim=1)
        if cfg.onset_below_peak_db:
            threshold = power.max() * 10 ** (-cfg.onset_below_peak_db / 10)  # digital silence: 0, no onset
        else:
            threshold = 10 ** (ONSET_DBFS / 10)
        loud = (power > threshold).nonzero()
        if loud.numel() == 0:
            return 0
        return max(0, int(loud[0, 0]) * cfg.hop_length - int(ONSET_MARGIN_S * cfg.sample_rate))

    def utterance_segments(self, waves: list[torch.Tensor] | torch.Tensor, stats=None) -> torch.Tensor:
        """Utterances (list of [N_i] or [B, N]) -> [B, 8, C, M, L]; ``stats`` as in :meth:`normalize`."""
        batch = torch.stack([self.prepare_utterance(w.to(self.window.device)) for w in waves])
        return self.segments(batch, stats)

