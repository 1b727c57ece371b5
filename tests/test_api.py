"""The Python API (stream_ser.load_model -> recognize / stream) and `stream-ser file`, on real EMO-DB audio."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import stream_ser
from stream_ser.api import MIN_SPEECH_FRACTION, EmotionRecognizer
from stream_ser.audio import AudioError, load_audio
from stream_ser.model import CheckpointError

SHORT = "03a01Wa"  # 1.9 s: shorter than one 3 s window
LONG = "16b01Tb"  # 4.4 s: 5 rolling windows


@pytest.fixture(scope="module")
def model():
    return stream_ser.load_model()


def test_public_names():
    assert "load_model" in dir(stream_ser) and stream_ser.__version__


def test_file_and_array_at_any_rate_agree(model, emodb_wav):
    path = emodb_wav(LONG)
    r = model.recognize(path)
    assert r.label in model.labels and r.speech and 4.3 < r.duration_s < 4.5
    assert abs(sum(r.probabilities.values()) - 1) < 1e-4 and r.confidence == max(r.probabilities.values())
    full = [w for w in r.windows if not w.partial]
    # 7 partial windows while the first 3 s fill, 5 full ones, and the end flushed into two more (the
    # last samples lie in two overlapping segments; the padding completes both)
    assert len(r.windows) == 14 and len(full) == 7 and all(w.label for w in r.windows)
    assert r.windows[-1].end_s >= r.duration_s
    x = load_audio(path).numpy()
    same = model.recognize(x, sample_rate=16000)
    assert same.probabilities == pytest.approx(r.probabilities, abs=1e-6)
    # the same audio at 22.05 kHz, as stereo [N, 2], and channels-first [2, N] as a torch tensor
    import soxr
    x22 = soxr.resample(x, 16000, 22050).astype(np.float32)
    for arr in (x22, np.stack([x22, x22], axis=1), torch.from_numpy(np.stack([x22, x22]))):
        got = model.recognize(arr, sample_rate=22050)
        assert got.label == r.label and abs(got.duration_s - r.duration_s) < 0.01
        assert max(abs(got.probabilities[k] - r.probabilities[k]) for k in r.probabilities) < 0.05


def test_short_file_gets_a_whole_file_answer_like_the_offline_model(model, emodb_wav):
    path = emodb_wav(SHORT)
    r = model.recognize(path)
    assert r.label is not None  # shorter than a window, but still an answer
    assert r.windows and all(w.partial for w in r.windows)  # and partial windows, the last one at its end
    m = model.model
    wave = load_audio(path)
    # The windows are read as a live stream reads them: from sample 0 (the whole-file answer's 3 s window
    # starts at the speech onset), each segment with the speaker statistics of its moment. Started at the
    # onset, with the statistics frozen at the whole file's, the stream's final window is the whole-file
    # answer (its flush pads every segment that holds audio, as the 3 s window's zero padding does).
    from stream_ser.recognizer import StreamingRecognizer
    rec = StreamingRecognizer(m, adapt=False, vad=model.vad)
    if m.frontend_config.normalization == "speaker":
        rec.enroll(wave.numpy())
    onset = m.frontend.speech_onset(wave) if m.frontend_config.start_at_speech else 0
    last = (rec.push(wave.numpy()[onset:]) + rec.flush())[-1]
    assert last.partial
    # int8: a segment embedded alone (streaming) and in a batch (whole file) differ by rounding
    assert last.probabilities == pytest.approx(r.probabilities, abs=3e-3)
    stats = None
    if m.frontend_config.normalization == "speaker":  # the file's own speech, pooled with the corpus statistics
        from stream_ser.adaptation import RunningStats
        from stream_ser.recognizer import recording_speech_masks
        rs = RunningStats(m.frontend.corpus_stats())
        raw = m.frontend.raw_segments_from_log_mel(m.frontend.log_mel(wave))
        # speech frames: the level gate and, with the speech detector on (the default), its verdicts
        rs.update(raw, recording_speech_masks(wave.numpy(), m.frontend_config)[None] if model.vad else None)
        stats = (rs.current().mean, rs.current().std)
        assert r.probabilities != pytest.approx(dict(zip(m.labels, m.predict([wave])[0].tolist())), abs=1e-3)
    ref = m.predict([wave], stats=stats)[0]
    assert r.probabilities == pytest.approx(dict(zip(m.labels, ref.tolist())), abs=1e-5)


@pytest.mark.parametrize("kind", ["silence", "white noise", "hum"])
def test_silence_and_noise_are_no_speech(model, kind):
    n = 4 * 16000
    x = {"silence": np.zeros(n, np.float32),
         "white noise": np.random.default_rng(1).normal(0, 0.1, n).astype(np.float32),
         "hum": (0.3 * np.sin(2 * np.pi * 50 * np.arange(n) / 16000)).astype(np.float32)}[kind]
    r = model.recognize(x, sample_rate=16000)
    assert r.label is None and not r.speech and r.speech_activity < MIN_SPEECH_FRACTION
    assert all(w.label is None and not w.speech for w in r.windows)
    assert len([w for w in r.windows if not w.partial]) == 6  # 4 rolling, 2 flushed at the end
    assert json.loads(json.dumps(r.to_dict()))["label"] is None


def test_speech_is_speech(model, emodb_wav):
    r = model.recognize(emodb_wav(LONG))
    assert r.speech and r.label in model.labels and r.speech_activity > 0.5


def test_whole_file_speech_share_comes_from_the_windows_detector_without_a_second_pass(model, emodb_wav, monkeypatch):
    """With windows, silero-vad scores each 32 ms chunk once (the windows' detector also gives the file's
    speech share), and the share equals the one a separate whole-file pass gives."""
    from stream_ser import vad
    without = model.recognize(emodb_wav(LONG), windows=False)
    scored = []
    real_push = vad.SpeechDetector.push
    monkeypatch.setattr(vad.SpeechDetector, "push", lambda self, x: scored.append(len(x)) or real_push(self, x))
    r = model.recognize(emodb_wav(LONG))
    n = round(r.duration_s * 16000)
    assert sum(scored) < 2 * n  # once over the file (plus the flush's padding), not twice
    assert r.speech_activity == without.speech_activity and r.label == without.label
    assert r.windows and all(w.speech for w in r.windows[:2])


def test_stream_push_at_48k_gives_rolling_windows(model, emodb_wav):
    import soxr
    x = soxr.resample(load_audio(emodb_wav(LONG)).numpy(), 16000, 48000).astype(np.float32)
    s = model.stream(sample_rate=48000)
    got = []
    for i in range(0, len(x), 4800):
        got += s.push(x[i:i + 4800])
    full = [w for w in got if not w.partial]
    assert 4 <= len(full) <= 5 and all(w.end_s - w.start_s == pytest.approx(2.895, abs=0.01) for w in full)
    assert [w.partial for w in got[:7]] == [True] * 7
    last = s.flush()
    assert len(last) == 2 and last[-1].end_s * 16000 >= len(x) / 3
    assert s.flush() == []  # the padding is not flushed again
    s.reset()
    assert s.push(x[:4800]) == []  # 0.1 s: not a segment yet


def test_api_errors(model, tmp_path):
    with pytest.raises(ValueError, match="sample_rate is required"):
        model.recognize(np.zeros(16000, np.float32))
    with pytest.raises(ValueError, match="sample_rate must be"):
        model.recognize(np.zeros(16000, np.float32), sample_rate=0)
    with pytest.raises(AudioError, match="NaN"):
        model.recognize(np.full(16000, np.nan, np.float32), sample_rate=16000)
    with pytest.raises(AudioError, match="not found"):
        model.recognize(tmp_path / "missing.wav")
    with pytest.raises(CheckpointError):
        stream_ser.load_model(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="device"):
        stream_ser.load_model(device="tpu")


def test_file_command_json_lines_and_errors(emodb_wav, tmp_path):
    bad = tmp_path / "empty.wav"
    bad.write_bytes(b"")
    cmd = [sys.executable, "-m", "stream_ser.cli", "file", str(emodb_wav(SHORT)), str(bad), str(emodb_wav(LONG)),
           "--json", "--windows"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(emodb_wav(SHORT)), str(bad), str(emodb_wav(LONG))]
    assert rows[0]["label"] and all(w["partial"] for w in rows[0]["windows"]) and "error" not in rows[0]
    assert "empty" in rows[1]["error"]
    assert len([w for w in rows[2]["windows"] if not w["partial"]]) == 7 and rows[2]["speech"] is True
    assert "model:" in p.stderr and "error:" in p.stderr
    # stdin, text output, exit 0
    data = emodb_wav(SHORT).read_bytes()
    p2 = subprocess.run([sys.executable, "-m", "stream_ser.cli", "file", "-"], input=data, capture_output=True,
                        timeout=300)
    assert p2.returncode == 0 and p2.stdout.decode().startswith("-: ") and b"%" in p2.stdout


def test_recognizer_wraps_any_model():
    from stream_ser.model import EmotionModel
    from stream_ser.config import FrontendConfig
    torch.manual_seed(0)
    rec = EmotionRecognizer(EmotionModel(FrontendConfig(image_size=64, normalization="speaker")))
    r = rec.recognize(np.random.default_rng(0).normal(0, 0.1, 20000).astype(np.float32), sample_rate=16000)
    assert set(r.probabilities) == set(rec.labels) and r.windows and all(w.partial for w in r.windows)
