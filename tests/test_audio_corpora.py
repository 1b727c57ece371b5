"""Audio loading, bad files, the three corpus loaders and speed perturbation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from offline.augment import PAPER_SPEEDS, speed_perturb
from offline.corpora import (CorpusError, load_emodb, load_iemocap, load_manifest, load_waves)
from stream_ser.audio import AudioError, load_audio

# from ../shared/data/emodb/README.md
EMODB_EMOTIONS = {"anger": 127, "boredom": 81, "disgust": 46, "fear": 69, "happiness": 71, "sadness": 62, "neutral": 79}
EMODB_SPEAKERS = {"03": 49, "08": 58, "09": 43, "10": 38, "11": 55, "12": 35, "13": 61, "14": 69, "15": 56, "16": 71}


def _tone(hz: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _peak_hz(x: torch.Tensor, rate: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(x.numpy()))
    return float(np.argmax(spec)) * rate / len(x)


def test_emodb_counts_match_its_readme(emodb_dir):
    c = load_emodb(emodb_dir)
    assert len(c.utterances) == 535 and not c.skipped
    assert dict(c.counts(lambda u: u.label)) == EMODB_EMOTIONS
    assert dict(c.counts(lambda u: u.speaker)) == EMODB_SPEAKERS
    assert c.labels == ("anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral")
    assert load_emodb(emodb_dir / "wav").utterances == c.utterances


def test_emodb_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="EMO-DB folder not found"):
        load_emodb(tmp_path / "nope")
    (tmp_path / "x.wav").write_bytes(b"")
    with pytest.raises(CorpusError, match="no EMO-DB wav files"):
        load_emodb(tmp_path)


def _iemocap_tree(root):
    """A small tree in the release layout: improvised and scripted dialogues, all label kinds."""
    rows = {
        1: [("Ses01F_impro01", "F000", "neu"), ("Ses01F_impro01", "M001", "ang"), ("Ses01F_impro01", "F002", "exc"),
            ("Ses01F_script01_1", "F000", "sad"), ("Ses01F_impro02", "M000", "hap"), ("Ses01F_impro02", "F001", "fru")],
        2: [("Ses02M_impro03", "F000", "sad"), ("Ses02M_impro03", "M001", "xxx"), ("Ses02M_impro03", "M002", "neu")],
    }
    for sess, items in rows.items():
        ev = root / f"Session{sess}" / "dialog" / "EmoEvaluation"
        ev.mkdir(parents=True)
        by_dialog = {}
        for dialog, utt, lab in items:
            by_dialog.setdefault(dialog, []).append((utt, lab))
            wav = root / f"Session{sess}" / "sentences" / "wav" / dialog / f"{dialog}_{utt}.wav"
            wav.parent.mkdir(parents=True, exist_ok=True)
            sf.write(wav, _tone(200, 0.5, 16000), 16000)
        for dialog, us in by_dialog.items():
            lines = ["% header line", ""]
            for k, (utt, lab) in enumerate(us):
                lines += [f"[{k}.0000 - {k + 1}.5000]\t{dialog}_{utt}\t{lab}\t[2.5000, 2.5000, 2.5000]",
                          f"C-E1:\tNeutral;\t()", ""]
            (ev / f"{dialog}.txt").write_text("\n".join(lines))


def test_iemocap_improvised_four_classes_by_session(tmp_path):
    _iemocap_tree(tmp_path)
    c = load_iemocap(tmp_path)
    got = sorted((u.uid, u.label, u.speaker, u.fold) for u in c.utterances)
    assert got == [
        ("Ses01F_impro01_F000", "neutral", "Ses01F", "Ses01"),
        ("Ses01F_impro01_M001", "angry", "Ses01M", "Ses01"),
        ("Ses01F_impro02_M000", "happy", "Ses01M", "Ses01"),
        ("Ses02M_impro03_F000", "sad", "Ses02F", "Ses02"),
        ("Ses02M_impro03_M002", "neutral", "Ses02M", "Ses02"),
    ]
    assert c.labels == ("angry", "happy", "neutral", "sad")
    assert len(load_iemocap(tmp_path, include_excited=True).utterances) == 6
    with pytest.raises(CorpusError, match="release layout"):
        load_iemocap(tmp_path / "Session1")


def test_manifest(tmp_path):
    for i in range(3):
        sf.write(tmp_path / f"a{i}.wav", _tone(300, 0.3, 16000), 16000)
    (tmp_path / "m.csv").write_text("path,label,speaker,fold\na0.wav,happy,s1,f1\na1.wav,sad,s2,\n"
                                    f"{tmp_path / 'a2.wav'},happy,s3,f1\n")
    c = load_manifest(tmp_path / "m.csv")
    assert c.labels == ("happy", "sad")
    assert [u.fold for u in c.utterances] == ["f1", "s2", "f1"]
    assert all(u.path.exists() for u in c.utterances)
    (tmp_path / "bad.csv").write_text("file,emotion\nx,y\n")
    with pytest.raises(CorpusError, match="path,label,speaker"):
        load_manifest(tmp_path / "bad.csv")


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_load_formats_rates_and_stereo(tmp_path, subtype):
    x = _tone(440, 1.0, 44100)
    stereo = np.stack([x, x], axis=1)
    p = tmp_path / "s.wav"
    sf.write(p, stereo, 44100, subtype=subtype)
    y = load_audio(p)
    assert y.dtype == torch.float32 and y.dim() == 1
    assert abs(len(y) - 16000) <= 1
    assert abs(_peak_hz(y) - 440) < 2
    assert 0.45 < float(y.abs().max()) < 0.55


def test_load_flac(tmp_path):
    p = tmp_path / "a.flac"
    sf.write(p, _tone(500, 0.5, 22050), 22050)
    y = load_audio(p)
    assert abs(len(y) - 8000) <= 1 and abs(_peak_hz(y) - 500) < 3


def _bad_files(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("this is not audio at all")
    good = tmp_path / "good.wav"
    sf.write(good, _tone(300, 0.5, 16000), 16000)
    data = good.read_bytes()
    (tmp_path / "truncated.wav").write_bytes(data[:30])
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    nan = _tone(300, 0.2, 16000)
    nan[:] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    return good


@pytest.mark.parametrize("name,reason", [("empty.wav", "empty file"), ("text.wav", "not a readable audio"),
                                         ("truncated.wav", "not a readable audio"), ("zero.wav", "zero-length"),
                                         ("nan.wav", "NaN"), ("missing.wav", "not found")])
def test_bad_files_raise_one_clear_error(tmp_path, name, reason):
    _bad_files(tmp_path)
    with pytest.raises(AudioError, match=reason) as e:
        load_audio(tmp_path / name)
    assert name in str(e.value)


def test_corpus_scan_reports_bad_files_and_goes_on(tmp_path):
    _bad_files(tmp_path)
    (tmp_path / "m.csv").write_text("path,label,speaker\n" + "".join(
        f"{n},x,s\n" for n in ["good.wav", "empty.wav", "text.wav", "truncated.wav", "zero.wav", "nan.wav", "missing.wav"]))
    c = load_manifest(tmp_path / "m.csv")
    seen = []
    waves, bad = load_waves(c.utterances, on_error=seen.append)
    assert list(waves) == ["good"]
    assert len(bad) == 6 and seen == bad
    assert {e.source.rsplit("/", 1)[1] for e in bad} == {"empty.wav", "text.wav", "truncated.wav", "zero.wav",
                                                          "nan.wav", "missing.wav"}


@pytest.mark.parametrize("factor", PAPER_SPEEDS)
def test_speed_perturbation_changes_duration_and_pitch(factor):
    x = torch.from_numpy(_tone(400, 1.0, 16000))
    y = speed_perturb(x, factor)
    assert abs(len(y) - 16000 / factor) <= 2
    assert math.isclose(_peak_hz(y), 400 * factor, rel_tol=0.01)
    if factor == 1.0:
        assert y is x
