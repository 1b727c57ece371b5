"""Probability calibration: a fitted temperature makes confidences honest and never changes a label, on
every path that turns logits into probabilities (offline, the API, the stream, the engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from offline.calibrate import at_temperature, ece, fit_temperature, nll
from offline.cli import main as offline_main
from stream_ser.audio import load_audio
from stream_ser.config import FrontendConfig, ModelConfig
from stream_ser.engine import MultiStreamEngine
from stream_ser.model import EmotionModel, load_checkpoint, save_checkpoint
from stream_ser.recognizer import StreamingRecognizer

LABELS = ("anger", "boredom", "neutral")


def _overconfident(n: int, k: int, t_true: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); the 'model' reports softmax(z * t_true): over-confident by t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=p) for p in p_true])
    zs = z * t_true
    return np.exp(zs) / np.exp(zs).sum(1, keepdims=True), y


def test_fit_recovers_the_temperature_and_keeps_every_label():
    probs, y = _overconfident(6000, 5, t_true=2.5)
    t = fit_temperature(probs, y)
    assert 2.2 < t < 2.8
    cal = at_temperature(probs, t)
    assert (cal.argmax(1) == probs.argmax(1)).all()
    assert nll(cal, y) < nll(probs, y) - 0.05 and ece(cal, y) < ece(probs, y) / 3
    # well-calibrated input: the fit leaves it alone
    p1, y1 = _overconfident(6000, 5, t_true=1.0, seed=1)
    assert 0.9 < fit_temperature(p1, y1) < 1.1
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64))


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    torch.manual_seed(11)
    model = EmotionModel(FrontendConfig(image_size=64), ModelConfig(labels=LABELS)).eval()
    path = tmp_path_factory.mktemp("cal") / "model.pt"
    save_checkpoint(model, path, compact=True)
    return path


def _loso_run(folder, labels, probs, true):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"labels": list(labels), "fold_runs": [
        {"fold": "a", "predictions": {"probs": probs[: len(true) // 2].tolist(), "true": true[: len(true) // 2].tolist()}},
        {"fold": "b", "predictions": {"probs": probs[len(true) // 2:].tolist(), "true": true[len(true) // 2:].tolist()}}]}))
    return folder


def test_calibrate_command_writes_a_checkpoint_whose_every_path_uses_the_temperature(small_checkpoint, tmp_path,
                                                                                     emodb_wav, capsys):
    probs, y = _overconfident(3000, len(LABELS), t_true=2.0, seed=2)
    run = _loso_run(tmp_path / "run", LABELS, probs, y)
    out = tmp_path / "calibrated.pt"
    assert offline_main(["calibrate", str(run), "--checkpoint", str(small_checkpoint), "--out", str(out)]) == 0
    assert "temperature" in capsys.readouterr().out
    plain, cal = load_checkpoint(small_checkpoint, precision="fp32"), load_checkpoint(out, precision="fp32")
    t = cal.temperature
    assert plain.temperature == 1.0 and 1.7 < t < 2.3
    assert cal.meta["calibration"]["ece_after"] < cal.meta["calibration"]["ece_before"]
    assert "calibrated" in cal.describe() and "calibrated" not in plain.describe()
    # the weights are the stored ones, untouched
    for (k, a), b in zip(plain.state_dict().items(), cal.state_dict().values()):
        assert torch.equal(a, b), k

    wave = load_audio(emodb_wav("03a01Fa"))
    x = wave.numpy()
    # offline / API
    p0, p1 = plain.predict([wave]).numpy(), cal.predict([wave]).numpy()
    np.testing.assert_allclose(p1, at_temperature(p0, t), atol=1e-5)
    assert (p0.argmax(1) == p1.argmax(1)).all()
    # one stream
    s0, s1 = StreamingRecognizer(plain).push(x), StreamingRecognizer(cal).push(x)
    a0 = np.array([[p.probabilities[lab] for lab in LABELS] for p in s0])
    a1 = np.array([[p.probabilities[lab] for lab in LABELS] for p in s1])
    np.testing.assert_allclose(a1, at_temperature(a0, t), atol=1e-5)
    assert [p.label for p in s0] == [p.label for p in s1]
    # the multi-stream engine
    eng = MultiStreamEngine(cal)
    eng.add_stream("s")
    eng.feed("s", x)
    got = eng.step()
    e1 = np.array([[p.probabilities[lab] for lab in LABELS] for p in got])
    np.testing.assert_allclose(e1, a1, atol=1e-4)


def test_calibrate_refuses_runs_of_other_labels_and_missing_files(small_checkpoint, tmp_path, capsys):
    probs, y = _overconfident(100, 4, t_true=2.0)
    run = _loso_run(tmp_path / "other", ("anger", "boredom", "neutral", "fear"), probs, y)
    out = tmp_path / "x.pt"
    assert offline_main(["calibrate", str(run), "--checkpoint", str(small_checkpoint), "--out", str(out)]) == 2
    assert "differ from the checkpoint" in capsys.readouterr().err and not out.exists()
    assert offline_main(["calibrate", str(tmp_path / "none"), "--checkpoint", str(small_checkpoint),
                         "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert offline_main(["calibrate", str(run), "--checkpoint", str(tmp_path / "no.pt"), "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert offline_main(["calibrate", str(run), "--checkpoint", str(junk), "--out", str(out)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err and not out.exists()
