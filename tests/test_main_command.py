"""The README's main command on this checkout (a fresh clone in CI): bundled model, bundled sample, websocket."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_ser.assets import default_checkpoint, sample_path
from stream_ser.model import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_model_and_sample_are_there_and_describe_themselves():
    ckpt = default_checkpoint()
    assert ckpt is not None, "stream_ser/assets/default.pt is missing"
    assert ckpt.stat().st_size <= 80e6
    model = load_checkpoint(ckpt)
    # trained on both corpora: the union of their labels (docs/default-model.md)
    assert model.labels == ("anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral", "calm",
                            "surprise")
    assert "German acted speech" in model.describe() and "English" in model.describe()
    assert model.meta["corpus"] == "emodb+ravdess" and len(model.meta["speakers"]) == 34
    assert model.meta["train_config"]["weights"] != "imagenet"
    assert "CC BY-NC-SA 4.0" in model.describe()  # RAVDESS's terms shown
    assert model.frontend_config.normalization == "speaker"
    assert sample_path() is not None


def _readme_main_command() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    cmds = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert len(cmds) == 2 and cmds[1] == "bash scripts/test.sh"
    return cmds[0]


def test_readme_main_command_recognizes_the_bundled_sample():
    cmd = _readme_main_command()
    assert cmd == "bash scripts/live.sh"
    env = {k: v for k, v in os.environ.items() if k != "ALSA_CONFIG_PATH"}
    devices = subprocess.run([str(ROOT / ".venv" / "bin" / "stream-ser"), "devices"], capture_output=True, text=True,
                             env=env, timeout=60)
    has_mic = devices.returncode == 0 and "no input devices" not in devices.stdout
    proc = subprocess.Popen(cmd.split() + ["--no-dashboard", "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines, t0 = [], time.monotonic()
    try:
        while time.monotonic() - t0 < 600:  # the first run may install packages
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if sum(ln.startswith("#") for ln in lines) >= 4:
                break
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    lines += out.splitlines(keepends=True)
    text = "".join(lines)
    assert proc.returncode == 0, err[-2000:]
    assert re.search(r"websocket ws://127\.0\.0\.1:\d+", text)
    assert "German acted speech" in text
    preds = [ln for ln in lines if ln.startswith("#")]
    assert len(preds) >= 4
    assert any(lab in preds[0] for lab in ("anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral"))
    if not has_mic:  # CI machines have no sound card: the bundled sample stands in
        assert "replaying the bundled speech sample" in err and "sample.wav" in text
    assert text.strip().splitlines()[-1].startswith("stopped:")


def test_bench_smoke(tmp_path, emodb_dir):
    import sys
    r = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--image-sizes", "64", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "STREAM_SER_EMODB": str(emodb_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    res = json.loads(next(tmp_path.glob("*-smoke.json")).read_text())
    b = res["models"]["64"]
    assert b["hop_latency"]["hops"] > 0 and b["cache"]["ratio"] > 1
    # the capacity ladder ran and judged every step (whether 1 stream keeps real time depends on the load
    # on the machine: a figure for bench/, not for a test)
    ladder = b["capacity"]["ladder"]
    assert [x["streams"] for x in ladder][:1] == [1] and all(x["predictions"] > 0 for x in ladder)
    assert b["capacity"]["max_realtime_streams"] in {0} | {x["streams"] for x in ladder if x["realtime"]}
    assert res["frontend"]["ratio"] > 0 and res["training"][0]["segments_per_s"] > 0
    # the corpus path's figure is the fastest of the files-per-call sizes it tried, and says which
    sweep = res["frontend"]["batched_audio_s_per_s_by_files_per_call"]
    assert sweep[str(res["frontend"]["files_per_batch"])] == res["frontend"]["batched_audio_s_per_s"] == max(sweep.values())
    # a trained model, loaded as `stream-ser live` loads it, joins the machine's results beside the others
    r = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--checkpoint", "bundled", "--precision", "fp32",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "STREAM_SER_EMODB": str(emodb_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    merged = json.loads(next(tmp_path.glob("*-smoke.json")).read_text())
    assert merged["models"]["64"] == b and set(merged["models"]) == {"64", "64, trained: default.pt"}
    trained = merged["models"]["64, trained: default.pt"]
    assert trained["checkpoint"]["normalization"] == "speaker" and trained["hop_latency"]["hops"] > 0
    from bench.run import write_markdown
    write_markdown(tmp_path, tmp_path / "bench.md")
    text = (tmp_path / "bench.md").read_text()
    assert "### The trained model `default.pt` (64 px, speaker normalisation)" in text and "### CNN input 64 px" in text
    assert text.count("## Notes on the CPU figures") == 1 and "(files per call: " in text
    r = subprocess.run([sys.executable, "-m", "bench.run", "--checkpoint", "no/such.pt"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_bench_bounds_measures_the_cache_and_front_end_bounds(tmp_path, emodb_dir):
    import json
    import sys
    r = subprocess.run([sys.executable, "-m", "bench.bounds", "--image-sizes", "64", "--repeats", "2", "--files", "4",
                        "--frontend-repeats", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "STREAM_SER_EMODB": str(emodb_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    (cnn,) = res["cnn"]
    parts = ("conv_ms", "fc6_fc7_ms", "head_projection_ms")
    assert all(cnn[b][k] > 0 for b in ("batch1", "batch8") for k in parts)
    assert cnn["cache_ratio_bound"] == pytest.approx(sum(cnn["batch8"][k] for k in parts)
                                                     / sum(cnn["batch1"][k] for k in parts))
    fe = res["frontend"]
    assert fe["files"] == 4 and fe["frames"] > 0
    assert fe["fft_only"] > fe["log_mel_from_padded_frames"] > 0  # a stage timed with its part costs more
    assert fe["ceiling_ratio_fft_only"] == pytest.approx(fe["fft_only"] / fe["librosa"])


def test_bench_conv_int8_error_measures_the_deployed_stack_and_its_alternatives(tmp_path, emodb_dir):
    """bench.conv_int8_error: the stack as deployed against its alternatives, and each quantised convolution
    fed float32 activations, on images from speakers the ranges were not measured on."""
    import json
    import sys
    r = subprocess.run([sys.executable, "-m", "bench.conv_int8_error", "--files-per-speaker", "1", "--emodb",
                        str(emodb_dir), "--repeats", "2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(tmp_path.glob("conv-int8-error-*.json")).read_text())
    from stream_ser.model import two_level_convolutions_available
    two = two_level_convolutions_available()
    assert res["calibration_images"] > 0 and res["test_images"] > 0 and res["image_size"] == 64
    stack = res["stack_rel_l2"]
    assert len(stack) == 13 + two and all(0 < v < 1 for v in stack.values())
    assert stack["deployed (7-bit ranges, histogram)"] < 0.1  # what `stream-ser live` runs stays close to fp32
    if two:  # two int8 levels per activation: most of the activations' error gone
        int8x2 = next(v for k, v in stack.items() if k.startswith("two int8 levels"))
        assert int8x2 < stack["deployed (7-bit ranges, histogram)"] / 2
    speeds = res["conv_stack_ms"]
    assert [(x["threads"], x["segments"]) for x in speeds] == [(t, n) for t in (1, 2) for n in (1, 8, 64)]
    assert all(x[k] > 0 for x in speeds for k in ("float32 (channels-last)", "int8") + (("int8x2",) if two else ()))
    # the weights' share of the error is the smaller one (activations in float32)
    assert stack["weights only in int8 (activations float32)"] < stack["deployed (7-bit ranges, histogram)"]
    # the channel equalisation is a rescaling only: in float32 the equalised stack computes the original's
    assert all(v < 1e-4 for v in res["equalised_float32_rel_l2"].values())
    assert [x["layer"] for x in res["layers"]] == [f"features.{i}" for i in (0, 3, 6, 8, 10)]  # AlexNet's convs
    for x in res["layers"]:
        assert 0 < x["input_quantisation_rel_l2"] < 1 and 0 < x["output_rel_l2"] < 1
        assert 0 <= x["beyond_255_steps"] <= x["beyond_calibrated_range"] < 0.01  # 255 steps hold more
        assert x["kernel_max_steps_from_exact"] >= 0


def test_bench_under_load_cells_run_with_their_policy(emodb_dir, monkeypatch):
    """Each cell of bench.under_load is a fresh process with the OpenMP policy it claims (the policy only
    counts when torch loads), streaming the bundled model as `stream-ser live` does (int8 on the CPU)."""
    from bench.under_load import run_cell
    monkeypatch.setenv("STREAM_SER_EMODB", str(emodb_dir))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the parent's own policy must not leak into a cell
    ckpt = str(ROOT / "stream_ser" / "assets" / "default.pt")
    cells = {p: run_cell(p, "none", ckpt, 1) for p in ("default", "PASSIVE")}
    assert cells["default"]["omp_wait_policy"] == "default" and cells["PASSIVE"]["omp_wait_policy"] == "PASSIVE"
    for c in cells.values():
        assert c["precision"] == "int8" and c["hops"] > 0 and 0 < c["total"]["p50"] <= c["total"]["p99"]


def test_bench_profile_engine_profiles_the_bundled_model(emodb_dir):
    import sys
    if default_checkpoint() is None:
        pytest.skip("no bundled model in this install")
    r = subprocess.run([sys.executable, "-m", "bench.profile_engine", "--checkpoint", "bundled", "--streams", "3",
                        "--hops", "2", "--top", "5"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "STREAM_SER_EMODB": str(emodb_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    # the checkpoint's own image size and normalisation, not the options' defaults (227 px, per segment)
    # one shard: the profiler sees only the thread it runs in, so a profile steps every stream there
    assert re.search(r"cpu 3 streams, 64 px, speaker normalisation, 1 shard: [\d.]+ ms per hop",
                     r.stdout), r.stdout[:500]
    # the hop by phase: each batched stage ran (time > 0), and the work done stream by stream is counted
    from bench.profile_engine import PHASES
    found = {m[1]: float(m[2]) for m in re.finditer(r"^  (.+?)\s+(-?[\d.]+) ms a hop", r.stdout, re.M)}
    assert all(found.get(label, 0) > 0 for label, _, _ in PHASES), r.stdout[:1500]
    assert found["own time of functions called once per stream or more"] > 0


@pytest.mark.parametrize("variant", ["full windows", "default malloc", "partial windows"])
def test_bench_profile_engine_times_hops_without_the_profiler(emodb_dir, variant):
    import sys
    if default_checkpoint() is None:
        pytest.skip("no bundled model in this install")
    flags = {"full windows": [], "default malloc": ["--default-malloc"], "partial windows": ["--partial-windows"]}
    r = subprocess.run([sys.executable, "-m", "bench.profile_engine", "--checkpoint", "bundled", "--streams", "3",
                        "--hops", "9", "--timing"] + flags[variant],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "STREAM_SER_EMODB": str(emodb_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    partial = ", partial windows" if variant == "partial windows" else ""
    malloc = "default" if variant == "default malloc" else "kept"
    hops = 6 if partial else 9  # a window has 6 partial hops after the first
    m = re.search(rf"cpu 3 streams, 64 px, speaker normalisation{partial}, \d shards?, {malloc} freed memory: "
                  rf"median ([\d.]+) "
                  rf"ms, fastest ([\d.]+) ms a hop over {hops} hops", r.stdout)
    assert m and 0 < float(m[2]) <= float(m[1]), r.stdout[:500]
    assert "ncalls" not in r.stdout  # no profile printed


def test_bench_profile_engine_counts_a_hops_tensor_operations(emodb_dir):
    """--ops: one hop's tensor operations at N streams and at N/4, their growth per stream, by operator."""
    if default_checkpoint() is None:
        pytest.skip("no bundled model in this install")
    r = subprocess.run([sys.executable, "-m", "bench.profile_engine", "--checkpoint", "bundled", "--streams", "8",
                        "--ops"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "STREAM_SER_EMODB": str(emodb_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {int(m[1]): (int(m[2]), int(m[3])) for m in
            re.finditer(r"^ +(\d+) streams \((\d+) predictions\): (\d+) operations", r.stdout, re.M)}
    assert set(rows) == {2, 8} and rows[2][0] == 2 and rows[8][0] == 8, r.stdout[:800]
    assert rows[2][1] == rows[8][1] > 100 and "per added stream: +0.00 operations" in r.stdout, r.stdout[:800]
    ops = dict((k, int(v)) for k, v in re.findall(r"(\w+) (\d+)", r.stdout.split("by operator at 8 streams:")[1]))
    assert ops.get("lstm_cell", 0) > 0 and ops.get("linear_dynamic", 0) > 0  # recurrent cells (head, detector); int8 FC6/FC7
    assert sum(ops.values()) == rows[8][1]


def test_server_capacity_bench_runs_a_real_server_with_real_producers(tmp_path, emodb_dir):
    """bench.server_capacity, one tiny rung: `stream-ser live --source none --producers` in its own process, two
    websocket producers sending real EMO-DB speech at real-time pace, one subscriber to every stream: every
    prediction due arrives, with its latency and each side's CPU written down."""
    import json
    out = tmp_path / "capacity.json"
    r = subprocess.run([sys.executable, "-m", "bench.server_capacity", "--ladder", "2", "--seconds", "4",
                        "--emodb", str(emodb_dir), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    rung = d["ladder"][0]
    assert rung["producers"] == 2 and rung["predictions_due"] == 2 * 11  # 4 s: 11 segments a stream
    assert rung["predictions_received"] == rung["predictions_due"] and rung["complete"]
    assert 0 < rung["latency_ms"]["p50"] <= rung["latency_ms"]["p99"] < 5000
    assert rung["server_other_cpu_share"] > 0 and "server_capacity" in d["command"]


def test_bench_quantized_engines_times_the_int8_path_on_each_engine(tmp_path):
    """bench.quantized_engines: each supported engine measured in its own interpreter (the engine is fixed
    when the model is quantised), all of them the int8 path, its error against float32 a few per cent."""
    import json

    import torch

    from stream_ser.model import CONV_INT8_ENGINES
    r = subprocess.run([sys.executable, "-m", "bench.quantized_engines", "--repeats", "1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(tmp_path.glob("quantized-engines-*.json")).read_text())
    assert res["default_engine"] == torch.backends.quantized.engine and set(res["engines"]) == set(CONV_INT8_ENGINES)
    measured = {k: e for k, e in res["engines"].items() if "ms" in e}
    assert torch.backends.quantized.engine in measured
    assert set(measured) == set(CONV_INT8_ENGINES) & set(torch.backends.quantized.supported_engines)
    for e in measured.values():
        assert "int8 convolutions" in e["inference"] and 0 < e["rel_l2_vs_fp32"] < 0.1
        assert set(e["ms"]) == {"1", "8", "64", "384"} and all(ms > 0 for ms in e["ms"].values())


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's Inductor needs a C++ compiler on the CPU; none on this machine")
def test_bench_torch_compile_compares_each_part_with_eager(tmp_path):
    """bench.torch_compile: each batched part of a hop compiled, and the compiled part computes what eager
    does (the int8 embedder, which Dynamo cannot trace, runs eagerly inside the compiled function)."""
    import json
    r = subprocess.run([sys.executable, "-m", "bench.torch_compile", "--repeats", "1", "--batches", "1", "4",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(res["parts"]) == {"head over the windows", "segments: deltas and normalisation",
                                 "embedding and projection, fp32", "embedding and projection, int8"}
    for name, part in res["parts"].items():
        assert "failed" not in part, (name, part)
        assert part["rel_l2_vs_eager"] < 1e-4 and set(part["ms"]) == {"1", "4"}
        assert all(t["eager"] > 0 and t["compiled"] > 0 for t in part["ms"].values())
