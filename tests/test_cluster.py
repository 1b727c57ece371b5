"""Fold-runs as Ray tasks (``ser-offline loso --workers N``): the same records as in-process, failures
reported rather than missing, and resumable. A real local Ray with 2 CPUs; tiny workloads."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from offline import cli as offline_cli

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'stream_ser[cluster]')")

TINY = ["--preset", "quick", "--stage1-epochs", "1", "--stage2-epochs", "2", "--image-size", "64"]
# what must not depend on where a fold-run ran (timings and the worker's identity may)
SAME = ("fold", "run", "seed", "test", "val", "train", "uar", "wa", "confusion", "compact_uar", "int8_uar",
        "predictions", "config_fingerprint")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray of 2 CPUs for the module (``--workers`` joins it rather than starting another)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _one_thread_run(argv):
    """The in-process reference with the thread count a 1-CPU Ray task uses (float sums then agree)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return offline_cli.main(argv)
    finally:
        torch.set_num_threads(before)


def test_fold_runs_as_ray_tasks_give_the_records_of_the_in_process_run(emodb_dir, tmp_path, local_ray):
    common = ["loso", "--corpus", "emodb", "--data", str(emodb_dir), "--cache-dir", str(tmp_path / "cache"),
              "--max-per-speaker", "3", "--folds", "03,16", *TINY]
    assert _one_thread_run([*common, "--out", str(tmp_path / "local")]) == 0
    assert offline_cli.main([*common, "--out", str(tmp_path / "ray"), "--workers", "2", "--cpus-per-run", "1"]) == 0
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    dist = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert "executor" not in local and dist["executor"]["workers"] == 2
    # they really ran in Ray worker processes, one thread each
    ran = dist["executor"]["ran_on"]
    assert sorted(r["fold_run"] for r in ran) == ["03_run0", "16_run0"]
    assert all(r["pid"] != os.getpid() and r["threads"] == 1 for r in ran)
    assert [r["fold"] for r in dist["fold_runs"]] == ["03", "16"]  # protocol order, whatever finished first
    for a, b in zip(local["fold_runs"], dist["fold_runs"], strict=True):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
    assert local["summary"] == dist["summary"] and dist["failed"] == []
    assert "Ray tasks" in (tmp_path / "ray" / "report.md").read_text()


def _manifest_with_an_unreadable_speaker(emodb_dir, tmp_path):
    """Speakers 03, 08 and 09 with real EMO-DB audio; speaker zz whose files are all damaged."""
    rows = []
    for spk in ("03", "08", "09"):
        wavs = sorted((emodb_dir / "wav").glob(f"{spk}*.wav"))[:4]
        rows += [(str(w), "anger" if i % 2 else "neutral", spk) for i, w in enumerate(wavs)]
    for i in range(3):
        bad = tmp_path / f"zz_{i}.wav"
        bad.write_bytes(b"RIFF\x00\x00garbage" * 10)
        rows.append((str(bad), "anger" if i % 2 else "neutral", "zz"))
    path = tmp_path / "three.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "speaker"])
        w.writerows(rows)
    return path


@pytest.mark.parametrize("where", ["ray", "local"])
def test_a_failing_fold_run_is_reported_not_missing_and_is_retried_on_resume(emodb_dir, tmp_path, where, local_ray,
                                                                            capsys):
    manifest = _manifest_with_an_unreadable_speaker(emodb_dir, tmp_path)
    out = tmp_path / "run"
    # fold 09 validates on zz (no readable audio: trained without model selection), fold zz has nothing to test
    argv = ["loso", "--corpus", "csv", "--data", str(manifest), "--cache-dir", str(tmp_path / "cache"), *TINY,
            "--folds", "09,zz", "--out", str(out)] + (["--workers", "2"] if where == "ray" else [])
    assert offline_cli.main(argv) == 1  # not 0: a fold is missing from the figures
    err = capsys.readouterr().err
    assert "1 fold-run(s) failed" in err and "zz run 0" in err and "readable audio" in err
    res = json.loads((out / "results.json").read_text())
    assert [(f["fold"], f["run"]) for f in res["failed"]] == [("zz", 0)]
    assert "none of the test speakers" in res["failed"][0]["error"]
    assert [r["fold"] for r in res["fold_runs"]] == ["09"]  # the other fold still ran
    assert res["summary"]["n_folds"] == 1
    report = (out / "report.md").read_text()
    assert "1 fold-run(s) FAILED" in report and "fold zz run 0" in report
    assert not (out / "folds" / "zz_run0.json").exists()
    # a rerun recomputes only the failed fold-run (it fails again: the audio is still damaged)
    assert offline_cli.main(argv) == 1
    log = (out / "run.log").read_text()
    assert "fold 09 run 0: done before" in log and "validation speaker(s) zz have no readable audio" in log


def test_cluster_flags_are_checked_before_any_work(emodb_dir, tmp_path, capsys):
    base = ["loso", "--corpus", "emodb", "--data", str(emodb_dir), "--out", str(tmp_path / "x")]
    assert offline_cli.main([*base, "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert offline_cli.main([*base, "--gpus-per-run", "0.5"]) == 2
    assert "need --workers" in capsys.readouterr().err
    assert offline_cli.main([*base, "--workers", "1", "--gpus-per-run", "-1"]) == 2
    assert not (tmp_path / "x").exists()
