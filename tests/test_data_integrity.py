"""No silent data mix-ups: utterance ids unique by path, feature-cache entries tied to the file they came from."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
import torch

from offline.corpora import CorpusError, load_manifest
from offline.train import FeatureBank
from stream_ser.config import FrontendConfig


def _tone(path, hz: float, seconds: float = 1.0):
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000)


def _manifest(folder, rows):
    (folder / "manifest.csv").write_text("path,label,speaker\n" + "".join(f"{p},{l},{s}\n" for p, l, s in rows))
    return folder / "manifest.csv"


def test_same_file_name_under_two_speakers_stays_two_utterances(tmp_path):
    for spk, hz in (("spkA", 200.0), ("spkB", 2000.0)):
        (tmp_path / spk).mkdir()
        _tone(tmp_path / spk / "clip.wav", hz)
    c = load_manifest(_manifest(tmp_path, [("spkA/clip.wav", "x", "A"), ("spkB/clip.wav", "y", "B")]))
    assert sorted(u.uid for u in c.utterances) == ["spkA/clip", "spkB/clip"]
    bank = FeatureBank(c, FrontendConfig(), tmp_path / "cache", torch.device("cpu"), log=lambda m: None)
    uids, lm = bank.log_mels([u.uid for u in c.utterances], 1.0)
    assert len(uids) == 2 and not torch.allclose(lm[0], lm[1])  # each speaker's own audio
    with pytest.raises(CorpusError, match="more than once"):
        load_manifest(_manifest(tmp_path, [("spkA/clip.wav", "x", "A"), ("spkA/clip.wav", "x", "B")]))


def test_two_corpora_with_one_name_never_share_features(tmp_path):
    cache = tmp_path / "cache"
    got = []
    for name, hz in (("one", 300.0), ("two", 3000.0)):
        d = tmp_path / name
        d.mkdir()
        _tone(d / "a.wav", hz)
        c = load_manifest(_manifest(d, [("a.wav", "x", "s")]))  # both are called "manifest"
        assert c.name == "manifest"
        bank = FeatureBank(c, FrontendConfig(), cache, torch.device("cpu"), log=lambda m: None)
        got.append(bank.log_mels(["a"], 1.0)[1][0])
    assert len(list(cache.iterdir())) == 1  # one cache file, two sets of features
    assert not torch.allclose(got[0], got[1])
    ref = FeatureBank(load_manifest(tmp_path / "two" / "manifest.csv"), FrontendConfig(), None, torch.device("cpu"),
                      log=lambda m: None).log_mels(["a"], 1.0)[1][0]
    torch.testing.assert_close(got[1], ref)


def test_a_repaired_file_is_used_again(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.wav").write_bytes(b"RIFF broken")
    _tone(d / "b.wav", 440.0)
    m = _manifest(d, [("a.wav", "x", "s"), ("b.wav", "x", "s")])
    logs = []
    bank = FeatureBank(load_manifest(m), FrontendConfig(), tmp_path / "cache", torch.device("cpu"), log=logs.append)
    uids, _ = bank.log_mels(["a", "b"], 1.0)
    assert uids == ["b"] and any("a.wav" in line for line in logs)
    # still bad in a new run: skipped from the cache without reading it again
    again = FeatureBank(load_manifest(m), FrontendConfig(), tmp_path / "cache", torch.device("cpu"), log=lambda x: None)
    assert again.log_mels(["a", "b"], 1.0)[0] == ["b"] and "a" in again.bad
    # repaired: computed and used
    _tone(d / "a.wav", 880.0, seconds=1.5)
    fixed = FeatureBank(load_manifest(m), FrontendConfig(), tmp_path / "cache", torch.device("cpu"), log=lambda x: None)
    assert fixed.log_mels(["a", "b"], 1.0)[0] == ["a", "b"] and "a" not in fixed.bad
    # changed contents (same size, new mtime) are recomputed, not served stale
    before = fixed.log_mels(["b"], 1.0)[1][0]
    _tone(d / "b.wav", 1234.0)
    st = os.stat(d / "b.wav")
    os.utime(d / "b.wav", ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    after = FeatureBank(load_manifest(m), FrontendConfig(), tmp_path / "cache", torch.device("cpu"),
                        log=lambda x: None).log_mels(["b"], 1.0)[1][0]
    assert not torch.allclose(before, after)


def test_absurdly_scaled_audio_is_a_bad_file_not_nan(tmp_path):
    from offline.corpora import load_waves
    from stream_ser.audio import AudioError, check_samples, load_audio
    path = tmp_path / "huge.wav"
    sf.write(path, (np.sin(np.arange(16000) / 10) * 1e30).astype(np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="must lie in"):
        load_audio(path)
    c = load_manifest(_manifest(tmp_path, [("huge.wav", "x", "s")]))
    waves, bad = load_waves(c.utterances)
    assert not waves and len(bad) == 1  # reported and counted, the corpus run goes on
    assert check_samples(np.full(10, 1.5, np.float32)).max() == 1.5  # mild clipping is still audio


@pytest.mark.parametrize("field,value", [("hop_length", 0), ("sample_rate", 0), ("image_size", 8),
                                         ("n_mels", -1), ("utterance_s", 0.0)])
def test_impossible_frontend_configs_are_refused(field, value, tmp_path):
    from stream_ser.model import CheckpointError, EmotionModel, load_checkpoint, save_checkpoint
    with pytest.raises(ValueError, match=field):
        FrontendConfig(**{field: value})
    # a checkpoint carrying one is a clear CheckpointError, not a crash later
    path = save_checkpoint(EmotionModel(FrontendConfig(image_size=64)), tmp_path / "m.pt", compact=True)
    payload = torch.load(path, weights_only=True)
    payload["frontend_config"][field] = value
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=field):
        load_checkpoint(path)


@pytest.mark.parametrize("bad,message", [(np.nan, "1 of 100 samples are NaN or infinite"),
                                         (np.inf, "NaN or infinite"), (-np.inf, "NaN or infinite"),
                                         (-2e3, "samples reach 2e\\+03"), (5e4, "samples reach 5e\\+04")])
def test_one_bad_sample_in_a_block_is_found(bad, message):
    """A live block is checked by its extremes (two reductions, no temporary array): one NaN, infinity or
    wildly scaled sample anywhere in it, even where the others are fine, is still refused and named."""
    from stream_ser.audio import AudioError, check_samples
    x = np.sin(np.arange(100, dtype=np.float32) / 7) * 0.5
    assert check_samples(x) is x  # a good float32 block passes as it is, not copied
    x[63] = bad
    with pytest.raises(AudioError, match=message):
        check_samples(x, "stream")
