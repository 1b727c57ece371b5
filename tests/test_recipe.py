"""RAVDESS as a corpus, speech-onset windows, speaker-normalised training, pre-trained CNN initialisation,
and the training-recipe levers (masking, mixup, schedules)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from offline import cli as offline_cli
from offline.corpora import RAVDESS_LABELS, load_emodb, load_ravdess, ravdess_intensity
from offline.train import FeatureBank, TrainConfig, augment_segments, build_split, train_model
from stream_ser.adaptation import speaker_stats, speech_frames
from stream_ser.audio import load_audio
from stream_ser.config import FrontendConfig
from stream_ser.features import Frontend
from stream_ser.model import EmotionModel, WeightsError, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RAVDESS = Path(os.environ.get("STREAM_SER_RAVDESS", ROOT.parent / "shared" / "data" / "ravdess"))
TINY = dict(stage1_epochs=1, stage2_epochs=2, stage1_batch=16, image_size=64, runs=1, weights="none")


@pytest.fixture(scope="module")
def ravdess_dir() -> Path:
    if not (RAVDESS / "Actor_01").is_dir():
        pytest.skip(f"RAVDESS not found at {RAVDESS} (set STREAM_SER_RAVDESS or place it at ../shared/data/ravdess)")
    return RAVDESS


def test_ravdess_counts_match_its_readme(ravdess_dir):
    c = load_ravdess(ravdess_dir)
    assert len(c.utterances) == 1440 and len(c.speakers) == 24 and not c.skipped
    assert c.labels == RAVDESS_LABELS
    by_label = c.counts(lambda u: u.label)
    assert by_label["neutral"] == 96 and all(by_label[lab] == 192 for lab in RAVDESS_LABELS if lab != "neutral")
    assert set(c.counts(lambda u: u.speaker).values()) == {60}  # 60 per actor
    per_actor_label = Counter((u.speaker, u.label) for u in c.utterances)
    assert all(n == (4 if lab == "neutral" else 8) for (_, lab), n in per_actor_label.items())
    assert Counter(ravdess_intensity(u) for u in c.utterances) == {"normal": 768, "strong": 672}
    assert len({u.uid for u in c.utterances}) == 1440
    from offline.evaluate import make_folds
    folds = make_folds(c)
    assert len(folds) == 6 and all(len(f.test) == 4 and len(f.val) == 1 and len(f.train) == 19 for f in folds)
    assert sorted(s for f in folds for s in f.test) == c.speakers  # every actor tested exactly once
    assert all(not (set(f.test) & (set(f.val) | set(f.train))) for f in folds)


def test_ravdess_bad_names_are_reported_not_fatal(tmp_path, ravdess_dir):
    src = next((ravdess_dir / "Actor_02").glob("*.flac"))
    (tmp_path / "Actor_02").mkdir()
    (tmp_path / "Actor_02" / src.name).write_bytes(src.read_bytes())
    (tmp_path / "Actor_02" / "notes.flac").write_bytes(b"x")
    c = load_ravdess(tmp_path)
    assert len(c.utterances) == 1 and len(c.skipped) == 1 and "RAVDESS" in c.skipped[0][1]


def test_window_starts_at_speech_onset(ravdess_dir):
    path = sorted((ravdess_dir / "Actor_03").glob("*.flac"))[0]
    wave = torch.cat([torch.zeros(24000), load_audio(path)])  # 1.5 s more silence: speech past the 3 s
    plain, onset = Frontend(), Frontend(FrontendConfig(start_at_speech=True))
    start = onset.speech_onset(wave)
    assert 1.8 * 16000 < start < 3.1 * 16000  # RAVDESS files open with about 1 s of silence
    torch.testing.assert_close(onset.prepare_utterance(wave)[:1000], wave[start:start + 1000])
    speech = lambda fe: speech_frames(fe.raw_segments_from_log_mel(fe.log_mel(fe.prepare_utterance(wave)))).float().mean()
    assert speech(onset) > speech(plain) + 0.2
    assert onset.speech_onset(torch.zeros(48000)) == 0  # silence: nothing to skip
    assert FrontendConfig(start_at_speech=True).log_mel_key() != FrontendConfig().log_mel_key()


def test_offline_speaker_statistics_come_from_each_speakers_own_audio(emodb_dir, tmp_path):
    corpus = load_emodb(emodb_dir).first_per_speaker(4)
    utts = [u for u in corpus.utterances if u.speaker in ("03", "16")]
    cfg = TrainConfig(preset="quick", normalization="speaker", speeds=(1.0,), **TINY)
    bank = FeatureBank(corpus, cfg.frontend_config(), tmp_path, torch.device("cpu"), log=lambda m: None)
    model = EmotionModel(cfg.frontend_config(), cfg.model_config(corpus.labels))
    split = build_split(bank, model, utts, (1.0,), torch.device("cpu"))
    fe = model.frontend
    for spk in ("03", "16"):
        idx = [i for i, uid in enumerate(split.uids) if uid.startswith(spk)]
        _, lm = bank.log_mels([uid.split("@")[0] for uid in (split.uids[i] for i in idx)], 1.0)
        raw = fe.raw_segments_from_log_mel(lm)
        st = speaker_stats(raw)
        torch.testing.assert_close(split.segments[idx], fe.normalize(raw, (st.mean, st.std)))


def test_speaker_normalised_training_stores_the_warm_up_statistics(emodb_dir, tmp_path):
    corpus = load_emodb(emodb_dir).first_per_speaker(3)
    tr = [u for u in corpus.utterances if u.speaker in ("03", "08")]
    va = [u for u in corpus.utterances if u.speaker == "09"]
    cfg = TrainConfig(preset="quick", normalization="speaker", speeds=(1.0,), lr_schedule="onecycle",
                      label_smoothing=0.1, mask_frames=8, mask_bins=8, mixup=0.4, **TINY)
    dev = torch.device("cpu")
    bank = FeatureBank(corpus, cfg.frontend_config(), tmp_path, dev, log=lambda m: None)
    model, info = train_model(bank, tr, va, cfg, dev, seed=3, log=lambda m: None)
    _, lm = bank.log_mels([u.uid for u in tr], 1.0)
    expected = speaker_stats(model.frontend.raw_segments_from_log_mel(lm))
    torch.testing.assert_close(model.frontend.norm_mean, expected.mean)
    assert info["stage1"]["history"] and torch.isfinite(torch.tensor(info["stage2"]["history"][-1]["loss"]))
    # a pre-trained CNN from a stream_ser checkpoint initialises the next model's embedder
    ckpt = save_checkpoint(model, tmp_path / "pre.pt", compact=True)
    m2 = EmotionModel(cfg.frontend_config(), cfg.model_config(("a", "b")), weights=str(ckpt))
    assert (m2.embedder.features[0].weight - model.embedder.features[0].weight).abs().max() < 0.02
    assert (m2.embedder.fc[4].weight - model.embedder.fc[4].weight).abs().max() < 0.01
    assert m2.embedder.classify.out_features == 2  # the new labels' own classifier


def test_bad_weights_files_are_clear_errors(tmp_path, emodb_dir, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(WeightsError, match="not a readable weights file"):
        EmotionModel(weights=str(junk))
    other = tmp_path / "other.pth"
    torch.save({"something": torch.zeros(3)}, other)
    with pytest.raises(WeightsError, match="not an AlexNet"):
        EmotionModel(weights=str(other))
    code = offline_cli.main(["loso", "--corpus", "emodb", "--data", str(emodb_dir), "--weights", str(junk),
                             "--out", str(tmp_path / "run")])
    assert code == 2 and "--weights" in capsys.readouterr().err


def test_masking_zeroes_bands_and_leaves_the_input_alone():
    x = torch.ones(64, 3, 64, 64)
    cfg = TrainConfig(mask_frames=10, mask_bins=6)
    y = augment_segments(x, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.ones_like(x))
    zero_frames = (y == 0).all(dim=(1, 2)).sum(dim=1)  # [N] whole frames zeroed
    zero_bins = (y == 0).all(dim=(1, 3)).sum(dim=1)
    assert zero_frames.max() <= 10 and zero_bins.max() <= 6 and zero_frames.sum() > 0 and zero_bins.sum() > 0
    with pytest.raises(ValueError):
        TrainConfig(lr_schedule="sometimes")


def test_cross_corpus_scores_the_shared_labels_and_counts_other_answers_as_errors():
    from offline.cross_corpus import score
    shared = ["anger", "neutral"]
    model_labels = ["anger", "boredom", "neutral"]
    s = score(["anger", "anger", "neutral", "neutral"], ["anger", "boredom", "neutral", "anger"], shared, model_labels)
    assert s["recall"] == {"anger": 0.5, "neutral": 0.5} and s["uar"] == 0.5 and s["wa"] == 0.5
    assert s["confusion"] == [[1, 1, 0], [1, 0, 1]]


def test_cross_corpus_end_to_end(emodb_dir, ravdess_dir, tmp_path, capsys):
    out = tmp_path / "x"
    args = ["cross", "--train", "emodb", "--train-data", str(emodb_dir), "--test", "ravdess", "--test-data",
            str(ravdess_dir), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--max-per-speaker", "6",
            "--stage1-epochs", "1", "--stage2-epochs", "1", "--image-size", "64", "--normalization", "speaker"]
    assert offline_cli.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["shared_labels"] == ["anger", "disgust", "fear", "happiness", "neutral", "sadness"]
    assert res["left_out_labels"] == ["calm"]  # the first 6 files per actor: neutral and calm
    assert res["n_test"] == 24 * 4 and set(res["summary"]) == {"adapted", "not_adapted"}
    run = res["runs"][0]
    assert len(run["adapted"]["predictions"]["pred"]) == 96 and 0 <= run["adapted"]["uar"] <= 1
    assert "adaptation on" in (out / "report.md").read_text()
    assert "ravdess (adapted)" in capsys.readouterr().out
    # resuming recomputes nothing
    assert offline_cli.main(args) == 0
    assert "done before" in (out / "run.log").read_text()
    # corpora with nothing in common are refused with a clear error
    bad = tmp_path / "m.csv"
    bad.write_text("path,label,speaker\nx.wav,growl,s1\n")
    assert offline_cli.main(["cross", "--train", "emodb", "--train-data", str(emodb_dir), "--test", "csv",
                             "--test-data", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "share no label" in capsys.readouterr().err


def test_loso_with_pretraining_on_another_corpus(emodb_dir, ravdess_dir, tmp_path):
    out = tmp_path / "run"
    args = ["loso", "--corpus", "emodb", "--data", str(emodb_dir), "--preset", "cpu", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--max-per-speaker", "3", "--folds", "03",
            "--stage1-epochs", "1", "--stage2-epochs", "1", "--pretrain", "ravdess", "--pretrain-data",
            str(ravdess_dir), "--pretrain-epochs", "1"]
    assert offline_cli.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["weights"].endswith("pretrain-ravdess.pt") and res["pretrain"]["corpus"] == "ravdess"
    assert res["pretrain"]["utterances"] == 72 and res["config"]["normalization"] == "speaker"
    assert "pre-training the CNN on ravdess" in (out / "report.md").read_text()
    pre = torch.load(out / "pretrain-ravdess.pt", weights_only=True)
    assert pre["meta"]["corpus"] == "ravdess"
    # resuming reuses the pre-training only when the flags ask for that same pre-training
    assert offline_cli.main(args) == 0
    assert "exists (same recipe): not recomputed" in (out / "run.log").read_text()
    assert offline_cli.main([*args, "--pretrain-speeds", "3"]) == 2
    assert offline_cli.main(args[:-1] + ["2"]) == 2  # --pretrain-epochs 2
    # the same corpus cannot pre-train itself
    bad = offline_cli.main(["loso", "--corpus", "emodb", "--data", str(emodb_dir), "--out", str(tmp_path / "b"),
                            "--pretrain", "emodb", "--pretrain-data", str(emodb_dir)])
    assert bad == 2


def test_train_with_pretraining_records_the_licence(emodb_dir, ravdess_dir, tmp_path):
    out = tmp_path / "m" / "model.pt"
    assert offline_cli.main(["train", "--corpus", "emodb", "--data", str(emodb_dir), "--preset", "cpu",
                             "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--max-per-speaker", "2",
                             "--stage1-epochs", "1", "--stage2-epochs", "1", "--pretrain", "ravdess",
                             "--pretrain-data", str(ravdess_dir), "--pretrain-epochs", "1"]) == 0
    from stream_ser.model import load_checkpoint
    m = load_checkpoint(out)
    assert "CC BY-NC-SA 4.0" in m.meta["licence"] and "pre-trained on ravdess" in m.describe()
    assert m.frontend_config.normalization == "speaker" and (out.parent / "pretrain-ravdess.pt").is_file()


def test_a_collapsed_model_is_warned_about():
    from offline.train import warn_if_collapsed
    msgs = []
    assert warn_if_collapsed(torch.zeros(20, dtype=torch.long), 3, ["a", "b", "c"], msgs.append)
    assert "collapsed to one class" in msgs[0] and "'a'" in msgs[0]
    assert not warn_if_collapsed(torch.tensor([0, 1, 2, 0, 1, 2]), 3, ["a", "b", "c"], msgs.append)
    assert len(msgs) == 1


def test_committed_runs_keep_their_fingerprint_when_a_lever_is_added():
    """A run folder can only be resumed or extended (--runs) while its recipe hashes as it did: a lever
    added later (silence_floor) must not change the hash of recipes that leave it off, and must change it
    when on. Checked on a committed run's stored configuration and fold records."""
    from offline.evaluate import config_fingerprint
    run = Path(__file__).resolve().parents[1] / "docs" / "results" / "emodb-cpu-pretrain-speeds5"
    stored = json.loads((run / "results.json").read_text())["config"]
    assert "silence_floor" not in stored  # made before the field existed
    cfg = TrainConfig(**stored)
    recorded = {json.loads(p.read_text())["config_fingerprint"] for p in (run / "folds").glob("*.json")}
    assert recorded == {config_fingerprint(cfg)}
    import dataclasses
    for lever in ({"silence_floor": 2.0}, {"onset_below_peak_db": 40.0}, {"log_floor": 1e-14}):
        assert config_fingerprint(dataclasses.replace(cfg, **lever)) not in recorded, lever


def test_onset_below_the_peak_does_not_move_with_the_level(ravdess_dir, emodb_dir):
    """The absolute onset threshold (-45 dBFS) starts a quiet recording's window later, or not at all;
    the one relative to the loudest frame starts it at the same sample at any gain."""
    absolute = Frontend(FrontendConfig(start_at_speech=True))
    relative = Frontend(FrontendConfig(start_at_speech=True, onset_below_peak_db=40.0))
    for path in (sorted((ravdess_dir / "Actor_03").glob("*.flac"))[0], emodb_dir / "wav" / "03a01Wa.wav"):
        wave = load_audio(path)
        peak = float(wave.abs().max())
        starts = {db: relative.speech_onset(wave * 10 ** (db / 20)) for db in (-30, -20, -10, 0)}
        starts[6] = relative.speech_onset(wave * min(2.0, 0.99 / peak))  # louder, unclipped
        assert len(set(starts.values())) == 1 and starts[0] > 0, starts
        moved = {db: absolute.speech_onset(wave * 10 ** (db / 20)) for db in (-30, -20, 0)}
        assert len(set(moved.values())) > 1, moved  # what it replaces does move
    assert relative.speech_onset(torch.zeros(48000)) == 0  # digital silence: nothing to skip
    with pytest.raises(ValueError, match="needs start_at_speech"):
        FrontendConfig(onset_below_peak_db=40.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        FrontendConfig(start_at_speech=True, onset_below_peak_db=-1.0)
    assert relative.config.log_mel_key() != absolute.config.log_mel_key()  # other windows, other cache
    old = relative.config.to_dict()
    del old["onset_below_peak_db"]  # a checkpoint made before the field existed
    assert FrontendConfig.from_dict(old).onset_below_peak_db == 0.0
