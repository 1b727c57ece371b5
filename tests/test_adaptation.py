"""Speaker normalisation: statistics offline and live, streaming equals offline with frozen statistics,
running statistics converge to the offline ones, each stream keeps its own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stream_ser.adaptation import RunningStats, Stats, speaker_stats, speech_frames, stats_by_group
from stream_ser.audio import load_audio
from stream_ser.config import FrontendConfig
from stream_ser.engine import MultiStreamEngine
from stream_ser.features import Frontend
from stream_ser.model import EmotionModel
from stream_ser.recognizer import StreamingRecognizer, recording_speech_masks

SPEAKER_A = ["03a01Wa", "03a02Fc", "03a04Ad", "03a01Nc", "03a02Ta", "03a04Lc", "03a02Wb", "03a04Fd"]
SPEAKER_B = ["16b01Tb", "16a01Ec", "16a01Lb", "16a01Fc"]


def _speaker_model(emodb_wav, **frontend) -> EmotionModel:
    """A random speaker-normalised model (64 px: cheap) whose corpus statistics come from real speech."""
    torch.manual_seed(5)
    m = EmotionModel(FrontendConfig(normalization="speaker", image_size=64, **frontend)).eval()
    fe = m.frontend
    raw = torch.cat([fe.raw_segments_from_log_mel(fe.log_mel(load_audio(emodb_wav(s)))) for s in SPEAKER_B], dim=1)
    fe.set_corpus_stats(raw)
    return m


@pytest.fixture(scope="module")
def model(emodb_wav):
    return _speaker_model(emodb_wav)


def _raw(fe: Frontend, wave: torch.Tensor) -> torch.Tensor:
    return fe.raw_segments_from_log_mel(fe.log_mel(wave))  # [1, S, C, M, L]


def test_statistics_see_speech_frames_only(model, emodb_wav):
    fe = model.frontend
    wave = load_audio(emodb_wav("03a01Wa"))
    padded = torch.cat([torch.zeros(16000), wave, torch.zeros(24000)])  # digital silence around the speech
    raw, raw_padded = _raw(fe, wave), _raw(fe, padded)
    assert speech_frames(raw_padded).float().mean() < speech_frames(raw).float().mean()
    a, b = speaker_stats(raw), speaker_stats(raw_padded)
    # silence changes the set of segments (different cuts), not the speech statistics much
    assert (a.mean[0] - b.mean[0]).abs().mean() < 0.15 * a.std[0].mean()
    # a silent recording has no speech frames: the prior comes back
    prior = Stats(torch.full((3, 64), 7.0), torch.full((3, 64), 2.0), 0.0)
    silent = _raw(fe, torch.zeros(32000))
    assert speaker_stats(silent, prior) is prior


def test_batched_statistics_equal_one_speaker_at_a_time(model, emodb_wav):
    fe = model.frontend
    raws = [_raw(fe, fe.prepare_utterance(load_audio(emodb_wav(s)))) for s in SPEAKER_A[:3] + SPEAKER_B[:2]]
    raw = torch.cat(raws)  # [5, 8, C, M, L]
    groups = ["A", "A", "A", "B", "B"]
    mean, std = stats_by_group(raw, groups)
    a = speaker_stats(raw[:3])
    torch.testing.assert_close(mean[1], a.mean)
    torch.testing.assert_close(std[2], a.std)
    batched = fe.normalize(raw, (mean, std))
    single = fe.normalize(raw[4:5], (mean[4], std[4]))
    torch.testing.assert_close(batched[4:5], single)
    assert not torch.allclose(mean[0], mean[3])  # two speakers, two sets of statistics
    # after normalisation the speaker's speech frames are centred per bin
    z = fe.normalize(raw[:3], (a.mean, a.std))
    w = speech_frames(raw[:3])[..., None, None, :].float()
    centred = (z * w).sum(dim=(0, 1, 4)) / w.sum(dim=(0, 1, 4))
    assert centred.abs().max() < 1e-3


@pytest.mark.parametrize("silence_floor", [0.0, 2.0])
def test_stream_equals_offline_with_frozen_statistics(model, emodb_wav, silence_floor):
    """Invariant 1 with speaker normalisation: enrolled from another utterance, frozen (with and
    without the silence floor)."""
    if silence_floor:
        model = _speaker_model(emodb_wav, silence_floor=silence_floor)
    rec = StreamingRecognizer(model, adapt=False)
    st = rec.enroll(load_audio(emodb_wav("16a01Ec")).numpy())
    assert rec.adaptation.frozen and st.frames > 0
    audio = load_audio(emodb_wav("16b01Tb")).numpy()
    preds = []
    rng = np.random.default_rng(3)
    i = 0
    while i < len(audio):
        n = int(rng.integers(1, 5000))
        preds += rec.push(audio[i:i + n])
        i += n
    assert [p.partial for p in preds[:7]] == [True] * 7
    preds = [p for p in preds if not p.partial]  # full windows: the ones the offline model makes exactly
    cfg = model.frontend_config
    waves = [torch.from_numpy(audio[cfg.shift_samples * k: cfg.shift_samples * k + cfg.utterance_samples])
             for k in range(len(preds))]
    offline = model.predict(waves, stats=(st.mean, st.std)).numpy()
    stream = np.array([[p.probabilities[lab] for lab in model.labels] for p in preds])
    assert len(preds) == 5
    np.testing.assert_allclose(stream, offline, atol=1e-4)
    assert all(p.adaptation == {"on": False, "speech_s": round(st.speech_s, 2), "enrolled": True} for p in preds)
    # the statistics are really used: the corpus statistics give other segments
    fe = model.frontend
    own, corpus = fe.utterance_segments(waves[:1], (st.mean, st.std)), fe.utterance_segments(waves[:1])
    assert (own - corpus).abs().mean() > 0.05


def test_running_statistics_converge_to_the_speakers(model, emodb_wav):
    """Live statistics over one speaker's utterances equal the offline ones over the same frames: the level
    gate alone without a speech detector; the level gate and silero-vad's verdicts with one (the default)."""
    fe, cfg = model.frontend, model.frontend_config
    waves = [load_audio(emodb_wav(s)) for s in SPEAKER_A]
    raw = torch.cat([_raw(fe, w) for w in waves], dim=1)
    masks = torch.cat([recording_speech_masks(w.numpy(), cfg)[None] for w in waves], dim=1)  # [1, S, L]
    assert 0.5 < masks.float().mean() < 1.0  # the detector keeps the speech and drops some frames
    prior = fe.corpus_stats()
    for vad in (False, True):
        offline = speaker_stats(raw, mask=masks if vad else None)
        rec = StreamingRecognizer(model, vad=vad)
        rec.adaptation.prior_frames = 0.0  # no prior: exactly the speaker's own frames
        seen = []
        for w in waves:
            rec.push(w.numpy())
            seen.append(rec.adaptation.speech_s)
            rec.reset(adaptation=False)  # next utterance, same speaker
        assert all(b > a for a, b in zip(seen, seen[1:]))  # grows with every utterance
        cur = rec.adaptation.current()
        torch.testing.assert_close(cur.mean, offline.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cur.std, offline.std, atol=1e-4, rtol=1e-4)
        assert cur.frames == offline.frames

    # with the default warm-up prior (3 s of corpus speech) the stream still ends close to the speaker
    gap_before = (prior.mean[0] - offline.mean[0]).abs().mean()
    rec2 = StreamingRecognizer(model)
    first = None
    for w in waves:
        rec2.push(w.numpy())
        first = first if first is not None else (rec2.adaptation.current().mean[0] - offline.mean[0]).abs().mean()
        rec2.reset(adaptation=False)
    gap_after = (rec2.adaptation.current().mean[0] - offline.mean[0]).abs().mean()
    assert gap_after < 0.3 * gap_before and gap_after < first
    # and a reset forgets the speaker
    rec2.reset()
    assert rec2.adaptation.speech_s == 0.0
    torch.testing.assert_close(rec2.adaptation.current().mean, prior.mean)


def test_loud_non_speech_does_not_teach_the_statistics(model, emodb_wav):
    """A fan-like noise louder than the level gate between a speaker's utterances: with the speech detector
    (the default) the statistics stay the speaker's; with the level gate alone they learn the noise."""
    waves = [load_audio(emodb_wav(s)).numpy() for s in SPEAKER_A[:4]]
    rng = np.random.default_rng(0)
    noise = np.cumsum(rng.standard_normal(32000)).astype(np.float32)  # 2 s of brown (low-frequency) noise
    noise -= np.convolve(noise, np.ones(400) / 400, mode="same")  # no drift: a rumble, not a DC offset
    noise *= 10 ** (-30 / 20) / np.sqrt(np.mean(noise ** 2))  # -30 dBFS RMS: 25 dB above the level gate
    gaps = {}
    for vad in (True, False):
        stats = []
        for gap in (noise, np.zeros_like(noise)):  # the same stream with digital silence: the reference
            rec = StreamingRecognizer(model, vad=vad)
            rec.adaptation.prior_frames = 0.0
            rec.push(np.concatenate([x for w in waves for x in (w, gap)]))
            stats.append(rec.adaptation.current())
        gaps[vad] = (stats[0].mean[0] - stats[1].mean[0]).abs().mean().item()
    assert gaps[False] > 0.5  # the noise moved the level-gated statistics by half a log unit per bin
    assert gaps[True] < 0.25 * gaps[False]


def test_each_stream_keeps_its_own_statistics(model, emodb_wav):
    eng = MultiStreamEngine(model)
    a, b = eng.add_stream("a"), eng.add_stream("b")
    wa = np.concatenate([load_audio(emodb_wav(s)).numpy() for s in SPEAKER_A[:3]])
    wb = np.concatenate([load_audio(emodb_wav(s)).numpy() for s in SPEAKER_B[:3]])
    preds = []
    for i in range(0, max(len(wa), len(wb)), 3200):
        if i < len(wa):
            eng.feed("a", wa[i:i + 3200])
        if i < len(wb):
            eng.feed("b", wb[i:i + 3200])
        preds += eng.step()
    sa, sb = a.adaptation.current(), b.adaptation.current()
    assert not torch.allclose(sa.mean, sb.mean, atol=0.1)
    # each equals what a lone recognizer on the same audio gets
    lone = StreamingRecognizer(model)
    lone.push(wa)
    torch.testing.assert_close(lone.adaptation.current().mean, sa.mean)
    assert {p.stream for p in preds} == {"a", "b"}
    assert all(p.adaptation["on"] and p.adaptation["speech_s"] > 0 for p in preds)


def test_running_stats_frozen_and_enrolled():
    prior = Stats(torch.zeros(3, 4), torch.ones(3, 4), 0.0)
    rs = RunningStats(prior, prior_frames=10)
    x = torch.randn(1, 2, 3, 4, 16) + 5.0  # loud frames: all count as speech
    x[:, :, 0] += 5.0
    rs.frozen = True
    rs.update(x)
    assert rs.frames == 0
    rs.frozen = False
    rs.update(x)
    assert rs.frames == 32
    cur = rs.current()
    own = x.permute(2, 3, 0, 1, 4).reshape(3, 4, -1).mean(-1)
    shifted = prior.mean.clone()
    shifted[0] += own[0].mean() - prior.mean[0].mean()  # the prior's static channel at the speaker's level
    expected = (10 * shifted + 32 * own) / 42
    torch.testing.assert_close(cur.mean, expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cur.mean[1:], ((10 * prior.mean + 32 * own) / 42)[1:].float())  # deltas: plain


def test_running_statistics_do_not_move_with_the_microphone_gain():
    """A gain adds one constant to every static log-Mel value. With the prior following the speaker's
    level, the running statistics move by that constant (mean) and not at all (std), however little speech
    they have seen; without the shift the corpus prior would pull them towards its own level."""
    gen = torch.Generator().manual_seed(0)
    prior = Stats(torch.randn(3, 8, generator=gen), 1 + torch.rand(3, 8, generator=gen), 0.0)
    x = torch.randn(1, 3, 3, 8, 64, generator=gen) - 2.0  # three segments of speech-level frames
    for gain_ln in (-6.9, 2.3):  # -30 dB and +10 dB in natural-log power units
        y = x.clone()
        y[:, :, 0] += gain_ln
        a, b = RunningStats(prior), RunningStats(prior)
        a.update(x, torch.ones(1, 3, 64, dtype=torch.bool))
        b.update(y, torch.ones(1, 3, 64, dtype=torch.bool))
        ca, cb = a.current(), b.current()
        torch.testing.assert_close(cb.mean[0], ca.mean[0] + gain_ln, atol=1e-4, rtol=0)
        torch.testing.assert_close(cb.mean[1:], ca.mean[1:])
        torch.testing.assert_close(cb.std, ca.std, atol=1e-4, rtol=0)


def test_silence_floor_makes_silence_level_independent(emodb_wav):
    """The same utterance with its pauses as digital silence and as quiet noise: with the floor their
    segments agree where the speaker's speech is; without it the pauses differ. Speech is untouched."""
    plain = _speaker_model(emodb_wav)
    floored = _speaker_model(emodb_wav, silence_floor=2.0)
    wave = load_audio(emodb_wav("03a01Wa"))
    wave = torch.cat([torch.zeros(8000), wave, torch.zeros(16000)])
    noisy = wave + 3e-4 * torch.randn(wave.shape, generator=torch.Generator().manual_seed(0))  # ~ -70 dBFS hiss
    st = speaker_stats(_raw(plain.frontend, load_audio(emodb_wav("03a02Fc"))))
    stats = (st.mean, st.std)
    a, b = plain.frontend.segments(wave[None], stats), plain.frontend.segments(noisy[None], stats)
    fa, fb = floored.frontend.segments(wave[None], stats), floored.frontend.segments(noisy[None], stats)
    # the floor: static channel >= -2, deltas 0 where the static is floored, the rest as without it
    assert fa[:, :, 0].min() >= -2.0 and (fa[:, :, 0] == -2.0).any()
    quiet = a[:, :, :1] < -2.0
    assert (fa[:, :, 1:].masked_select(quiet.expand_as(fa[:, :, 1:])) == 0).all()
    torch.testing.assert_close(fa.masked_select(~quiet.expand_as(fa)), a.masked_select(~quiet.expand_as(a)))
    # the leading silence (first segment): digital silence and hiss land far apart without the floor
    assert (a[0, 0] - b[0, 0]).abs().mean() > 0.5
    assert (fa[0, 0] - fb[0, 0]).abs().mean() < 0.25 * (a[0, 0] - b[0, 0]).abs().mean()


def test_silence_floor_config_is_checked_and_kept():
    with pytest.raises(ValueError, match="silence_floor must be >= 0"):
        FrontendConfig(normalization="speaker", silence_floor=-1.0)
    with pytest.raises(ValueError, match="needs the 'speaker' or 'corpus'"):
        FrontendConfig(normalization="segment", silence_floor=2.0)
    cfg = FrontendConfig(normalization="speaker", silence_floor=2.5)
    assert FrontendConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["silence_floor"]  # a checkpoint made before the field existed: off
    assert FrontendConfig.from_dict(old).silence_floor == 0.0


def test_padding_segment_is_embedded_once_with_the_floor_only(model, emodb_wav):
    """With live adaptation the statistics move every segment: without the floor the padding segment
    moves with them and is embedded at every partial hop (7, after the one made with the prior statistics
    when the recognizer is made); with the floor it is all floor, embedded once."""
    audio = torch.cat([load_audio(emodb_wav(u)) for u in SPEAKER_A[:2]]).numpy()  # > 8 segments
    plain = StreamingRecognizer(model)
    floored = StreamingRecognizer(_speaker_model(emodb_wav, silence_floor=2.0))
    for rec in (plain, floored):
        for i in range(0, len(audio), 1600):
            rec.push(audio[i:i + 1600])
        assert rec.adaptation.speech_s > 0  # the statistics did move
    assert (plain.padding_cache.misses, plain.padding_cache.hits) == (1 + 7, 0)
    assert (floored.padding_cache.misses, floored.padding_cache.hits) == (1, 7)


def test_many_streams_padding_segments_at_once_are_each_streams_own(model, emodb_wav):
    """An engine's partial windows: every stream's padding segment in one call, each normalised with that
    stream's statistics of the moment (bit-equal to normalising it alone, so the cache finds them again);
    the cache places each, embeds each distinct one once and finds them all the next time."""
    from stream_ser.recognizer import PaddingCache, embed_and_project, padding_segments
    recs = [StreamingRecognizer(model) for _ in range(3)]
    for rec, name in zip(recs[1:], SPEAKER_A[:2]):
        rec.push(load_audio(emodb_wav(name)).numpy())  # two streams' statistics move, the first's do not
    cfg, fe = model.frontend_config, model.frontend
    raw = fe.raw_segments_from_log_mel(torch.full((1, cfg.n_mels, cfg.segment_frames), math.log(cfg.log_floor)))[0, 0]
    pads = padding_segments(recs)
    for rec, pad in zip(recs, pads):
        st = rec.adaptation.current()
        assert torch.equal(pad, fe.normalize(raw, (st.mean, st.std)))
    assert not torch.equal(pads[0], pads[1]) and not torch.equal(pads[1], pads[2])
    cache = PaddingCache()
    feats = [pads[1], pads[0], pads[1], pads[2]]
    proj = cache.projections(model, feats)
    assert (cache.misses, cache.hits) == (3, 0)  # three distinct segments, each embedded once
    assert proj[0] is proj[2]
    for f, p in zip(feats, proj):
        torch.testing.assert_close(p, embed_and_project(model, [f])[0], atol=1e-4, rtol=0)
    again = cache.projections(model, [pads[2], pads[0], pads[0]])
    assert (cache.misses, cache.hits) == (3, 3) and again[0] is proj[3] and again[1] is proj[1]


def test_with_a_speech_detector_its_verdicts_decide_and_not_the_level():
    """Quiet speech (a microphone 30 dB down) is under the offline level gate; where a speech detector kept
    the frames, they count all the same. Digital silence never counts; without a detector, the gate decides."""
    from stream_ser.adaptation import DIGITAL_SILENCE_LOG_POWER, SPEECH_GATE_LOG_POWER, moments_each
    M, L = 8, 6
    logp = torch.tensor([SPEECH_GATE_LOG_POWER + 3, SPEECH_GATE_LOG_POWER - 3, SPEECH_GATE_LOG_POWER - 6,
                         DIGITAL_SILENCE_LOG_POWER - 1, SPEECH_GATE_LOG_POWER + 1, SPEECH_GATE_LOG_POWER - 2])
    raw = torch.zeros(1, 3, M, L)
    raw[0, 0] = (logp - math.log(M))[None, :]  # every bin equal: the frame's summed power is exp(logp)
    detector = torch.tensor([[True, True, True, True, False, True]])
    n_gate = moments_each(raw)[0]
    n_det = moments_each(raw, detector)[0]
    assert n_gate.item() == 2  # frames 0 and 4: over the gate
    assert n_det.item() == 4  # frames 0, 1, 2, 5: kept by the detector, over digital silence (3 is not)


def test_statistics_of_many_streams_at_once_equal_each_alone():
    """The engine computes every stream's current statistics in one batch (``RunningStats.current_each``):
    the same numbers as each stream's own, whatever its prior weight, its speech so far, or its cache."""
    torch.manual_seed(0)
    C, M = 3, 16
    prior = Stats(torch.randn(C, M), torch.rand(C, M) + 0.5, 0.0)

    def fresh(k: int) -> RunningStats:
        st = RunningStats(prior, prior_frames=[0, 100, 300, 0, 50, 10][k])
        if k % 3:  # some have heard speech (loud, so the level shift matters), some not
            x = (torch.randn(C, M, 40, generator=torch.Generator().manual_seed(k)) * 3 + 2 * k).double()
            st.add(torch.tensor(40.0, dtype=torch.float64), x.sum(-1), x.square().sum(-1))
        return st

    alone = []
    for k in range(6):
        st = fresh(k)
        m, d = st.current().mean.clone(), st.current().std.clone()
        alone.append((m, d, st.current().frames))
    many = [fresh(k) for k in range(6)]
    many[2].current()  # one of them cached already
    mean, std = RunningStats.current_each(many)
    assert mean.shape == std.shape == (6, C, M) and mean.dtype == torch.float32
    for k, (m, d, frames) in enumerate(alone):
        torch.testing.assert_close(mean[k], m, rtol=0, atol=0)
        torch.testing.assert_close(std[k], d, rtol=0, atol=0)
        assert many[k].current().frames == frames
    torch.testing.assert_close(mean[0], prior.mean)  # no prior weight, no speech: the prior itself
    assert not torch.equal(mean[1, 0], prior.mean[0])  # speech heard: the level moved


def test_adding_many_streams_moments_at_once_equals_each_alone():
    """``RunningStats.add_each`` (an engine hop's segments, three tensor calls for all streams) leaves every
    stream's statistics as its own ``add`` would, bit for bit; frozen streams and segments without a speech
    frame add nothing, and only the streams that changed drop their cached statistics."""
    torch.manual_seed(1)
    C, M, N = 3, 16, 5
    prior = Stats(torch.randn(C, M), torch.rand(C, M) + 0.5, 0.0)
    x = torch.randn(N, C, M, 30, dtype=torch.float64) * 2 + 1
    n = torch.tensor([30.0, 0.0, 12.0, 30.0, 7.0], dtype=torch.float64)  # row 1: no speech frame
    s, ss = x.sum(-1), x.square().sum(-1)

    def streams() -> list[RunningStats]:
        out = [RunningStats(prior) for _ in range(N)]
        for k, st in enumerate(out):  # each has heard something before, and has its statistics cached
            st.add(torch.tensor(10.0 + k, dtype=torch.float64), x[k].sum(-1) / 3, x[k].square().sum(-1) / 3)
            st.current()
        out[3].frozen = True
        return out

    alone, many = streams(), streams()
    for k, st in enumerate(alone):
        st.add(n[k], s[k], ss[k])
    cached = [st._cache for st in many]
    RunningStats.add_each(many, n, s, ss)
    for k in range(N):
        assert many[k].frames == alone[k].frames
        assert torch.equal(many[k]._s, alone[k]._s) and torch.equal(many[k]._ss, alone[k]._ss)
        torch.testing.assert_close(many[k].current().mean, alone[k].current().mean, rtol=0, atol=0)
        torch.testing.assert_close(many[k].current().std, alone[k].current().std, rtol=0, atol=0)
    assert many[1].frames == 11.0 and many[3].frames == 13.0  # no frame, and frozen: unchanged
    assert [many[k]._cache is cached[k] for k in range(N)] == [False, True, False, True, False]


def test_the_moments_of_many_segments_equal_float64_sums_and_each_alone():
    """``moments_each`` sums each segment's 64 frames in float32 (two batched products) and hands on float64:
    within 1e-6 (relative) of float64 sums over the kept frames, and a segment's moments do not depend on
    the batch it came in. The counts are exact."""
    from stream_ser.adaptation import moments_each
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(7, 3, 64, 64, generator=g) * 4 - 12  # log-Mel-like values: level and spread
    mask = torch.rand(7, 64, generator=g) > 0.4
    mask[2] = False  # a segment with no frame kept
    n, s, ss = moments_each(raw, mask)
    assert n.dtype == s.dtype == ss.dtype == torch.float64 and s.shape == ss.shape == (7, 3, 64)
    x, w = raw.double(), mask.double()[:, None, None, :]
    assert torch.equal(n, w.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(s, (x * w).sum(-1), rtol=1e-6, atol=1e-6 * x.abs().max().item())
    torch.testing.assert_close(ss, (x.square() * w).sum(-1), rtol=1e-6, atol=0)
    assert n[2] == 0 and not s[2].any() and not ss[2].any()
    for k in (0, 2, 6):
        one = moments_each(raw[k:k + 1], mask[k:k + 1])
        for a, b in zip(one, (n, s, ss)):
            torch.testing.assert_close(a[0], b[k], rtol=1e-6, atol=1e-5)
