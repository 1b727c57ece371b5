"""The front-end against librosa and independent formulas, on real EMO-DB audio."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from stream_ser.audio import load_audio
from stream_ser.config import FrontendConfig
from stream_ser.features import Frontend




def _some_files(emodb_dir, n=4):
    return sorted((emodb_dir / "wav").glob("*.wav"))[:: 535 // n][:n]


def _librosa_mel(x: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """librosa's Mel power for our framing: the window sits in the middle of its
    512-sample frame, so padding by (512 - 400) / 2 on both sides aligns frame t with
    samples [160 t, 160 t + 400)."""
    pad = (cfg.n_fft - cfg.win_length) // 2
    return librosa.feature.melspectrogram(
        y=np.pad(x.astype(np.float64), pad), sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
        win_length=cfg.win_length, window="hamming", center=False, power=2.0, n_mels=cfg.n_mels,
        fmin=cfg.f_min, fmax=cfg.f_max, htk=False, norm="slaney")


def test_mel_power_matches_librosa(emodb_dir):
    cfg = FrontendConfig(preemphasis=0.0)  # librosa has no per-frame pre-emphasis; tested below
    fe = Frontend(cfg)
    for path in _some_files(emodb_dir):
        x = load_audio(path).numpy()
        ours = fe.log_mel(torch.from_numpy(x))[0].double().numpy()
        ref = _librosa_mel(x, cfg)
        assert ours.shape == ref.shape == (64, cfg.frames_for(len(x)))
        above = ref > 1e3 * cfg.log_floor
        assert above.mean() > 0.95
        np.testing.assert_allclose(np.exp(ours[above]), ref[above], rtol=2e-4, atol=0)
        np.testing.assert_allclose(ours[above], np.log(ref[above]), atol=2e-4)


def test_per_frame_preemphasis_log_mel_matches_numpy_reference(emodb_dir):
    cfg = FrontendConfig()
    fe = Frontend(cfg)
    x = load_audio(_some_files(emodb_dir, 1)[0]).numpy().astype(np.float64)
    T = cfg.frames_for(len(x))
    idx = np.arange(cfg.win_length)[None, :] + cfg.hop_length * np.arange(T)[:, None]
    frames = x[idx]
    pre = frames.copy()
    pre[:, 1:] = frames[:, 1:] - 0.97 * frames[:, :-1]
    win = np.hamming(cfg.win_length + 1)[:-1]  # periodic Hamming, as scipy's get_window
    power = np.abs(np.fft.rfft(pre * win, n=cfg.n_fft)) ** 2
    fb = librosa.filters.mel(sr=16000, n_fft=512, n_mels=64, fmin=20, fmax=8000, htk=False, norm="slaney")
    ref = np.log(np.maximum(power @ fb.T, cfg.log_floor)).T
    ours = fe.log_mel(torch.from_numpy(x).float())[0].double().numpy()
    np.testing.assert_allclose(ours, ref, atol=5e-4)


def _delta_eq2(m: np.ndarray, N: int = 2) -> np.ndarray:
    """Eq. (2) with edges replicated, along the last axis."""
    L = m.shape[-1]
    padded = np.concatenate([np.repeat(m[..., :1], N, -1), m, np.repeat(m[..., -1:], N, -1)], -1)
    num = sum(n * (padded[..., N + n: N + n + L] - padded[..., N - n: N - n + L]) for n in range(1, N + 1))
    return num / (2 * sum(n * n for n in range(1, N + 1)))


def test_segments_are_static_delta_deltadelta_within_each_segment(emodb_dir):
    cfg = FrontendConfig(normalization="none")
    fe = Frontend(cfg)
    x = load_audio(_some_files(emodb_dir, 1)[0])
    lm = fe.log_mel(x)[0].double().numpy()
    seg = fe.segments(x)[0].double().numpy()  # [S, 3, 64, 64]
    assert seg.shape[0] == cfg.segments_for_frames(lm.shape[1])
    for s in range(seg.shape[0]):
        static = lm[:, 32 * s: 32 * s + 64]
        np.testing.assert_allclose(seg[s, 0], static, atol=1e-5)
        d = _delta_eq2(static)
        np.testing.assert_allclose(seg[s, 1], d, atol=1e-4)
        np.testing.assert_allclose(seg[s, 2], _delta_eq2(d), atol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_deltas_equal_torchaudios_replicate_deltas(n):
    """The slice-based deltas are torchaudio's ``compute_deltas(mode="replicate")``, also on segments
    shorter than the regression window."""
    import torchaudio.functional as AF

    from stream_ser.features import _deltas
    torch.manual_seed(n)
    for shape in [(4, 3, 64, 64), (5, 2), (7, 1)]:
        x = torch.randn(*shape) * 5
        torch.testing.assert_close(_deltas(x, n), AF.compute_deltas(x, win_length=2 * n + 1, mode="replicate"),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seconds,expected", [(1.2, 8), (3.0, 8), (9.0, 8)])
def test_utterance_gives_eight_segments(seconds, expected):
    fe = Frontend()
    wave = torch.randn(int(seconds * 16000)) * 0.1
    segs = fe.utterance_segments([wave])
    assert segs.shape == (1, expected, 3, 64, 64)
    assert fe.images(segs).shape == (1, expected, 3, 227, 227)


@pytest.mark.parametrize("seconds,expected", [(1.2, 2), (3.0, 8), (9.0, 27)])
def test_raw_segment_count(seconds, expected):
    fe = Frontend()
    n = int(seconds * 16000)
    assert fe.segments(torch.randn(1, n)).shape == (1, expected, 3, 64, 64)
    assert FrontendConfig().segments_for_frames(FrontendConfig().frames_for(n)) == expected


def test_utterance_pads_with_zeros_and_truncates():
    fe = Frontend()
    short = torch.ones(1000)
    out = fe.prepare_utterance(short)
    assert out.shape == (48000,) and out[:1000].eq(1).all() and out[1000:].eq(0).all()
    long = torch.arange(60000.0)
    assert torch.equal(fe.prepare_utterance(long), long[:48000])


def test_batched_equals_one_by_one(emodb_dir):
    fe = Frontend()
    waves = [load_audio(p) for p in _some_files(emodb_dir, 3)]
    batch = fe.utterance_segments(waves)
    for i, w in enumerate(waves):
        torch.testing.assert_close(batch[i], fe.utterance_segments([w])[0], atol=1e-5, rtol=1e-5)
    imgs = fe.images(batch)
    torch.testing.assert_close(imgs[1], fe.images(batch[1]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("normalization", ["segment", "speaker", "corpus"])
def test_whole_files_at_once_equal_one_by_one(emodb_dir, normalization):
    """``segments_many`` (one FFT over every file's frames) gives each file's ``segments`` exactly:
    real files of different lengths, one too short for a segment and one too short for a frame."""
    files = sorted((emodb_dir / "wav").glob("*.wav"))[:6]
    waves = [load_audio(f) for f in files] + [torch.randn(8000) * 0.1, torch.randn(300) * 0.1]
    fe = Frontend(FrontendConfig(normalization=normalization))
    stats = (torch.randn(3, 64), torch.rand(3, 64) + 0.5) if normalization == "speaker" else None
    many = fe.segments_many(waves, stats)
    assert len(many) == len(waves)
    for w, got in zip(waves, many):
        want = fe.segments(w, stats)[0]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert many[-1].shape[0] == 0 and many[-2].shape[0] == 0 and many[0].shape[0] > 0
    assert [x.shape[0] for x in fe.segments_many([])] == []


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_whole_files_at_once_cost_the_same_calls_for_many_files_as_for_few(emodb_dir, device):
    """The corpus path's worth on a GPU is a fixed number of calls whatever the number of files: counted with
    a dispatch mode, ``segments_many`` of 3 and of 9 real files dispatches the same operations (each a kernel
    launch on a GPU) and the same views (host work only, but four a file were most of a whole corpus's host
    time when each file's segments were cut apart), while giving 3 and 9 files' segments."""
    from bench.profile_engine import count_tensor_ops

    files = sorted((emodb_dir / "wav").glob("*.wav"))[:9]
    waves = [load_audio(f).to(device) for f in files]
    fe = Frontend().to(device)
    counted = {}
    for n in (3, 9):
        ops, views, out = count_tensor_ops(lambda: fe.segments_many(waves[:n]))
        assert len(out) == n and all(x.shape[0] > 0 for x in out)
        counted[n] = ops, views
    assert sum(counted[3][0].values()) > 20  # FFT, filterbank, deltas, normalisation
    assert counted[9] == counted[3], (counted[3], counted[9])


def test_many_waveforms_log_mel_on_the_host_equal_the_tensors(emodb_dir):
    """``log_mel_many(host=True)`` (what a live engine keeps its streams' frames in) from numpy arrays: the
    same numbers as the tensors from tensors, which are each waveform's frames alone; one array per
    waveform, a waveform too short for a frame giving none; energies too."""
    fe = Frontend()
    waves = [load_audio(p)[:n] for p, n in zip(_some_files(emodb_dir, 3), (5120, 399, 16000))]
    lms, energies = fe.log_mel_many(waves, energy=True)
    host_lms, host_energies = fe.log_mel_many([w.numpy() for w in waves], energy=True, host=True)  # as the engine
    assert [x.shape for x in host_lms] == [(30, 64), (0, 64), (98, 64)]
    for w, a in zip(waves, lms):  # each waveform's own frames, alone
        torch.testing.assert_close(a, fe.log_mel(w)[0].T, rtol=1e-5, atol=1e-5)
    for a, b, e, f in zip(lms, host_lms, energies, host_energies):
        assert isinstance(b, np.ndarray) and b.dtype == np.float32 and f.dtype == np.float64
        np.testing.assert_array_equal(b, a.numpy())
        np.testing.assert_array_equal(f, e.numpy())
    assert fe.log_mel_many([], host=True) == []


def test_chunk_boundaries_do_not_change_frames(emodb_dir):
    """Frames computed from any slice that starts on a hop boundary equal the whole signal's."""
    fe = Frontend()
    x = load_audio(_some_files(emodb_dir, 1)[0])
    whole = fe.log_mel(x)[0]
    for start_frame, n in [(0, 1000), (7, 4096), (33, 400), (100, 12345)]:
        part = fe.log_mel(x[start_frame * 160: start_frame * 160 + n])[0]
        torch.testing.assert_close(part, whole[:, start_frame: start_frame + part.shape[1]], atol=1e-4, rtol=1e-5)


def test_segment_normalisation_depends_on_the_segment_only():
    fe = Frontend()
    wave = torch.randn(1, 20000) * 0.05
    segs = fe.segments(wave)
    mean = segs.mean(dim=(-2, -1))
    std = segs.std(dim=(-2, -1), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-3, rtol=0)
    # changing audio after segment 0's 655 ms leaves segment 0 unchanged
    other = wave.clone()
    other[:, FrontendConfig().segment_samples:] = 0.3
    torch.testing.assert_close(fe.segments(other)[:, 0], segs[:, 0])
    # a louder copy gives the same segments (gain drops out)
    torch.testing.assert_close(fe.segments(wave * 4), segs, atol=2e-3, rtol=1e-3)


def test_corpus_normalisation_uses_stored_statistics():
    cfg = FrontendConfig(normalization="corpus")
    fe = Frontend(cfg)
    raw = Frontend(FrontendConfig(normalization="none")).segments(torch.randn(2, 30000) * 0.1)
    fe.set_corpus_stats(raw)
    out = fe.normalize(raw)
    per_bin_mean = out.transpose(0, 1).reshape(-1, 3, 64, 64).mean(dim=(0, 3))
    torch.testing.assert_close(per_bin_mean, torch.zeros_like(per_bin_mean), atol=1e-3, rtol=0)


def test_channels_option():
    for c in (1, 2, 3):
        fe = Frontend(FrontendConfig(channels=c))
        assert fe.segments(torch.randn(1, 16000)).shape[2] == c


def test_moves_with_to():
    fe = Frontend().to(torch.float64)
    assert fe.window.dtype == torch.float64 and fe.mel_fb.dtype == torch.float64
    assert fe.log_mel(torch.randn(1, 4000)).dtype == torch.float64


@pytest.mark.parametrize("normalization", ["segment", "speaker", "corpus"])
def test_a_flat_segment_normalises_to_zero_whatever_rounding_it_carries(normalization):
    """Zero padding (or digital silence) is the constant log floor; its float rounding residue differs by
    device and must not be blown up into O(1) features (it was: segment 6 of a short utterance differed by
    0.76 between CPU and CUDA)."""
    fe = Frontend(FrontendConfig(normalization=normalization, image_size=64))
    flat = torch.full((3, 64, 64), float(np.log(1e-10)))
    flat[1:] = 0.0  # the deltas of a constant
    residue = flat + 1e-6 * torch.randn(flat.shape, generator=torch.Generator().manual_seed(0))
    stats = (torch.full((3, 64), float(np.log(1e-10))), torch.zeros(3, 64))  # a "speaker" who is all padding
    a = fe.normalize(flat, stats if normalization == "speaker" else None)
    b = fe.normalize(residue, stats if normalization == "speaker" else None)
    assert (b - a).abs().max() < 1e-3
    if normalization == "segment":
        assert a.abs().max() == 0 and b.abs().max() < 1e-3
    # a real segment is unchanged by the floor: its channels vary far more than it
    x = torch.randn(3, 64, 64) * torch.tensor([3.0, 0.3, 0.1])[:, None, None]
    if normalization == "segment":
        m, sd = x.mean(dim=(-2, -1), keepdim=True), x.std(dim=(-2, -1), keepdim=True, unbiased=False)
        torch.testing.assert_close(fe.normalize(x), (x - m) / (sd + fe.config.norm_eps))


@pytest.mark.cuda
def test_cpu_equals_cuda(emodb_dir):
    fe = Frontend()
    x = load_audio(_some_files(emodb_dir, 1)[0])
    cpu = fe.utterance_segments([x])
    gpu = fe.to("cuda").utterance_segments([x.cuda()]).cpu()
    torch.testing.assert_close(cpu, gpu, atol=1e-3, rtol=1e-3)
