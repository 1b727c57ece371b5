"""Speech detection (silero-vad): real speech, silence and noise; streaming equals whole-file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_ser.audio import load_audio
from stream_ser.model import EmotionModel
from stream_ser.recognizer import StreamingRecognizer
from stream_ser.vad import MIN_SPEECH_FRACTION, SpeechDetector, speech_fraction_of

SR = 16_000


@pytest.fixture(scope="module")
def speech(emodb_wav):
    return load_audio(emodb_wav("16b01Tb")).numpy()


def _noise(seconds=4.0, level=0.1):
    return np.random.default_rng(0).normal(0, level, int(seconds * SR)).astype(np.float32)


def test_speech_silence_and_noise(speech):
    assert speech_fraction_of(speech) > 0.5
    assert speech_fraction_of(np.zeros(4 * SR, np.float32)) == 0.0
    assert speech_fraction_of(_noise()) < MIN_SPEECH_FRACTION
    assert speech_fraction_of(_noise(level=0.01)) < MIN_SPEECH_FRACTION


def test_chunked_equals_whole(speech):
    whole = SpeechDetector().push(speech)
    det = SpeechDetector()
    rng = np.random.default_rng(3)
    parts, i = [], 0
    while i < len(speech):
        n = int(rng.integers(1, 3000))
        parts.append(det.push(speech[i:i + n]))
        i += n
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-6)
    assert det.n_chunks == len(speech) // 512


def test_reset_forgets_the_stream(speech):
    det = SpeechDetector()
    first = det.push(speech[:SR])
    det.push(_noise(1.0))
    det.reset()
    np.testing.assert_allclose(det.push(speech[:SR]), first, atol=1e-6)


def test_windows_without_speech_get_no_emotion(speech):
    torch.manual_seed(0)
    model = EmotionModel().eval()
    audio = np.concatenate([speech[:3 * SR], np.zeros(4 * SR, np.float32), _noise(4.0)])
    preds = StreamingRecognizer(model).push(audio)
    assert preds[0].speech and preds[0].label is not None  # the first window is the speech
    late = [p for p in preds if p.window_start_s >= 3.2]  # silence, then noise only
    assert late and all(not p.speech and p.label is None for p in late)
    assert all(abs(sum(p.probabilities.values()) - 1) < 1e-4 for p in late)  # still reported
    # with the energy threshold instead (--no-vad), noise counts as speech: what silero-vad fixes
    noisy = [p for p in StreamingRecognizer(model, vad=False).push(audio) if p.window_start_s >= 7.5]
    assert noisy and all(p.speech for p in noisy)


def test_many_streams_scored_together_equal_each_alone(speech):
    """The engine scores all its streams' chunks in one batch per chunk round, each with its own recurrent
    state: the same probabilities as each stream scored alone, whatever the streams' lengths."""
    from stream_ser.vad import score_queued

    xs = [speech, _noise(2.5), np.zeros(SR, np.float32), speech[SR // 3:], speech[:7000]]
    alone = [SpeechDetector().push(x) for x in xs]
    dets = [SpeechDetector() for _ in xs]
    assert all(d.model is dets[0].model for d in dets)  # one model copy per process, not one per stream
    got: list[list[np.ndarray]] = [[] for _ in xs]
    rng = np.random.default_rng(1)
    start = 0
    while start < max(len(x) for x in xs):
        hop = int(rng.integers(300, 9000))
        for d, x in zip(dets, xs):
            d.queue(x[start:start + hop])
        for g, p in zip(got, score_queued(dets)):
            g.append(p)
        start += hop
    for g, a, d in zip(got, alone, dets):
        np.testing.assert_allclose(np.concatenate(g), a, atol=1e-5)
        assert d.n_chunks == len(a)
    assert all(len(p) == 0 for p in score_queued(dets))  # nothing queued: nothing scored, no state change


def test_adaptation_frame_masks_of_a_long_recording_and_of_a_stream_agree(speech):
    """The frames the speaker statistics may learn from: noise frames are out, speech frames mostly in;
    a recording longer than the detector's 12.8 s history keeps its early verdicts; and a stream fed in
    odd chunks gets, segment by segment, the masks the whole recording gets."""
    from stream_ser.config import FrontendConfig
    from stream_ser.recognizer import recording_speech_masks, segment_speech_mask
    cfg = FrontendConfig()
    wave = np.concatenate([_noise(15.0, 0.03), speech])
    masks = recording_speech_masks(wave, cfg)  # [S, L]
    assert masks.shape == (cfg.segments_for_frames(cfg.frames_for(len(wave))), cfg.segment_frames)
    n_noise = int(14.0 * SR) // cfg.shift_samples  # segments that lie wholly in the noise
    assert masks[:n_noise].float().mean() < 0.05  # the first ones too, 15 s before the end
    assert masks[-5:].float().mean() > 0.5
    det, got, i = SpeechDetector(), [], 0
    rng = np.random.default_rng(4)
    while i < len(wave):  # as a stream: each segment's mask when the segment completes
        n = int(rng.integers(100, 6000))
        det.push(wave[i:i + n])
        i += n
        while len(got) < len(masks) and len(got) * cfg.shift_samples + cfg.segment_samples <= i:
            s = len(got)
            got.append(segment_speech_mask(*det.history(), s, cfg))
    assert len(got) == len(masks)
    np.testing.assert_array_equal(np.stack(got), masks.numpy())


def test_the_rebuilt_network_equals_silero_vads_own_model(speech):
    """SileroNet (the network rebuilt from the wheel's weights, the STFT as an FFT, the state outside)
    against silero-vad's TorchScript model called chunk by chunk as silero's own code calls it: the same
    probabilities on speech, noise and silence, state carried across all of them; and the check made when
    it loads refuses a network that differs."""
    import copy
    import warnings

    from stream_ser.vad import CHUNK_SAMPLES, _checked, _shared_model, model_path

    x = np.concatenate([speech[:2 * SR], _noise(1.0, 0.05), np.zeros(SR // 2, np.float32), speech[2 * SR:]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(model_path()), map_location="cpu").eval()
    scripted.reset_states()
    chunks = torch.from_numpy(x[: len(x) // CHUNK_SAMPLES * CHUNK_SAMPLES].copy()).view(-1, CHUNK_SAMPLES)
    with torch.inference_mode():
        want = torch.cat([scripted(ch[None], SR)[:, 0] for ch in chunks]).numpy()
    got = SpeechDetector().push(x)
    assert len(got) == len(want) == len(x) // CHUNK_SAMPLES
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert ((got > 0.5) == (want > 0.5)).mean() > 0.99 and (want > 0.5).any() and (want < 0.5).any()
    net = _shared_model()
    _checked(net, scripted)  # what loading checks: passes for the real one ...
    wrong = copy.deepcopy(net)
    with torch.no_grad():
        wrong.out.bias += 0.5
    with pytest.raises(ValueError, match="differs from silero-vad"):
        _checked(wrong, scripted)  # ... and not for another network


def test_frame_masks_of_many_streams_at_once_equal_each_alone(speech):
    """An engine hop computes every new segment's frame mask in one call (``segment_speech_masks``), each
    from its own stream's chunk history: detectors that heard different audio, different amounts of it
    (one past its 12.8 s history, so its first kept chunk is not chunk 0), asked for different segments."""
    from stream_ser.config import FrontendConfig
    from stream_ser.recognizer import segment_speech_mask, segment_speech_masks
    cfg = FrontendConfig()
    waves = [speech, np.concatenate([_noise(14.0, 0.02), speech]), np.concatenate([speech[:SR], _noise(1.5)])]
    dets = [SpeechDetector() for _ in waves]
    for d, w in zip(dets, waves):
        d.push(w)
    histories = [d.history() for d in dets]
    assert histories[1][1] > 0 and histories[0][1] == 0
    last = [cfg.segments_for_frames(cfg.frames_for(len(w))) - 1 for w in waves]
    jobs = [(0, last[0]), (1, last[1]), (2, last[2]), (1, last[1] - 3), (0, 2)]
    many = segment_speech_masks([histories[i] for i, _ in jobs], [s for _, s in jobs], cfg)
    assert many.shape == (len(jobs), cfg.segment_frames) and many.dtype == bool
    for row, (i, s) in zip(many, jobs):
        np.testing.assert_array_equal(row, segment_speech_mask(*histories[i], s, cfg))
    assert many[0].mean() > 0.5 and many[2].mean() < 0.5  # speech kept, noise not: the masks say something
    # a detector's speech fraction over a span reads the same history
    d = dets[0]
    probs, first = d.history()
    assert d.speech_fraction(0, len(waves[0])) == pytest.approx(np.mean(probs > 0.5))
