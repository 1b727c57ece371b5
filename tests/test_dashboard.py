"""The dashboard renders predictions and status to a plain console with the expected labels and numbers."""

from __future__ import annotations

from rich.console import Console

from stream_ser import protocol as P
from stream_ser.dashboard import DashboardState, render

LABELS = ["anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral"]


def _pred(seq, label, conf, activity=0.9):
    probs = {lab: (conf if lab == label else (1 - conf) / 6) for lab in LABELS}
    return P.prediction({"seq": seq, "window_start_s": 0.32 * (seq - 1), "window_end_s": 0.32 * (seq - 1) + 2.895,
                         "probabilities": probs, "label": label, "confidence": conf, "attention": [0.125] * 8,
                         "speech_activity": activity, "level_dbfs": -23.4,
                         "timings_ms": {"frontend": 1.2, "embed": 12.5, "head": 0.9, "total": 17.3}, "stream": None})


def _text(state) -> str:
    console = Console(record=True, width=120, force_terminal=False, color_system=None)
    console.print(render(state))
    return console.export_text()


def test_render_sequence_of_predictions():
    s = DashboardState()
    s.update(P.hello(LABELS, "dcnn_blstmwa (7 classes) — emodb test", {}, 0.32, 3.0))
    before = _text(s)
    assert "waiting for the first prediction" in before and "emodb test" in before
    for i, (lab, c) in enumerate([("anger", 0.61), ("anger", 0.7), ("sadness", 0.83)], start=1):
        s.update(_pred(i, lab, c))
    s.update(P.status(overruns=3, lost_samples=480, dropped_total=0, subscribers=2,
                      latency_ms={"p50": 17.3, "p95": 20.1, "p99": 25.9}, source="file: x.wav"))
    out = _text(s)
    assert "SADNESS" in out and "83.0%" in out
    for lab in LABELS:
        assert lab in out
    assert "2.8%" in out  # (1 - 0.83) / 6 for the other labels
    assert "AAS" in out  # history: anger, anger, sadness
    assert "-23.4 dBFS" in out and "90%" in out
    assert "p50 17.3 / p95 20.1 / p99 25.9" in out and "overruns 3 (480 samples)" in out
    assert "subscribers 2" in out and "#3" in out


def test_silence_and_end_are_shown():
    s = DashboardState()
    s.update(_pred(1, "neutral", 0.4, activity=0.0))  # an older server: no `speech` field
    s.update(P.end("source ended"))
    out = _text(s)
    assert "NO SPEECH" in out and "NEUTRAL" not in out
    assert "stream ended: source ended" in out


def test_no_speech_windows_show_no_emotion_and_a_gap_in_the_history():
    s = DashboardState()
    s.update(_pred(1, "anger", 0.8))
    m = _pred(2, "neutral", 0.9, activity=0.05)
    m.update(label=None, speech=False)
    s.update(m)
    s.update(_pred(3, "sadness", 0.7))
    out = _text(s)
    assert "A·S" in out and "·=no speech" in out
    s.update(m)
    out = _text(s)
    assert "NO SPEECH" in out and "neutral 90%" in out and "NEUTRAL" not in out


def test_history_marks_are_unambiguous():
    s = DashboardState()
    s.update(P.hello(LABELS + ["calm", "surprise"], "m", {}, 0.32, 3.0))
    s.update(_pred(1, "sadness", 0.8))
    out = _text(s)
    assert "S=sadness" in out and "U=surprise" in out and "C=calm" in out


def test_history_keeps_about_thirty_seconds():
    s = DashboardState()
    for i in range(1, 201):
        s.update(_pred(i, "fear", 0.5))
    span = s.history[-1][0] - s.history[0][0]
    assert 29 <= span <= 30 and len(s.history) < 100


def test_portaudio_status_flags_are_shown():
    s = DashboardState()
    s.update(P.status(portaudio_status={"input_overflow": 4, "input_underflow": 0, "other": 1}))
    assert "PortAudio: 4 input overflows, 0 underflows, 1 other" in _text(s)


def test_speaker_adaptation_is_shown():
    s = DashboardState()
    msg = _pred(1, "anger", 0.7)
    msg["adaptation"] = {"on": True, "speech_s": 12.34, "enrolled": False}
    s.update(msg)
    out = _text(s)
    assert "speaker adapt" in out and "on: 12.3 s of this speaker's speech" in out
    msg = _pred(2, "anger", 0.7)
    msg["adaptation"] = {"on": False, "speech_s": 4.0, "enrolled": True}
    s.update(msg)
    assert "frozen: enrolled + 4.0 s" in _text(s)
    s.update(_pred(3, "anger", 0.7))  # a model without speaker normalisation: no such row
    assert "speaker adapt" not in _text(s)


def test_speech_outside_the_trained_levels_is_flagged():
    s = DashboardState()
    s.update(_pred(1, "anger", 0.7))  # -23.4 dBFS: within what the model heard
    assert "input gain" not in _text(s)
    quiet = _pred(2, "anger", 0.7)
    quiet["level_dbfs"] = -61.0
    s.update(quiet)
    assert "quieter than the speech the bundled model was trained on" in _text(s) and "raise the input gain" in _text(s)
    loud = _pred(3, "anger", 0.7)
    loud["level_dbfs"] = -3.0
    s.update(loud)
    assert "louder than" in _text(s) and "lower the input gain" in _text(s)
    silence = _pred(4, "anger", 0.7, activity=0.0)  # no speech: the level of silence says nothing
    silence["level_dbfs"] = -70.0
    s.update(silence)
    assert "input gain" not in _text(s)
