"""Streaming equals offline (invariant 1), each segment embedded once (invariant 3), reset, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_ser.audio import AudioError, load_audio
from stream_ser.config import FrontendConfig
from stream_ser.model import EmotionModel
from stream_ser.recognizer import PaddingCache, StreamingRecognizer

FILE = "16b01Tb"  # 4.4 s of real speech: 12 segments, 5 windows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1234)
    return EmotionModel().eval()


@pytest.fixture(scope="module")
def audio(emodb_wav):
    return load_audio(emodb_wav(FILE)).numpy()


@pytest.fixture(scope="module")
def offline(model, audio):
    """The offline model's prediction for the 3 s starting at sample 5120 k, for every window the stream can fill."""
    cfg = model.frontend_config
    n_windows = cfg.segments_for_frames(cfg.frames_for(len(audio))) - cfg.segments_per_utterance + 1
    waves = [torch.from_numpy(audio[cfg.shift_samples * k: cfg.shift_samples * k + cfg.utterance_samples])
             for k in range(n_windows)]
    return model.predict(waves).numpy()


def _run(rec: StreamingRecognizer, audio: np.ndarray, sizes) -> list:
    preds, i = [], 0
    for n in sizes:
        if i >= len(audio):
            break
        preds += rec.push(audio[i:i + n])
        i += n
    assert i >= len(audio)
    return preds


def _chunks(kind, n):
    if kind == "random":
        rng = np.random.default_rng(7)
        return rng.integers(1, 6000, size=n)
    return [kind] * (n // kind + 1)


@pytest.mark.parametrize("chunk", [1, 160, 1000, 4096, "random"])
def test_stream_equals_offline_for_any_chunking(model, audio, offline, chunk):
    rec = StreamingRecognizer(model)
    got_all = _run(rec, audio, _chunks(chunk, len(audio)))
    assert [p.partial for p in got_all] == [True] * 7 + [False] * 5  # partial from the first segment on
    preds = [p for p in got_all if not p.partial]
    assert len(preds) == len(offline) == 5
    got = np.array([[p.probabilities[lab] for lab in model.labels] for p in preds])
    np.testing.assert_allclose(got, offline, atol=1e-4, rtol=0)
    hop = model.frontend_config.hop_s
    for k, p in enumerate(preds):
        assert p.seq == k + 8
        assert p.window_start_s == pytest.approx(k * hop)
        assert p.window_end_s == pytest.approx(k * hop + 10480 * 8 / 16000 - 7 * (10480 - 5120) / 16000)
        assert p.label == model.labels[int(np.argmax(got[k]))]
        assert len(p.attention) == 8 and sum(p.attention) == pytest.approx(1, abs=1e-5)
        assert set(p.timings_ms) == {"frontend", "embed", "head", "total"}


def test_each_segment_embedded_exactly_once(model, audio, monkeypatch):
    calls = []
    real = model.embedder.forward

    def counting(images):
        calls.append(images.shape[0])
        return real(images)

    monkeypatch.setattr(model.embedder, "forward", counting)
    rec = StreamingRecognizer(model, partial=False)
    preds = _run(rec, audio, _chunks(160, len(audio)))
    cfg = model.frontend_config
    n_segments = cfg.segments_for_frames(cfg.frames_for(len(audio)))
    assert sum(calls) == n_segments == rec.segments_embedded == rec.segments_seen == 12
    assert rec.counters["predictions"] == len(preds) == n_segments - 7
    assert max(calls) == 1  # 160-sample chunks complete one segment at a time
    # partial windows add the padding segment, never a real segment twice; per-segment normalisation
    # makes the padding segment the same every hop, so it is embedded once (PaddingCache)
    # (when the recognizer is made, so that its first hop embeds only its own segment)
    calls.clear()
    rec = StreamingRecognizer(model)
    assert calls == [1] and rec.padding_cache.misses == 1  # the padding segment, before any audio
    preds = _run(rec, audio, _chunks(160, len(audio)))
    assert rec.segments_embedded == 12 and sum(calls) == 12 + 1 and len(preds) == 12
    assert set(calls[1:]) == {1}  # the first hop too: one segment per call
    assert (rec.padding_cache.misses, rec.padding_cache.hits) == (1, 7)
    calls.clear()
    StreamingRecognizer(model, padding_cache=rec.padding_cache)  # a second stream sharing the cache: no call
    assert calls == []
    # without the cache (size 0) it is embedded at every partial hop, and the answers are the same
    calls.clear()
    uncached = StreamingRecognizer(model, padding_cache=PaddingCache(size=0))
    again = _run(uncached, audio, _chunks(160, len(audio)))
    assert sum(calls) == 12 + 7  # no warm-up (it would not be kept), and every partial hop
    np.testing.assert_allclose([list(p.probabilities.values()) for p in again],
                               [list(p.probabilities.values()) for p in preds], atol=1e-5, rtol=0)
    # a second stream sharing the cache (as an engine's streams do) embeds no padding at all
    calls.clear()
    _run(StreamingRecognizer(model, padding_cache=rec.padding_cache), audio, _chunks(160, len(audio)))
    assert sum(calls) == 12


def test_flushing_a_short_file_equals_the_offline_padded_utterance(model, audio):
    """A 2 s file: partial windows while it plays, and at its end the window the offline model
    makes of it (zero-padded to 3 s), exactly."""
    short = audio[:32000]
    rec = StreamingRecognizer(model)
    preds = rec.push(short)
    assert preds and all(p.partial for p in preds)
    final = rec.flush()
    # the last samples (31 999) lie in segments 5 and 6 (starting at 25 600 and 30 720): the zero padding
    # completes both, as the offline 3 s window's padding does
    assert len(final) == 2 and all(p.partial for p in final) and final[-1].window_end_s > 32000 / 16000
    assert rec.flush() == []  # nothing left
    want = model.predict([torch.from_numpy(short)])[0].numpy()
    got = np.array([final[-1].probabilities[lab] for lab in model.labels])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_reset_starts_a_new_stream(model, audio):
    rec = StreamingRecognizer(model)
    first = _run(rec, audio, _chunks(4096, len(audio)))
    rec.push(np.random.default_rng(0).standard_normal(20000).astype(np.float32) * 0.1)  # half a window of noise
    rec.reset()
    again = _run(rec, audio, _chunks(4096, len(audio)))
    assert [p.seq for p in again] == [p.seq for p in first]
    np.testing.assert_allclose([p.confidence for p in again], [p.confidence for p in first], atol=1e-6)
    cfg = model.frontend_config
    with_noise = cfg.segments_for_frames(cfg.frames_for(len(audio) + 20000))
    assert with_noise == 16
    assert rec.segments_embedded == with_noise + 12  # counters keep counting across reset


def test_silence_is_visible_as_silence(model):
    rec = StreamingRecognizer(model)
    preds = rec.push(np.zeros(60000, np.float32))
    assert preds and all(p.speech_activity == 0.0 for p in preds)
    assert all(p.level_dbfs < -100 for p in preds)


def test_bad_samples_raise_and_keep_state(model, audio):
    rec = StreamingRecognizer(model)
    rec.push(audio[:30000])
    bad = audio[30000:31000].copy()
    bad[5] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        rec.push(bad)
    with pytest.raises(AudioError, match="shape"):
        rec.push(np.zeros((2, 3, 4), np.float32))
    preds = rec.push(audio[30000:])  # the bad block was refused whole; the stream goes on
    ref = StreamingRecognizer(model)
    expect = ref.push(audio)[-len(preds):]
    np.testing.assert_allclose([p.confidence for p in preds], [p.confidence for p in expect], atol=1e-6)


def test_int16_and_stereo_blocks_are_accepted(model, audio):
    rec = StreamingRecognizer(model)
    pcm = np.clip(audio * 32767, -32768, 32767).astype(np.int16)
    stereo = np.stack([pcm, pcm], axis=1)
    preds = rec.push(stereo)
    assert len([p for p in preds if not p.partial]) == 5


def test_utterance_normalised_model_is_refused():
    with pytest.raises(ValueError, match="cannot run live"):
        StreamingRecognizer(EmotionModel(FrontendConfig(normalization="utterance")))


@pytest.mark.cuda
def test_stream_on_cuda_equals_cpu(model, audio):
    cpu = StreamingRecognizer(model).push(audio)
    gpu_model = EmotionModel().eval()
    gpu_model.load_state_dict(model.state_dict())
    gpu = StreamingRecognizer(gpu_model.to("cuda")).push(audio)
    np.testing.assert_allclose([p.confidence for p in gpu], [p.confidence for p in cpu], atol=1e-3)


def test_warm_up_runs_partial_and_full_windows_and_leaves_no_trace(audio):
    """`stream-ser live` (and the benchmark) run one throwaway stream before serving, so the first real one
    does not pay one-time costs: it goes through partial windows and full ones, and a stream afterwards
    answers as on a model that was never warmed up."""
    import copy

    from stream_ser.recognizer import warm_up
    torch.manual_seed(5)
    cold = EmotionModel(FrontendConfig(image_size=64)).eval()
    warm = copy.deepcopy(cold)
    preds = warm_up(warm)
    assert any(p.partial for p in preds) and any(not p.partial for p in preds)
    assert all(p.stream == "warm-up" and not p.speech for p in preds)  # quiet noise: no emotion, still predicted
    a = StreamingRecognizer(cold).push(audio)
    b = StreamingRecognizer(warm).push(audio)
    assert len(a) == len(b) > 0
    np.testing.assert_allclose([list(p.probabilities.values()) for p in b],
                               [list(p.probabilities.values()) for p in a], atol=1e-6)
    with pytest.raises(ValueError, match="cannot run live"):
        warm_up(EmotionModel(FrontendConfig(normalization="utterance")))


def test_a_predictions_dict_is_asdicts_and_its_own(emodb_wav):
    """``Prediction.to_dict`` (built field by field, not by asdict's recursive copy) is exactly
    ``dataclasses.asdict``, for a speaker-normalised model's predictions (adaptation set) too; and the dict
    shares nothing mutable with the prediction, so whoever sends it may change it."""
    import dataclasses
    torch.manual_seed(3)
    model = EmotionModel(FrontendConfig(image_size=64, normalization="speaker")).eval()
    rec = StreamingRecognizer(model, stream="s")
    preds = rec.push(load_audio(emodb_wav(FILE)).numpy()[:20000])
    assert preds and preds[-1].adaptation is not None
    for p in preds:
        d = p.to_dict()
        assert d == dataclasses.asdict(p) and list(d) == [f.name for f in dataclasses.fields(p)]
    d = preds[-1].to_dict()
    for name in ("probabilities", "timings_ms", "adaptation"):
        d[name]["x"] = 1.0
        assert "x" not in getattr(preds[-1], name)
    d["attention"].append(1.0)
    assert len(preds[-1].attention) == 8
