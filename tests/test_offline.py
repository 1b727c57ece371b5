"""Metrics, folds, augmentation isolation, checkpoints, and a small real end-to-end LOSO run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torchvision

from offline import cli as offline_cli
from offline.corpora import load_emodb, load_iemocap
from offline.evaluate import make_folds
from offline.metrics import confusion_matrix, recall_per_class, summarize, uar, wa
from offline.train import FeatureBank, TrainConfig, config_from_args, train_model
from stream_ser.config import FrontendConfig, ModelConfig
from stream_ser.model import (ALEXNET_FILE, CheckpointError, EmotionModel, WeightsError, load_checkpoint,
                              save_checkpoint, two_level_convolutions_available)

from test_audio_corpora import _iemocap_tree


# --- metrics -----------------------------------------------------------------------
def test_uar_and_wa_on_a_hand_computed_unbalanced_example():
    # 8 of class 0 (6 right), 2 of class 1 (1 right): WA = 7/10, UAR = (6/8 + 1/2) / 2 = 0.625
    y_true = [0] * 8 + [1] * 2
    y_pred = [0] * 6 + [1] * 2 + [1, 0]
    cm = confusion_matrix(y_true, y_pred, 2)
    assert cm.tolist() == [[6, 2], [1, 1]]
    assert wa(cm) == pytest.approx(0.7)
    assert uar(cm) == pytest.approx(0.625)
    assert uar(cm) != wa(cm)


def test_absent_class_is_left_out_of_uar():
    cm = confusion_matrix([0, 0, 2], [0, 1, 2], 3)
    r = recall_per_class(cm)
    assert r[0] == 0.5 and np.isnan(r[1]) and r[2] == 1.0
    assert uar(cm) == pytest.approx(0.75)


def test_summary_averages_runs_within_a_fold_then_folds():
    runs = [{"fold": "a", "uar": 0.5, "confusion": [[1, 1], [0, 0]]},
            {"fold": "a", "uar": 0.7, "confusion": [[1, 0], [0, 0]]},
            {"fold": "b", "uar": 0.9, "confusion": [[0, 0], [1, 2]]}]
    s = summarize(runs, ["x", "y"])
    assert s["fold_uar"] == {"a": pytest.approx(0.6), "b": pytest.approx(0.9)}
    assert s["uar_mean"] == pytest.approx(0.75)
    assert s["uar_std"] == pytest.approx(np.std([0.6, 0.9], ddof=1))
    assert s["confusion"] == [[2, 1], [1, 2]] and s["pooled_wa"] == pytest.approx(4 / 6)


def test_a_multi_corpus_run_is_summarised_per_corpus_of_its_test_speakers(tmp_path):
    """The one-model-per-fold figures split by the held-out speakers' corpus; a single-corpus run has no split."""
    from offline.report import _by_corpus_lines, plot_confusion
    labels = ["x", "y", "z"]  # z: only the second corpus carries it
    runs = [{"fold": "de:03", "uar": 0.5, "confusion": [[1, 1, 0], [0, 1, 0], [0, 0, 0]]},
            {"fold": "de:08", "uar": 1.0, "confusion": [[2, 0, 0], [0, 2, 0], [0, 0, 0]]},
            {"fold": "en:actors01-04", "uar": 0.25, "confusion": [[1, 0, 1], [2, 0, 0], [0, 3, 1]]}]
    by = summarize(runs, labels)["by_corpus"]
    assert list(by) == ["de", "en"]
    assert by["de"]["uar_mean"] == pytest.approx(0.75) and by["de"]["n_folds"] == 2
    assert by["de"]["confusion"] == [[3, 1, 0], [0, 3, 0], [0, 0, 0]]
    assert by["de"]["recall"] == {"x": 0.75, "y": 1.0, "z": None} and by["de"]["labels_present"] == ["x", "y"]
    assert by["en"]["uar_std"] == 0.0 and by["en"]["pooled_uar"] == pytest.approx((0.5 + 0 + 0.25) / 3)
    assert summarize([dict(r, fold=r["fold"].split(":")[1]) for r in runs], labels)["by_corpus"] is None
    md = "\n".join(_by_corpus_lines(by, labels))
    assert "| de | 2 | **75.00 ± 35.36** |" in md and "| de | 75.00 | 100.00 | – |" in md
    assert "confusion-en.png" in md and _by_corpus_lines(None, labels) == []
    plot_confusion(np.asarray(by["de"]["confusion"])[:2], labels, tmp_path / "de.png", "t", rows=["x", "y"])
    assert (tmp_path / "de.png").stat().st_size > 1000
    # a results.json written before the per-corpus figures existed gets them from its records
    from offline.report import resummarize
    (tmp_path / "results.json").write_text(json.dumps({"labels": labels, "fold_runs": runs, "summary": {"old": 1},
                                                       "command": "c"}))
    assert resummarize(tmp_path)["by_corpus"] == by
    back = json.loads((tmp_path / "results.json").read_text())
    assert back["summary"]["by_corpus"] == by and back["fold_runs"] == runs and back["command"] == "c"


def test_ensemble_averages_the_runs_probabilities_per_utterance():
    """Two runs that each get one of two utterances wrong, confidently on the other: their mean is right on both."""
    def run(probs, pred):
        return {"fold": "a", "uar": 0.5, "confusion": [[1, 0], [1, 0]],
                "predictions": {"uids": ["u1", "u2"], "true": [0, 1], "pred": pred, "probs": probs}}
    runs = [run([[0.9, 0.1], [0.6, 0.4]], [0, 0]), run([[0.4, 0.6], [0.1, 0.9]], [1, 1])]
    s = summarize(runs, ["x", "y"])
    assert s["fold_uar"] == {"a": 0.5} and s["ensemble_fold_uar"] == {"a": 1.0}
    assert s["ensemble_uar_mean"] == 1.0
    # one run per fold, or records without probabilities: no ensemble figure
    assert summarize(runs[:1], ["x", "y"])["ensemble_uar_mean"] is None
    for r in runs:
        del r["predictions"]["probs"]
    assert summarize(runs, ["x", "y"])["ensemble_fold_uar"] is None


# --- folds -------------------------------------------------------------------------
def test_emodb_loso_folds_are_disjoint(emodb_dir):
    corpus = load_emodb(emodb_dir)
    folds = make_folds(corpus)
    assert len(folds) == 10
    assert sorted(f.test[0] for f in folds) == corpus.speakers
    for f in folds:
        assert len(f.test) == 1 and len(f.val) == 1 and len(f.train) == 8
        assert not (set(f.test) & set(f.val)) and not (set(f.train) & (set(f.test) | set(f.val)))
        assert set(f.train) | set(f.test) | set(f.val) == set(corpus.speakers)


def test_session_folds_keep_sessions_apart(tmp_path):
    _iemocap_tree(tmp_path)
    corpus = load_iemocap(tmp_path)
    folds = make_folds(corpus)
    assert [f.name for f in folds] == ["Ses01", "Ses02"]
    for f in folds:
        sess = f.name
        assert all(s.startswith(sess) for s in f.test)
        assert not any(s.startswith(sess) for s in f.val + f.train)


def test_presets_and_overrides():
    cfg = config_from_args("quick", {"stage1_epochs": 7, "weights": None})
    assert cfg.stage1_epochs == 7 and cfg.weights == "none" and cfg.preset == "quick"
    paper = config_from_args("paper", {})
    assert (paper.stage1_batch, paper.stage1_epochs, paper.stage1_lr) == (128, 20, 1e-4)
    assert (paper.stage2_batch, paper.stage2_epochs, paper.stage2_lr) == (16, 30, 5e-6)
    assert paper.speeds == (0.8, 0.9, 1.0, 1.1, 1.2) and paper.image_size == 227
    with pytest.raises(ValueError, match="1.0"):
        TrainConfig(speeds=(0.9, 1.1))


# --- training on a small real subset -----------------------------------------------
TINY = dict(stage1_epochs=1, stage2_epochs=2, stage1_batch=16, image_size=64, runs=1, weights="none")


@pytest.fixture(scope="module")
def small_corpus(emodb_dir):
    corpus = load_emodb(emodb_dir)
    keep = {"03", "08", "09"}
    seen = {}

    def pick(u):
        if u.speaker not in keep:
            return False
        seen[u.speaker] = seen.get(u.speaker, 0) + 1
        return seen[u.speaker] <= 5
    return corpus.subset(pick)


def test_augmentation_never_touches_validation_or_test(small_corpus, tmp_path):
    cfg = TrainConfig(preset="quick", speeds=(0.9, 1.0, 1.1), **TINY)
    bank = FeatureBank(small_corpus, cfg.frontend_config(), tmp_path, torch.device("cpu"), log=lambda m: None)
    by = {s: [u for u in small_corpus.utterances if u.speaker == s] for s in ("03", "08", "09")}
    train_model(bank, by["03"], by["08"], cfg, torch.device("cpu"), seed=0, log=lambda m: None)
    train_ids = {u.uid for u in by["03"]}
    for speed in (0.9, 1.1):
        assert set(bank._mem[speed]) == train_ids  # perturbed audio only for training speakers
    assert {u.uid for u in by["08"]} <= set(bank._mem[1.0])
    assert not ({u.uid for u in by["09"]} & set().union(*map(set, bank._mem.values())))


def test_training_is_reproducible_and_checkpoint_round_trips(small_corpus, tmp_path):
    cfg = TrainConfig(preset="quick", speeds=(1.0,), **TINY)
    dev = torch.device("cpu")
    utts = small_corpus.utterances
    tr = [u for u in utts if u.speaker != "09"]
    va = [u for u in utts if u.speaker == "09"]
    bank = FeatureBank(small_corpus, cfg.frontend_config(), tmp_path, dev, log=lambda m: None)
    m1, _ = train_model(bank, tr, va, cfg, dev, seed=5, log=lambda m: None)
    m2, _ = train_model(bank, tr, va, cfg, dev, seed=5, log=lambda m: None)
    from stream_ser.audio import load_audio
    waves = [load_audio(u.path) for u in va[:3]]
    p1, p2 = m1.predict(waves), m2.predict(waves)
    torch.testing.assert_close(p1, p2)
    path = save_checkpoint(m1, tmp_path / "m.pt")
    back = load_checkpoint(path)
    assert back.frontend_config == m1.frontend_config and back.labels == m1.labels
    torch.testing.assert_close(back.predict(waves), p1)
    small = save_checkpoint(m1, tmp_path / "m8.pt", compact=True)
    assert small.stat().st_size < path.stat().st_size / 3
    assert (load_checkpoint(small).predict(waves) - p1).abs().max() < 0.02


def test_loso_end_to_end_writes_results_report_and_plot(emodb_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["loso", "--corpus", "emodb", "--data", str(emodb_dir), "--preset", "quick", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--max-per-speaker", "4", "--folds", "03,08,16",
            "--stage1-epochs", "1", "--stage2-epochs", "2", "--image-size", "64"]
    assert offline_cli.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["preset"] == "quick" and res["config"]["stage1_epochs"] == 1 and res["config"]["image_size"] == 64
    assert [r["fold"] for r in res["fold_runs"]] == ["03", "08", "16"]
    for r in res["fold_runs"]:
        assert 0 <= r["uar"] <= 1 and len(r["predictions"]["pred"]) == 4 and r["test"] == [r["fold"]]
        assert r["val"][0] not in r["train"] and r["fold"] not in r["train"]
        assert 0 <= r["int8_uar"] <= 1 and 0 <= r["int8_conv_uar"] <= 1  # the CPU's int8 paths, on the test speaker
        # which int8 path each column ran, in the record (the fast path has grown since the first runs)
        assert "int8 LSTM input projection" in r["int8_inference"] and "int8 convolutions" not in r["int8_inference"]
        assert "int8 convolutions" in r["int8_conv_inference"]
        if two_level_convolutions_available():  # ... and with their activations as two int8 levels
            assert 0 <= r["int8_conv2_uar"] <= 1 and "two-level activations" in r["int8_conv2_inference"]
    s = res["summary"]
    assert s["int8_conv_uar_mean"] == pytest.approx(np.mean([r["int8_conv_uar"] for r in res["fold_runs"]]))
    if two_level_convolutions_available():
        assert s["int8_conv2_uar_mean"] == pytest.approx(np.mean([r["int8_conv2_uar"] for r in res["fold_runs"]]))
    assert s["int8_inference"] == res["fold_runs"][0]["int8_inference"]
    assert np.asarray(s["confusion"]).sum() == 12 and res["machine"]["torch"] == torch.__version__
    report = (out / "report.md").read_text()
    assert "UAR, mean ± std over folds" in report and "81.31" in report  # the paper's no-pretraining figure
    assert "int8 convolutions as well" in report
    assert ("two int8 levels" in report) == two_level_convolutions_available()
    assert f"(compact model, {s['int8_inference']})" in report
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "run.log").read_text().count("test UAR") == 3
    # resuming recomputes nothing
    assert offline_cli.main(args) == 0
    assert (out / "run.log").read_text().count("done before") == 3
    assert json.loads((out / "results.json").read_text())["summary"]["uar_mean"] == s["uar_mean"]
    # report rewrite and comparison
    assert offline_cli.main(["report", str(out), str(out), "--compare"]) == 0
    assert "UAR mean ± std" in capsys.readouterr().out
    # --summarize recomputes the summary from the records: the same figures for a run of this version
    assert offline_cli.main(["report", str(out), "--summarize"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["summary"] == json.loads(json.dumps(s)) and again["fold_runs"] == res["fold_runs"]
    # a larger --runs extends the finished run: the run-0 records are reused, run 1 is added, and the
    # runs of each fold are also scored as one ensemble
    assert offline_cli.main([*args, "--runs", "2"]) == 0
    assert (out / "run.log").read_text().count("done before") == 6
    res2 = json.loads((out / "results.json").read_text())
    assert [(r["fold"], r["run"]) for r in res2["fold_runs"]] == [(f, k) for f in ("03", "08", "16") for k in (0, 1)]
    assert [r for r in res2["fold_runs"] if r["run"] == 0] == res["fold_runs"]
    assert 0 <= res2["summary"]["ensemble_uar_mean"] <= 1
    assert "ensemble" in (out / "report.md").read_text()
    capsys.readouterr()
    assert offline_cli.main(["report", str(out), "--compare"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{100 * res2['summary']['ensemble_uar_mean']:.2f} ± " in row


def test_train_command_writes_a_deployable_checkpoint(emodb_dir, tmp_path):
    out = tmp_path / "model.pt"
    assert offline_cli.main(["train", "--corpus", "emodb", "--data", str(emodb_dir), "--out", str(out),
                             "--cache-dir", str(tmp_path / "cache"), "--max-per-speaker", "2", "--stage1-epochs", "1",
                             "--stage2-epochs", "1", "--image-size", "64", "--val-speaker", "03"]) == 0
    model = load_checkpoint(out)
    assert "emodb" in model.meta["trained_on"] and model.meta["val_speakers"] == ["03"]
    assert len(model.meta["speakers"]) == 9 and model.frontend_config.image_size == 64
    assert "18 utterances" in model.meta["trained_on"]  # --max-per-speaker 2, speaker 03 held out
    # its int8 convolutions' activation ranges, measured on its training speakers through the live path
    cal = model.meta["conv_int8"]
    assert cal["speakers"] == 9 and cal["files"] == 18 and cal["images"] > 18 and len(cal["points"]) == 6
    assert model.embedder.int8_convolutions and "int8 convolutions" in model.describe()
    assert not load_checkpoint(out, precision="fp32").embedder.int8_convolutions


def test_int8_calibrate_writes_the_ranges_into_a_copy_and_errors_are_clear(emodb_dir, tmp_path, capsys):
    """`ser-offline int8-calibrate` adds ``meta["conv_int8"]`` to a checkpoint made without it (older ones)
    and changes nothing else; the same model then runs its convolutions in int8 on a CPU."""
    from stream_ser.model import EmotionModel, read_checkpoint, save_checkpoint
    torch.manual_seed(0)
    model = EmotionModel(FrontendConfig(image_size=64, normalization="speaker"))
    model.meta = {"speakers": ["03", "08"], "trained_on": "test"}
    src = save_checkpoint(model.eval(), tmp_path / "old.pt")
    assert not load_checkpoint(src).embedder.int8_convolutions
    out = tmp_path / "new.pt"
    assert offline_cli.main(["int8-calibrate", "--checkpoint", str(src), "--corpus", "emodb", "--data",
                             str(emodb_dir), "--out", str(out)]) == 0
    assert "activation ranges" in capsys.readouterr().out
    before, after = read_checkpoint(src), read_checkpoint(out)
    assert after["meta"]["conv_int8"]["speakers"] == 2 and after["meta"]["conv_int8"]["files"] == 8  # its speakers only
    assert {k: v for k, v in after["meta"].items() if k != "conv_int8"} == before["meta"]
    for k, v in before["state_dict"].items():
        assert torch.equal(after["state_dict"][k], v)
    fast = load_checkpoint(out)
    assert fast.embedder.int8_convolutions and "int8 convolutions" in fast.describe()
    # errors: a missing checkpoint, a corpus without its speakers
    assert offline_cli.main(["int8-calibrate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(emodb_dir),
                             "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    model.meta = {"speakers": ["ravdess:01"]}
    other = save_checkpoint(model, tmp_path / "other.pt")
    assert offline_cli.main(["int8-calibrate", "--checkpoint", str(other), "--data", str(emodb_dir), "--out",
                             str(out)]) == 2
    assert "training speakers" in capsys.readouterr().err


def test_bad_corpus_and_unknown_speaker_are_clear_errors(tmp_path, emodb_dir, capsys):
    assert offline_cli.main(["loso", "--corpus", "emodb", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "EMO-DB" in capsys.readouterr().err
    assert offline_cli.main(["train", "--corpus", "emodb", "--data", str(emodb_dir), "--out", str(tmp_path / "m.pt"),
                             "--val-speaker", "99"]) == 2
    assert "99" in capsys.readouterr().err


# --- checkpoints and weights -------------------------------------------------------
def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a stream_ser checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alex.pt")
    with pytest.raises(CheckpointError, match="not a stream_ser checkpoint"):
        load_checkpoint(tmp_path / "alex.pt")
    m = EmotionModel(model_config=ModelConfig(labels=("a", "b")))
    p = save_checkpoint(m, tmp_path / "ok.pt")
    blob = torch.load(p, weights_only=True)
    del blob["state_dict"]["head.mu.weight"]
    torch.save(blob, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "damaged.pt")
    # truncated file
    (tmp_path / "cut.pt").write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.pt")


def test_checkpoint_keeps_configs_labels_and_corpus_statistics(tmp_path):
    fc = FrontendConfig(normalization="corpus", channels=2, segment_frames=32, segment_shift=16, image_size=96)
    m = EmotionModel(fc, ModelConfig(labels=("x", "y", "z"), attention=False))
    m.frontend.norm_mean.fill_(1.5)
    m.meta = {"trained_on": "test"}
    back = load_checkpoint(save_checkpoint(m, tmp_path / "c.pt"), precision="fp32")
    assert back.frontend_config == fc and back.model_config == m.model_config
    assert back.frontend.norm_mean.eq(1.5).all() and back.meta == {"trained_on": "test"}
    w = torch.randn(24000) * 0.1
    torch.testing.assert_close(back.predict(w), m.eval().predict(w))


def test_imagenet_weights_from_the_hub_cache_or_a_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))
    try:
        with pytest.raises(WeightsError, match=ALEXNET_FILE):
            EmotionModel(weights="imagenet")
        ref = torchvision.models.alexnet()
        ckpt = tmp_path / "torch" / "hub" / "checkpoints" / ALEXNET_FILE
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ref.state_dict(), ckpt)
        m = EmotionModel(weights="imagenet")
        torch.testing.assert_close(m.embedder.features[0].weight, ref.features[0].weight)
        m2 = EmotionModel(weights=str(ckpt))
        torch.testing.assert_close(m2.embedder.fc[4].weight, ref.classifier[4].weight)
        with pytest.raises(WeightsError, match="not found"):
            EmotionModel(weights=str(tmp_path / "missing.pth"))
    finally:
        torch.hub.set_dir(os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub"))


def test_baseline_and_ablation_models_predict():
    w = torch.randn(2, 30000) * 0.1
    for mc, fc in [(ModelConfig(arch="cnn_lstm"), FrontendConfig()),
                   (ModelConfig(attention=False), FrontendConfig(channels=1, image_size=64)),
                   (ModelConfig(), FrontendConfig(segment_frames=16, segment_shift=8, image_size=64))]:
        p = EmotionModel(fc, mc).predict(w)
        assert p.shape == (2, 7) and torch.allclose(p.sum(-1), torch.ones(2))


def test_a_killed_loso_run_resumes_to_the_same_results_and_distrusts_damaged_files(emodb_dir, tmp_path):
    """kill -9 in the middle of the second fold, resume: the same results as a run never interrupted.
    A truncated fold-run file is set aside and recomputed; a file from another recipe is refused."""
    import signal
    import subprocess
    import sys
    import time

    cache = str(tmp_path / "cache")
    common = ["--corpus", "emodb", "--data", str(emodb_dir), "--preset", "quick", "--cache-dir", cache,
              "--max-per-speaker", "4", "--folds", "03,08,16", "--stage1-epochs", "1", "--stage2-epochs", "2",
              "--image-size", "64"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert offline_cli.main(["loso", *common, "--out", str(ref)]) == 0  # also fills the feature cache
    proc = subprocess.Popen([sys.executable, "-m", "offline.cli", "loso", *common, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "folds" / "03_run0.json"
    deadline = time.time() + 300
    while not first.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert first.is_file(), "the first fold-run never finished"
    time.sleep(0.5)  # into the second fold
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()  # nothing pretends to be a finished result
    assert offline_cli.main(["loso", *common, "--out", str(out)]) == 0
    log = (out / "run.log").read_text()
    assert "fold 03 run 0: done before" in log
    want = json.loads((ref / "results.json").read_text())
    got = json.loads((out / "results.json").read_text())
    for a, b in zip(want["fold_runs"], got["fold_runs"], strict=True):
        assert (a["fold"], a["seed"], a["uar"], a["predictions"]) == (b["fold"], b["seed"], b["uar"], b["predictions"])
    assert got["summary"]["uar_mean"] == want["summary"]["uar_mean"]

    # a truncated file (a crash while writing on a filesystem without atomic rename) is not trusted
    path = out / "folds" / "08_run0.json"
    path.write_text(path.read_text()[:200])
    assert offline_cli.main(["loso", *common, "--out", str(out)]) == 0
    assert (out / "folds" / "08_run0.damaged").is_file()
    assert "08_run0.json is damaged" in (out / "run.log").read_text()
    assert json.loads((out / "results.json").read_text())["summary"]["uar_mean"] == want["summary"]["uar_mean"]

    # resuming with another recipe is refused rather than mixed into one result
    assert offline_cli.main(["loso", *common[:-2], "--image-size", "72", "--out", str(out)]) == 2


def test_a_folds_subset_trains_the_full_plans_fold_runs_and_merge_rebuilds_the_result(emodb_dir, tmp_path, capsys):
    """`--folds 16` trains the very fold-run (seed, predictions) that a run over more folds trains for 16,
    so one process per fold side by side, then `ser-offline merge`, gives the result of one run."""
    import shutil

    common = ["--corpus", "emodb", "--data", str(emodb_dir), "--preset", "quick", "--cache-dir", str(tmp_path / "c"),
              "--max-per-speaker", "4", "--stage1-epochs", "1", "--stage2-epochs", "2", "--image-size", "64"]
    whole, first, last = tmp_path / "whole", tmp_path / "p0308", tmp_path / "p16"
    assert offline_cli.main(["loso", *common, "--folds", "03,08,16", "--out", str(whole)]) == 0
    assert offline_cli.main(["loso", *common, "--folds", "16", "--out", str(last)]) == 0
    assert offline_cli.main(["loso", *common, "--folds", "03,08", "--out", str(first)]) == 0
    ref = json.loads((whole / "results.json").read_text())
    assert [r["seed"] for r in ref["fold_runs"]] == [0, 1, 9]  # the fold's place among all 10 EMO-DB folds
    solo = json.loads((last / "results.json").read_text())["fold_runs"][0]
    assert (solo["seed"], solo["uar"], solo["predictions"]) == (9, ref["fold_runs"][2]["uar"],
                                                               ref["fold_runs"][2]["predictions"])

    merged_dir = tmp_path / "merged"
    assert offline_cli.main(["merge", str(last), str(first), "--out", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "results.json").read_text())
    key = lambda r: (r["fold"], r["run"], r["seed"], r["uar"], r["predictions"])  # noqa: E731
    assert [key(r) for r in merged["fold_runs"]] == [key(r) for r in ref["fold_runs"]]  # in fold order
    assert merged["summary"] == ref["summary"]
    assert [f["name"] for f in merged["folds"]] == ["03", "08", "16"]
    assert sorted(f for p in merged["parts"] for f in p["folds"]) == ["03", "08", "16"]
    assert sorted(p.name for p in (merged_dir / "folds").iterdir()) == ["03_run0.json", "08_run0.json", "16_run0.json"]
    report = (merged_dir / "report.md").read_text()
    assert "Merged from 2 runs" in report and "--folds 16" in report and (merged_dir / "confusion.png").is_file()
    # the same fold-run in two parts is kept once
    assert offline_cli.main(["merge", str(whole), str(last), "--out", str(tmp_path / "m2")]) == 0
    assert json.loads((tmp_path / "m2" / "results.json").read_text())["summary"] == ref["summary"]
    capsys.readouterr()

    # what must not be mixed is refused, with the reason
    other = tmp_path / "other"
    assert offline_cli.main(["loso", *common[:-2], "--image-size", "72", "--folds", "08", "--out", str(other)]) == 0
    capsys.readouterr()
    assert offline_cli.main(["merge", str(last), str(other), "--out", str(tmp_path / "m3")]) == 2
    assert "another front-end" in capsys.readouterr().err
    clash = tmp_path / "clash"
    shutil.copytree(last, clash)
    r = json.loads((clash / "results.json").read_text())
    r["fold_runs"][0]["predictions"]["pred"] = [(p + 1) % 7 for p in r["fold_runs"][0]["predictions"]["pred"]]
    (clash / "results.json").write_text(json.dumps(r))
    assert offline_cli.main(["merge", str(last), str(clash), "--out", str(tmp_path / "m4")]) == 2
    assert "with different results" in capsys.readouterr().err
    assert offline_cli.main(["merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "m5")]) == 2
    assert "results.json not found" in capsys.readouterr().err
    assert not (tmp_path / "m4").exists() and not (tmp_path / "m5").exists()

    # a record of the right fold-run but another seed (a `--folds` part made before seeds were tied to
    # the fold's place) is kept aside, not trusted, and that fold-run is trained with the plan's seed
    rec = json.loads((clash / "folds" / "16_run0.json").read_text())
    rec["seed"] = 0
    (clash / "folds" / "16_run0.json").write_text(json.dumps(rec))
    assert offline_cli.main(["loso", *common, "--folds", "16", "--out", str(clash)]) == 0
    assert (clash / "folds" / "16_run0.seed0").is_file()
    assert "trained with seed 0, but this plan trains it with seed 9" in (clash / "run.log").read_text()
    assert json.loads((clash / "folds" / "16_run0.json").read_text())["predictions"] == solo["predictions"]


def test_only_runs_trains_the_full_plans_run_and_parts_per_run_merge_to_the_whole(emodb_dir, tmp_path, capsys):
    """`--only-runs 1` trains run 1 with the seed the full plan gives it (seed + 1000), so one process per
    fold-run side by side, merged, equals one `--runs 2` run; indices outside --runs are refused."""
    common = ["--corpus", "emodb", "--data", str(emodb_dir), "--preset", "quick", "--cache-dir", str(tmp_path / "c"),
              "--max-per-speaker", "3", "--stage1-epochs", "1", "--stage2-epochs", "1", "--image-size", "64",
              "--folds", "08", "--runs", "2"]
    whole, r0, r1 = tmp_path / "whole", tmp_path / "r0", tmp_path / "r1"
    assert offline_cli.main(["loso", *common, "--out", str(whole)]) == 0
    assert offline_cli.main(["loso", *common, "--only-runs", "1", "--out", str(r1)]) == 0
    assert offline_cli.main(["loso", *common, "--only-runs", "0", "--out", str(r0)]) == 0
    ref = json.loads((whole / "results.json").read_text())["fold_runs"]
    part = json.loads((r1 / "results.json").read_text())["fold_runs"]
    assert [(r["run"], r["seed"]) for r in part] == [(1, 1001)]
    assert (part[0]["uar"], part[0]["predictions"]) == (ref[1]["uar"], ref[1]["predictions"])
    assert offline_cli.main(["merge", str(r1), str(r0), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [(r["run"], r["seed"], r["predictions"]) for r in merged["fold_runs"]] == \
        [(r["run"], r["seed"], r["predictions"]) for r in ref]
    capsys.readouterr()
    with pytest.raises(SystemExit, match="outside the recipe's runs"):
        offline_cli.main(["loso", *common, "--only-runs", "2", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit):
        offline_cli.main(["loso", *common, "--only-runs", "x", "--out", str(tmp_path / "bad")])
    assert "not a comma-separated list of run indices" in capsys.readouterr().err


def test_gpu_folds_script_runs_fold_runs_side_by_side_and_merges(emodb_dir, tmp_path):
    """scripts/gpu-folds.sh (what a lent GPU runs): `--runs 2` becomes one process per fold-run with the full
    plan's seeds, at most JOBS at a time; the records are packed as they finish and merged into one result."""
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, FOLDS="03 16", JOBS="2", PY=sys.executable, SER=f"{sys.executable} -m offline.cli",
               CACHE=str(tmp_path / "cache"), DATA=str(emodb_dir), PYTHONPATH=str(root))
    recipe = ("tiny=--preset quick --max-per-speaker 2 --stage1-epochs 1 --stage2-epochs 1 --image-size 64 "
              "--runs 2")
    out = tmp_path / "gpu"
    p = subprocess.run(["bash", str(root / "scripts" / "gpu-folds.sh"), str(out), "500", recipe], env=env,
                       cwd=root, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tiny: 4 of 4 fold processes finished" in p.stdout
    assert sorted(d.name for d in (out / "tiny" / "parts").iterdir()) == ["03-run0", "03-run1", "16-run0", "16-run1"]
    merged = json.loads((out / "tiny" / "results.json").read_text())
    assert sorted((r["fold"], r["run"], r["seed"]) for r in merged["fold_runs"]) == \
        [("03", 0, 0), ("03", 1, 1000), ("16", 0, 9), ("16", 1, 1009)]
    with tarfile.open(out / "records.tgz") as t:
        assert sum(n.endswith(".json") and "/folds/" in n for n in t.getnames()) == 4
    # no fold-run starts with less than MIN_LEFT seconds to the deadline, and that is said
    p = subprocess.run(["bash", str(root / "scripts" / "gpu-folds.sh"), str(tmp_path / "late"), "5", recipe],
                       env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert "4 fold-runs not started" in p.stdout


def test_merged_part_resumed_from_earlier_records_says_so():
    from offline.report import _part_time
    assert _part_time({"wall_seconds": 240.0, "compute_seconds": 230.0}) == " (4.0 min)"
    # a part whose fold-runs were all found finished took seconds now; its records' time is what it cost
    assert _part_time({"wall_seconds": 2.0, "compute_seconds": 390.0}) == \
        " (resumed: its fold-runs were made earlier, 6.5 min)"
    assert _part_time({"wall_seconds": None}) == ""
