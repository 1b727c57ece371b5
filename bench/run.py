"""All benchmarks in one command: ``python -m bench.run`` (``--smoke`` for a tiny CI-sized run).

Writes ``bench/results/<machine>.json`` and rewrites ``docs/benchmarks.md`` from
every JSON file there. Figures are medians over ``--repeats`` runs; latencies
carry p50/p95/p99. Real EMO-DB audio from ``../shared/data/emodb``.

1. per-hop latency of one stream (front-end, CNN, head, total from the arrival of
   a segment's last sample), 20 ms chunks as a sound card delivers them;
2. end to end over the websocket (sample arrival -> message received on loopback);
3. the embedding cache's worth: per-hop compute with the cache against
   re-embedding all 8 segments of the window every hop;
4. capacity: the most concurrent streams the engine keeps real-time, each prediction made into the
   message the server sends (``to_dict`` and JSON, as the live path does; since 2026-11-27 09:12);
5. front-end throughput against librosa on the whole corpus;
6. stage-1 training throughput (segments per second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from stream_ser.openmp import intra_op_threads, prefer_passive_wait

prefer_passive_wait()  # measure what `stream-ser` runs (stream_ser/cli.py sets it before torch loads)

import torch  # noqa: E402  (after the OpenMP policy, which libgomp reads once when torch loads)

from stream_ser.allocator import keep_freed_memory
from stream_ser.audio import load_audio
from stream_ser.config import FrontendConfig
from stream_ser.engine import MultiStreamEngine
from stream_ser.gcpause import startup_objects_frozen
from stream_ser.model import CONV_INT8_KEY, EmotionModel, calibrate_conv_int8, half_precision_cnn, quantize_for_cpu
from stream_ser import protocol as P
from stream_ser.protocol import percentiles
from stream_ser.recognizer import PaddingCache, StreamingRecognizer, embed_and_project, warm_up

ROOT = Path(__file__).resolve().parents[1]
EMODB = Path(os.environ.get("STREAM_SER_EMODB", ROOT.parent / "shared" / "data" / "emodb")) / "wav"
HOP_S = 0.32
CHUNK = 320  # 20 ms


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        # ("Intel(R) Xeon(R) Processor" -> intel-xeon: the marks and the generic word say nothing)
        model = re.sub(r"\((R|TM)\)|\bProcessor\b", " ", cpu_model(), flags=re.I)
        name = f"cpu-{torch.get_num_threads()}threads-{model}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:60]


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    """The median milliseconds of ``repeats`` calls of ``fn()``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``got`` against ``ref``: ||got - ref|| / ||ref||."""
    return float((got - ref).norm() / ref.norm())


def _median_of(runs: list[dict]) -> dict:
    """Element-wise median of a list of same-shaped nested dicts of numbers."""
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, dict):
            out[k] = _median_of([r[k] for r in runs])
        elif isinstance(v, (int, float)):
            out[k] = float(statistics.median(r[k] for r in runs))
        else:
            out[k] = v
    return out


def _files(n: int | None = None, min_s: float = 0.0) -> list[Path]:
    """Every EMO-DB file, or ``n`` spread over the corpus among those at least ``min_s`` long."""
    files = sorted(EMODB.glob("*.wav"))
    if not files:
        raise SystemExit(f"EMO-DB not found at {EMODB}")
    if min_s:
        import soundfile as sf
        files = [f for f in files if sf.info(str(f)).duration >= min_s]
    return files if n is None else files[:: max(1, len(files) // n)][:n]


# 1 -------------------------------------------------------------------------------
def hop_latency(model, audio: list[np.ndarray]) -> dict:
    """Per-hop compute of one stream at a time, a fresh stream per file (so the first 7 hops of every
    file, the partial windows, are over half of the hops). The streams share one PaddingCache, as an
    engine's streams do: where the padding segment does not change (this model's per-segment
    normalisation) only the first stream embeds it. Partial- and full-window hops also apart."""
    timings = {"frontend": [], "embed": [], "head": [], "total": []}
    split = {"total_partial_windows": [], "total_full_windows": []}
    cache = PaddingCache()
    for x in audio:
        rec = StreamingRecognizer(model, padding_cache=cache)
        for i in range(0, len(x), CHUNK):
            for p in rec.push(x[i:i + CHUNK]):
                for k in timings:
                    timings[k].append(p.timings_ms[k])
                split["total_partial_windows" if p.partial else "total_full_windows"].append(p.timings_ms["total"])
    return ({k: percentiles(v) for k, v in (timings | split).items()}
            | {"hops": len(timings["total"]), "partial_hops": len(split["total_partial_windows"])})


# 2 -------------------------------------------------------------------------------
def websocket_e2e(model, path: Path) -> dict:
    from websockets.asyncio.client import connect

    from stream_ser.capture import FileSource
    from stream_ser.live import LiveApp

    async def main():
        import io
        app = LiveApp(model, FileSource(path, realtime=True), port=0, dashboard=False, out=io.StringIO())
        runner = asyncio.create_task(app.run())
        while app.broadcaster._server is None:
            await asyncio.sleep(0.01)
        lat = []
        async with connect(app.broadcaster.url) as ws:
            while True:
                m = P.decode(await ws.recv(), allowed=P.SERVER_TYPES)
                if m["type"] == "prediction":
                    lat.append(1e3 * (time.time() - m["t_arrival"]))
                elif m["type"] == "end":
                    break
        await runner
        return lat

    lat = asyncio.run(main())
    return percentiles(lat) | {"messages": len(lat)}


# 3 -------------------------------------------------------------------------------
def cache_ratio(model, audio: np.ndarray, hops: int) -> dict:
    segs = model.frontend.segments(torch.from_numpy(audio).to(model.device))[0]  # [S, C, M, L]
    S = segs.shape[0]
    w = model.frontend_config.segments_per_utterance
    # both ways on the live hop's threads (stream_ser.openmp): one, but for CNN batches worth more
    with torch.no_grad(), intra_op_threads(1):
        cached, full = [], []
        proj_cache = list(embed_and_project(model, list(segs[:w])))
        for h in range(hops):
            k = w + h % (S - w)
            t0 = time.perf_counter()  # with the cache: embed the new segment, head over 8 cached projections
            proj_cache = proj_cache[1:] + list(embed_and_project(model, [segs[k]]))
            model.head.infer(torch.stack(proj_cache)[None])
            cached.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # without: embed all 8 segments of the window, then the head
            model.head.infer(embed_and_project(model, list(segs[k - w + 1:k + 1]))[None])
            full.append(time.perf_counter() - t0)
    c, f = statistics.median(cached), statistics.median(full)
    return {"with_cache_ms": 1e3 * c, "recompute_ms": 1e3 * f, "ratio": f / c, "hops": hops}


# 4 -------------------------------------------------------------------------------
def capacity_run(model, n_streams: int, audio: list[np.ndarray], hops: int) -> dict:
    """Feed n streams 320 ms of real audio per hop on the real-time clock; are they all kept up?"""
    eng = MultiStreamEngine(model)
    cfg = model.frontend_config
    w = cfg.segments_per_utterance
    warm = cfg.segment_samples + (w - 2) * cfg.shift_samples  # one hop short of the first window
    srcs = []
    for i in range(n_streams):
        sid = f"s{i}"
        eng.add_stream(sid)
        x = np.tile(audio[i % len(audio)], 1 + (warm + hops * cfg.shift_samples) // len(audio[i % len(audio)]))
        srcs.append((sid, x))
        eng.feed(sid, x[:warm])
    eng.step()  # fills the caches; not timed
    eng.embed_batches.clear()
    eng.head_batches.clear()
    lat, late = [], []
    t0 = time.perf_counter()
    for h in range(hops):
        due = t0 + h * HOP_S
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        late.append(max(0.0, time.perf_counter() - due))
        arrival = due  # the hop's last sample "arrived" on the real-time clock
        for sid, x in srcs:
            a = warm + h * cfg.shift_samples
            eng.feed(sid, x[a:a + cfg.shift_samples], arrival)
        for p in eng.step():
            P.encode(P.prediction(p.to_dict()))  # the message the server sends: its cost counts, as it does live
            lat.append(1e3 * (time.perf_counter() - arrival))
    eng.close()
    p = percentiles(lat)
    backlog_growing = late[-1] > HOP_S or (len(late) > 4 and late[-1] > late[len(late) // 2] + 0.05)
    return {"streams": n_streams, "latency_ms": p, "predictions": len(lat),
            "realtime": bool(p and p["p99"] < 1e3 * HOP_S and not backlog_growing and len(lat) == n_streams * hops),
            "max_lateness_ms": 1e3 * max(late), "embed_batch_max": max(eng.embed_batches, default=0),
            "head_batch_max": max(eng.head_batches, default=0)}


def capacity(model, audio: list[np.ndarray], ladder: list[int], hops: int) -> dict:
    runs, best = [], None
    for n in ladder:
        r = capacity_run(model, n, audio, hops)
        runs.append(r)
        print(f"  capacity {n:5d} streams: p99 {r['latency_ms'].get('p99', float('nan')):8.1f} ms  "
              f"realtime {r['realtime']}", flush=True)
        if not r["realtime"]:
            break
        best = r
    return {"max_realtime_streams": best["streams"] if best else 0, "at_max": best, "ladder": runs}


# 5 -------------------------------------------------------------------------------
# files per segments_many call tried in the corpus front-end figure (0: the whole corpus in one call); the
# fastest is the figure. On this 2-core CPU 16 and 128 trade places from run to run and the whole corpus at
# once is slowest (2026-11-27: 5098 / 1773 / 1444 s/s, then 4302 / 4513 / 2944 ten minutes later); on a GPU a
# call of 16 files is little work for its kernel launches and cuFFT plan (one per distinct frame count), so
# larger calls should pay there
FILES_PER_BATCH = (16, 128, 0)


def librosa_features(w: np.ndarray) -> None:
    """The reference: the same log-Mel (512-point FFT, 25 ms Hamming frames every 10 ms, 64 bands, 20-8000 Hz),
    deltas and delta-deltas with librosa, for one file (pre-emphasis over the whole signal, as librosa does)."""
    import librosa
    m = np.log(np.maximum(librosa.feature.melspectrogram(
        y=librosa.effects.preemphasis(w), sr=16000, n_fft=512, hop_length=160, win_length=400, window="hamming",
        center=False, n_mels=64, fmin=20, fmax=8000), 1e-10))
    librosa.feature.delta(librosa.feature.delta(m, width=5), width=5)


def frontend_throughput(files: list[Path], device: torch.device) -> dict:
    from stream_ser.features import Frontend

    waves = [load_audio(f).numpy() for f in files]
    secs = sum(len(w) for w in waves) / 16000
    librosa_features(waves[0])  # numba's JIT warm-up
    fe = Frontend().to(device)
    fe.segments(torch.from_numpy(waves[0]).to(device))
    t0 = time.perf_counter()
    # file by file on one intra-op thread: a file's few hundred frames are too little work to share (on two
    # threads this path ran 3739 s/s with OpenMP's default wait policy, 1905 with PASSIVE, 5246 on one)
    with torch.no_grad(), intra_op_threads(1):
        for w in waves:
            fe.segments(torch.from_numpy(w).to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    ours = time.perf_counter() - t0
    tw = [torch.from_numpy(w).to(device) for w in waves]
    fe.segments_many(tw[:4])
    sweep = {}
    for per_call in dict.fromkeys(min(n or len(tw), len(tw)) for n in FILES_PER_BATCH):
        t0 = time.perf_counter()
        with torch.no_grad():  # the corpus path: every file's frames in one FFT (chunks of per_call files)
            for i in range(0, len(tw), per_call):
                fe.segments_many(tw[i:i + per_call])
        if device.type == "cuda":
            torch.cuda.synchronize()
        sweep[per_call] = time.perf_counter() - t0
    best = min(sweep, key=sweep.get)
    batched = sweep[best]
    t0 = time.perf_counter()
    for w in waves:
        librosa_features(w)
    ref = time.perf_counter() - t0
    return {"audio_s": secs, "files": len(files), "file_by_file_threads": 1, "stream_ser_audio_s_per_s": secs / ours,
            "librosa_audio_s_per_s": secs / ref, "ratio": ref / ours,
            "batched_audio_s_per_s": secs / batched, "batched_ratio": ref / batched,
            "files_per_batch": best,
            "batched_audio_s_per_s_by_files_per_call": {str(k): secs / v for k, v in sweep.items()}}


# 6 -------------------------------------------------------------------------------
def training_throughput(image_size: int, batch: int, device: torch.device, steps: int) -> dict:
    model = EmotionModel(FrontendConfig(image_size=image_size)).to(device).train()
    opt = torch.optim.Adam(model.embedder.parameters(), 1e-4)
    x = torch.randn(batch, 3, 64, 64, device=device)
    y = torch.randint(0, 7, (batch,), device=device)
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model.embedder.logits(model.images(x)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return {"image_size": image_size, "batch": batch, "segments_per_s": batch / statistics.median(times)}


def write_markdown(results_dir: Path, out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    L = ["# Benchmarks", "", "Written by `python -m bench.run` (see `bench/run.py`); medians over repeated runs, "
         "latencies as p50 / p95 / p99 in ms. Real EMO-DB audio. One section per machine and model size.", ""]
    cpu_rows = [i for i, r in enumerate(rows) if not r["machine"]["device"].startswith("cuda")]
    for i, r in enumerate(rows):
        m = r["machine"]
        L += [f"## {r['name']}", "", f"{m['cpu']} · {m['threads']} torch threads · device `{m['device']}`"
              + f" · **{m.get('precision', 'fp32')}**"
              + (f" ({m['gpu']})" if m.get("gpu") else "") + f" · torch {m['torch']} · {r['date']}"
              + (" · freed memory kept (`stream_ser.allocator`)" if m.get("keeps_freed_memory") else "")
              + (" · **smoke run (tiny, not a measurement)**" if r.get("smoke") else ""), ""]
        for size, b in r["models"].items():
            h = b["hop_latency"]
            ck = b.get("checkpoint")
            title = (f"### The trained model `{ck['file']}` ({ck['image_size']} px, {ck['normalization']} "
                     f"normalisation), loaded as `stream-ser live` loads it · {ck['date']}" if ck
                     else f"### CNN input {size} px")
            L += [title, ""] + ([f"Inference: {b['inference']}.", ""] if b.get("inference") else []) \
                + ["| per-hop latency, one stream (ms) | p50 | p95 | p99 |", "|---|---|---|---|"]
            for k in ("frontend", "embed", "head", "total"):
                L.append(f"| {k} | {h[k]['p50']:.2f} | {h[k]['p95']:.2f} | {h[k]['p99']:.2f} |")
            for k, what in (("total_partial_windows", "total, the first 7 hops of a stream (partial windows)"),
                            ("total_full_windows", "total, the other hops (full windows)")):
                if h.get(k):
                    L.append(f"| {what} | {h[k]['p50']:.2f} | {h[k]['p95']:.2f} | {h[k]['p99']:.2f} |")
            if "websocket_e2e" in b:
                e = b["websocket_e2e"]
                L.append(f"| end to end over the websocket (arrival → received) | {e['p50']:.2f} | {e['p95']:.2f} | "
                         f"{e['p99']:.2f} |")
            c = b["cache"]
            cap = b["capacity"]
            at = cap["at_max"] or {}
            L += ["", f"- Embedding cache: {c['with_cache_ms']:.2f} ms per hop with it, {c['recompute_ms']:.2f} ms "
                      f"re-embedding the 8-segment window: **{c['ratio']:.1f}× cheaper**.",
                  f"- Capacity: **{cap['max_realtime_streams']} concurrent real-time streams** (every stream's p99 "
                  f"per-hop latency under 320 ms, no growing backlog); at that load p99 "
                  f"{at.get('latency_ms', {}).get('p99', float('nan')):.1f} ms, embedder batches up to "
                  f"{at.get('embed_batch_max', 0)} segments, head batches up to {at.get('head_batch_max', 0)} windows. "
                  "Ladder: " + ", ".join(f"{x['streams']}{'✓' if x['realtime'] else '✗'}"
                                        f" (p99 {x['latency_ms'].get('p99', float('nan')):.0f})" for x in cap["ladder"]),
                  ""]
        if "frontend" in r:
            f = r["frontend"]
            L += [f"Front-end throughput on {f['files']} EMO-DB files ({f['audio_s']:.0f} s of audio): stream_ser "
                  f"{f['stream_ser_audio_s_per_s']:.0f} s/s file by file"
                  + (f" on {f['file_by_file_threads']} thread" if f.get("file_by_file_threads") else "")
                  + f", librosa {f['librosa_audio_s_per_s']:.0f} s/s (**{f['ratio']:.1f}×**)"
                  + (f"; the corpus path (`Frontend.segments_many`, {f['files_per_batch']} files per call) "
                     f"{f['batched_audio_s_per_s']:.0f} s/s (**{f['batched_ratio']:.1f}×** librosa; target ≥ "
                     f"{_device_targets(r)['frontend_ratio']:.0f}×)"
                     if "batched_ratio" in f else "")
                  + (" (files per call: " + ", ".join(f"{n} {v:.0f} s/s" for n, v in
                                                      f["batched_audio_s_per_s_by_files_per_call"].items()) + ")"
                     if "batched_audio_s_per_s_by_files_per_call" in f else "") + ".", ""]
        if "training" in r:
            L += ["| stage-1 training | segments/s |", "|---|---|"]
            L += [f"| AlexNet {t['image_size']} px, batch {t['batch']} | {t['segments_per_s']:.0f} |"
                  for t in r["training"]]
            L.append("")
        L += _targets(r)
        for note in r.get("notes", []):
            L.append(f"- {note}")
        L.append("")
        if cpu_rows and i == cpu_rows[-1]:  # once, after the last CPU section: they are about all of them
            L += ["## Notes on the CPU figures", ""] + CPU_NOTES
    loaded = [json.loads(p.read_text()) for p in sorted((results_dir / "load").glob("*.json"))]
    if loaded:  # bench.under_load's figures
        from bench.under_load import markdown
        L += markdown(loaded)
    out.write_text("\n".join(L))


CPU_NOTES = [
    "What bounded the misses of the fp32 section as first measured (2026-11-24, the issue's starting point, kept "
    "as `bench/results/history/cpu-2threads-amd-epyc-fp32-2026-11-24-0644.json`; timed per layer with the model in "
    "eval mode, 2 threads; the int8 path's own bounds are a later note):",
    "",
    "| | conv layers | FC6 + FC7 | LSTM input projection |",
    "|---|---|---|---|",
    "| 227 px, 1 segment | 8.6 ms | 11.2 ms | 0.4 ms |",
    "| 227 px, 8 segments | 57.9 ms | 22.5 ms | 1.4 ms |",
    "| 112 px, 1 segment | 2.5 ms | 9.6 ms | 0.3 ms |",
    "| 112 px, 8 segments | 12.3 ms | 21.4 ms | 1.4 ms |",
    "",
    "- The cache ratio: with the cache a hop embeds one segment, whose cost is mostly streaming FC6/FC7's 54 M "
    "weights (218 MB) from memory; re-embedding the window embeds 8 segments in one batch, which streams those "
    "weights once too. So the ratio is bounded by (conv x8 + FC at batch 8) / (conv x1 + FC at batch 1): about "
    "4.1 at 227 px and 2.8 at 112 px here, and the measured 4.0 and 2.4 sit at that bound. The cache still saves "
    "75 % (227 px) and 55 % (112 px) of the compute per hop. int8 weight-only and bf16 matmuls were tried for "
    "FC6 at batch 1 on this CPU: `_weight_int8pack_mm` was 5x slower than fp32, bf16 no faster.",
    "- Capacity: until 2026-11-26 every stream ran its own silero-vad copy, one call per 32 ms chunk (10 per "
    "hop per stream); the engine now scores all its streams' chunks in one batched call per chunk round "
    "(`stream_ser.vad.score_queued`), which took int8 capacity from 32 to 48 streams at 227 px and from 64 to "
    "160 at 112 px (one ladder each, before/after on the same idle machine). At 227 px the conv work, which grows "
    "linearly with the streams (about 7 ms a segment in a batch), bounds it now.",
    "- Per-hop latency counts the first 7 hops of each stream (partial windows), which also embed a padding "
    "segment; it rides in the same embedder batch as the new segment since 2026-11-26. At 227 px int8, full "
    "windows alone: p99 10.5 ms; partial ones: p99 15.9 ms (22.2 ms before that change).",
    "- The GPU figures (targets: one stream p99 < 5 ms, >= 2000 streams) are in the nvidia-h100-80gb-hbm3 section "
    "(the third session lent a GPU, after the engine's batched front-end) and the nvidia-h200 section (the second, "
    "before it): one `python -m bench.run --device cuda` run each.",
    "- The front-end: batching whole files (`Frontend.segments_many`: every file's frames in one FFT and one "
    "filterbank product) was measured against file-by-file at 128 and 16 files per call: 1557 and 2965 s/s "
    "against 3560 and 3354 s/s file by file, so it does not help here. The work is bound by the FFT and memory "
    "traffic, not by per-call overhead; 20x librosa on 2 cores is not in reach this way.",
    "- Capacity is one run per stream count (a ladder that stops at the first miss), not a median; the figures "
    "moved by about one ladder step between two runs on this shared VM.",
    "- 2026-11-26, afternoon (the int8 section above): the CPU fast path also runs the convolutions channels-last "
    "(NHWC; oneDNN's kernels are about 30 % faster that way here) and, below 227 px, folds the adaptive pool into "
    "FC6 (at 112 px the conv stack ends at 2x2 and the pool only copies each cell 9 times, so FC6 takes 1024 inputs "
    "instead of 9216; at 64 px, 256). Before -> after on the idle machine, int8: 227 px per-hop p50 12.5 -> 10.7 ms, "
    "p95 13.2 -> 12.0, p99 14.0 -> 14.2 (the partial-window hops, which embed two segments, set the p99), capacity "
    "48 -> 64 streams; 112 px p99 8.6 -> 7.7 ms, capacity 160 both times (192 missed). The cache ratio falls "
    "(4.5 -> 3.6 at 227 px) because the saving is in the conv work the cache already avoided. The front-end: "
    "per-segment normalisation by two passes instead of Tensor.std's slow multi-dimension reduction, and deltas as "
    "slices instead of a conv1d, took it from 2851 to 7493 s/s file by file (librosa 1265 and 1529 s/s in the two "
    "runs: 2.3x -> 4.9x); the log-Mel itself (FFT and filterbank) now takes most of the time (profiled), so 20x "
    "is not in reach without a cheaper transform.",
    "- 2026-11-26, evening (the int8 section above, on the idle machine; training paused): the figures now hold "
    "three changes. (1) `PaddingCache`: a partial window's padding segment that equals one embedded before "
    "(per-segment normalisation, frozen statistics, `--silence-floor`) is not embedded again, and an engine's streams "
    "share it; 227 px partial-window hops p50 8.5 against 8.3 ms for full ones (before: p99 15.9 against 10.5). "
    "(2) The engine's front-end for all streams at once (log-Mel frames in one call, then every new segment's deltas, "
    "speech-frame moments and normalisation in one call each). (3) A live hop runs on one intra-op thread, but for "
    "CNN batches of at least one 227 px segment's pixels and engine hops of 8 or more streams "
    "(`stream_ser.openmp`), and `stream-ser` (and this benchmark) run with `OMP_WAIT_POLICY=PASSIVE`: a hop's small "
    "operations spread over two threads waited for the second worker, on a busy machine for a scheduler slice "
    "(`python -m bench.under_load`, the last section). Against the morning's run: 227 px p50 10.7 -> 8.4 ms, p95 "
    "12.0 -> 9.5, p99 14.2 -> 12.6 (full-window hops 11.7; the target of 12 ms is missed by the partial-window "
    "hops' outliers, p99 14.2 of 84 hops); the front-end's share of a hop p50 3.0 -> 1.7 ms; 112 px p99 7.7 -> "
    "8.1 (p50 6.1 -> 7.3: its one-segment CNN call now runs on one thread, 5.7 ms); capacity unchanged, 64 at 227 "
    "px and 160 at 112 px (80 and 192 missed). The cache ratio falls (3.6 -> 3.2 at 227 px, 2.0 -> 1.8 at 112 px), "
    "now measured on the live hop's threads both ways. The front-end figure is file by file on one thread: on two, "
    "this path ran 3739 s/s with OpenMP's default wait policy and 1905 with PASSIVE, on one 5246 (librosa about "
    "1300 s/s in those runs); building the log-Mel in one buffer (pre-emphasis, window and FFT padding without "
    "three copies) is worth about 18 % on one thread.",
    "- 2026-11-26, late evening (the int8 section above, idle machine, training paused; about 4 min): three changes. "
    "(1) int8 convolutions: static quantisation of AlexNet's conv stack with activation ranges measured on real "
    "speech through the live path and stored in the checkpoint (`meta[\"conv_int8\"]`, `ser-offline "
    "int8-calibrate`; here this untrained model's ranges from the benchmark's files, which the speed does not "
    "depend on). One segment's conv stack on one thread 6.5 -> 1.7 ms at 227 px; a single int8 segment runs on "
    "one thread (on two its kernels took 9-13 ms). (2) A recognizer embeds its padding segment when it is made, "
    "not in its first hop, which was the slowest hop of a run. (3) The engine's speech detection carries the "
    "batch's recurrent state from round to round and runs on all threads for 8 or more streams, the speaker "
    "statistics of all streams' new segments are one batched computation, and the head's windows one stack: "
    "256 streams of a 64 px cnn_lstm model fed as fast as possible (timed by phase, as `python -m bench.profile_engine --arch cnn_lstm --image-size 64 --normalization speaker` feeds them), "
    "297-306 -> 233-270 ms a hop on two threads (speech detection 59-62 -> 28-36 ms). Against the evening's run: "
    "227 px p50 8.4 -> 6.6 ms, p95 9.5 -> 7.4, p99 12.6 -> 8.4 (target <= 12 ms: met); 112 px p99 8.1 -> 5.2 ms; "
    "capacity 64 -> 160 streams at 227 px (192 missed) and 160 -> at least 320 at 112 px (the ladder's top; "
    "p99 243 ms there, not saturated; a second ladder at 112 px alone, `--image-sizes 112 --repeats 1 --ladder 320 384 448 512 "
    "640` written elsewhere, kept 384 streams, p99 307 ms, and missed 448, p99 721 ms). The cache ratio falls (3.2 -> 2.1 at 227 px, 1.8 -> 1.7 at 112 px): int8 "
    "made the conv work, which the cache saves, cheaper, so the 6x target is further away while both paths got "
    "faster. Front-end 3.7x librosa (librosa ran 1506 s/s this time, ours 5501 s/s).",
    "- Accuracy cost of the int8 paths on held-out speakers (issue 12's row: LOSO UAR within 0.5 points of fp32 "
    "on every fold; 2026-11-27). Each fold's model was scored in fp32, with int8 FC6/FC7, and with int8 "
    "convolutions as well (activation ranges from that fold's training speakers). EMO-DB, `cpu` preset, 10 folds "
    "(`docs/results/emodb-cpu-int8conv`, 25.7 min): fp32 55.93 %, int8 FC6/FC7 55.93 % (no fold changes), int8 "
    "convolutions 55.91 % (folds 03 and 11 lose 2.04 and 1.78 points, folds 13 and 14 gain 1.79 and 1.78, six "
    "unchanged). The bundled recipe on both corpora, 16 folds (`docs/results/multicorpus-level-cpu-speeds3`): int8 "
    "FC6/FC7 64.24 against 64.19 % (one fold +2.04); int8 convolutions on its last 4 folds, the only ones made "
    "since they exist, 54.98 against 55.47 % (two folds -1.17). So the mean is kept (over those 14 fold-runs: "
    "-0.16 points) and the every-fold criterion is not: one EMO-DB test speaker has 35-71 utterances in 7 classes, "
    "so a single changed answer moves its UAR by about 2 points, and a 3 % change in the conv features (7-bit "
    "activations) changes one or two answers on 4 of 10 folds. The live default keeps the int8 convolutions; "
    "`--precision fp32` turns them off.",
    "- 2026-11-27, the int8 head projection and the bundled model (then the int8 section above, now "
    "`bench/results/history/cpu-2threads-amd-epyc-int8-2026-11-27-0237.json`; idle machine; "
    "`python -m bench.run --precision int8 --ladder 1 32 64 96 128 160 192 224 256 320 384 448`, then "
    "`python -m bench.run --checkpoint bundled --ladder 1 64 128 192 256 320 384 448 512 640 768`, about 9 min). "
    "(1) The head's LSTM input projection (both directions' W_ih, 4096 x 1024, computed once per segment) is a "
    "dynamically quantised int8 layer on the CPU fast path (`quantize_head_projection`); its recurrence stays float32. "
    "In float32 its 16.8 MB of weights, read right after FC7's, made one 64 px segment's embedding and projection "
    "1.6 ms against 1.0 ms for the two timed apart (apparently the two weight sets evicting each other from the "
    "cache); in int8 the pair takes 1.0 ms, and 256 "
    "segments' projections 2.4 ms instead of 20.6 on one thread. Against the late evening's run: 227 px p50 "
    "6.6 -> 5.4 ms, p95 7.4 -> 6.0, p99 8.4 -> 6.2; 112 px p50 4.6 -> 3.6, p99 5.2 -> 4.4, capacity from at least "
    "320 to 384 streams (448 missed); 227 px capacity unchanged at 160 (192 missed), bound by the convolutions. "
    "What it changes: on the bundled model 5 of 1975 answers against the fast path without it (11 against fp32, "
    "12 before; `bench/results/precision/bundled-int8-headproj-cpu.json`); on held-out speakers nothing: the "
    "EMO-DB LOSO run `docs/results/emodb-cpu-int8head` gives every fold the same UAR with it as "
    "`emodb-cpu-int8conv` gave without it (the same models: fp32 equal on every fold). (2) The bundled model "
    "(the section `default.pt` above): the model `stream-ser live` runs by default, loaded as it loads it "
    "(64 px, speaker normalisation with live adaptation, silero-vad, int8), where the other parts are untrained "
    "models at the issue's image sizes with per-segment normalisation. One stream p50 3.0 ms, p99 3.9 ms a hop "
    "(4.5 and 6.6 without the int8 projection, the same day); over the websocket p50 6.4 ms. Capacity 256 "
    "streams (320 missed: p99 341 ms; 389 without the int8 projection), below the untrained 112 px model's 384 "
    "because speaker normalisation and speech detection cost more per stream than the smaller CNN saves: 256 "
    "streams fed as fast as possible (`python -m bench.profile_engine --checkpoint bundled --streams 256`, before "
    "the int8 projection) took 189 ms a hop under the profiler, of which silero-vad's batched calls were 50 ms.",
    "- 2026-11-27, garbage collection: importing torch and the model leaves about 280 000 objects Python's "
    "collector tracks, and a full collection walks them all (about 160 ms here). In an engine of 256 bundled-model "
    "streams fed as fast as possible, one came inside a hop every 15-35 hops and made it 340-366 ms where the "
    "others took about 190. `stream-ser live` (and, since then, this benchmark's figures 1-4) now serve with the "
    "start-up objects frozen out of those collections (`stream_ser.gcpause`); the same engine then had no "
    "collection over 10 ms in 60 hops. The figures of the previous note were measured just before that "
    "(02:37-02:45). A run with it at 03:30 (`bench/results/history/`) is not comparable: the host's memory was "
    "slower then (`bench.bounds`: FC6 + FC7 of one 227 px segment 1.24 ms at 02:41, 1.61 ms at 03:38), and it "
    "gave 227 px p50 7.0 ms and 128 streams, 112 px p50 3.6 ms and 384 streams, the bundled model p50 3.5 ms and "
    "288 streams (320 missed again, p99 342 ms: not the collector). One stream with and without the freeze, "
    "alternated in one process at that time: p50 6.5-7.3 ms both ways (no full collection in a one-stream run).",
    "- 2026-11-27, what bounds the two missed CPU targets, measured (`python -m bench.bounds`, idle machine, "
    "17 s, after the int8 projection; `bench/results/bounds/`). Each part of the int8 CNN and the head's input "
    "projection timed at batch 1 (a cached hop embeds one segment) and batch 8 (re-embedding the window), on "
    "the threads a live hop gives them (`stream_ser.openmp`):",
    "",
    "| int8 CPU path, ms (threads) | conv stack | FC6 + FC7 | head input projection | bound on the cache ratio |",
    "|---|---|---|---|---|",
    "| 227 px, 1 segment (1) | 1.59 | 1.24 | 0.07 | |",
    "| 227 px, 8 segments (2) | 6.91 | 1.18 | 0.14 | 2.8x |",
    "| 112 px, 1 segment (1) | 0.45 | 0.34 | 0.07 | |",
    "| 112 px, 8 segments (2) | 2.34 | 0.42 | 0.12 | 3.4x |",
    "| 64 px, 1 segment (1) | 0.25 | 0.25 | 0.07 | |",
    "| 64 px, 8 segments (1) | 1.08 | 0.42 | 0.10 | 2.8x |",
    "",
    "  FC6/FC7 and the projection cost about as much for 8 segments as for one (their weights are read once a "
    "call), and 8 segments' convolutions run on both cores where one runs on one (int8 kernels split one image "
    "badly). So no cache can make a hop more than (8-segment cost) / (1-segment cost) cheaper: about 3x at every "
    "size; the measured 2.2x, 1.8x and 1.5x (the bundled model) sit under it because both paths also pay the "
    "head's recurrence. Even with FC6/FC7 and the head free, the convolutions alone give 4.3x (227 px), 5.2x "
    "and 4.4x: the 6x target is out of reach on this CPU. The cache still saves a third to a half of a hop's "
    "compute.",
    "",
    "  The front-end, stage by stage over all 535 EMO-DB files (1487 s of audio), one thread, best of 5 passes: "
    "the FFTs alone 33 400 audio-s/s; with the power spectrum, filterbank and log (the log-Mel, from padded "
    "frames) 11 000; the log-Mel from samples (framing, pre-emphasis, window) 9 100; the whole front-end "
    "(deltas, segments, normalisation) 4 960; librosa 1 760. The FFTs, which any front-end computing this "
    "transform (512-point FFTs of 25 ms frames every 10 ms) must do, are 18.9x librosa by themselves, so the "
    "20x target cannot be met on one core whatever else is removed. Tried and not kept: the filterbank product "
    "restricted to the non-zero bins of each quarter of the Mel bands (four small products instead of one): a "
    "third cheaper for a whole file's 300 frames but twice the cost for a live hop's 32, and one code path for "
    "both keeps streaming equal to offline; the power spectrum as |z|^2 or z * conj(z): no faster once contiguous.",
    "",
    "- 2026-11-27, what bounds the int8 convolutions' accuracy (the row they miss: every fold within 0.5 points, "
    "where one changed answer moves a fold about 2 points), measured on the bundled model (`python -m "
    "bench.conv_int8_error`, 9 s; `bench/results/precision/conv-int8-error-*.json`): ranges from 196 live "
    "images of 5 EMO-DB speakers, errors (relative L2 against float32) on 181 of the 5 others. The conv stack "
    "as deployed: 2.53 %. Each convolution fed float32 activations: its input's quantisation 3.5 % (the "
    "image), 1.6, 1.0, 1.5, 1.3 %, its output 3.9, 1.8, 2.0, 1.5, 1.9 %: the error is spread over all five "
    "layers, not one. The kernels compute exactly what integer arithmetic gives (no output a step away from "
    "it), so nothing saturates. The stored ranges are the engine's 7-bit ones, but the kernels clamp at 255, "
    "so each activation keeps twice its calibrated range as headroom, and that matters: up to 2 activations in "
    "10^4 (by layer) lie beyond the calibrated range on other speakers, and ranges measured for 8 bits, which clip them, "
    "give 13.5 %. Tried and not kept: the first convolution in float32, 2.33 %; every range scaled by 0.8, "
    "0.9, 1.25, 1.5: 4.6, 3.3, 3.1, 3.6 %; added in the afternoon (the same command, the same images): 8-bit "
    "ranges from the calibration extremes (no histogram) times 1.0, 1.25, 2.0: 5.6, 3.1, 3.4 %; every "
    "activation's channels brought to comparable ranges before quantising (SmoothQuant-style, folded into the "
    "weights; in float32 the same function to 4e-7), balancing activation and weight ranges (alpha 0.5) "
    "2.31 %, activation ranges alone (alpha 1) 2.63 %; and for scale, the weights alone in int8 with float32 "
    "activations, 0.56 %: the activations' 256 levels are the error, not the weights or uneven channels. "
    "So no choice of per-tensor 8-bit ranges brings the convolutions "
    "near int8 FC6/FC7's 1 %, which changed no EMO-DB fold; the every-fold row would need finer activations "
    "than these kernels take. What the int8 convolutions buy the bundled model, one run each at 04:16 and "
    "04:20 (`bench/results/history/bundled-*-2026-11-27-*.json`; the bundled checkpoint with and without "
    "`meta[\"conv_int8\"]`): one stream p50 3.2 against 5.4 ms, p99 3.6 against 7.0 ms a hop; both carry the "
    "ladder's top, 320 streams (p99 242 against 267 ms). What they cost it: against fp32 on its 1975 training "
    "utterances, 11 answers change with them and 9 without (`python -m bench.int8_agreement --checkpoint` on "
    "the copy without ranges; `bench/results/precision/bundled-int8-without-int8-convolutions-cpu.json`), so "
    "most changed answers come from int8 FC6/FC7 and the projection, and leaving the convolutions in float32 "
    "would buy two answers in 1975 for 70 % more latency. The live default keeps them. Without them the "
    "untrained models still meet the reachable CPU targets (04:31, `bench/results/history/"
    "cpu-2threads-amd-epyc-int8-without-int8-convolutions-2026-11-27-0431.json`): 227 px p50 8.1, p99 11.1 ms, "
    "64 streams (96 missed); 112 px p99 6.5 ms, at least 160 streams (the ladder's top).",
    "- 2026-11-27, 04:36-04:43, the int8 section above, with the start-up objects frozen out of the collector "
    "(idle machine, the host's memory fast again: `bench.bounds` at 04:31 timed FC6 + FC7 of one 227 px segment "
    "1.34 ms, 1.24 at 02:41, 1.61 at 03:38; the same two commands as the int8 projection's note). Against the "
    "02:37-02:45 run: 227 px p50 5.4 -> 5.9 ms, p99 6.2 -> 6.7, 160 streams both times (192 missed); 112 px p50 "
    "3.6 -> 3.5 ms, p99 4.4 -> 5.5, 384 streams both times (448 missed); the bundled model p50 3.0 -> 3.3 ms, "
    "p99 3.9 -> 4.4, and 256 -> 384 streams (448 missed: p99 337 ms; at 320 p99 341 -> 245 ms). One stream is "
    "within this host's drift (a one-stream run has no full collection); the capacity is what the freeze is "
    "for. Front-end 2.9x librosa (librosa 1801 s/s this time, ours 5253).",
    "- 2026-11-27, 05:09, speech detection rebuilt (the `default.pt` section above; `python -m bench.run "
    "--checkpoint bundled --ladder 1 64 128 192 256 320 384 448 512 640 768`, idle machine, `bench.bounds` at "
    "05:07: FC6 + FC7 of one 227 px segment 1.24 ms, as at 02:41). silero-vad's network is rebuilt from the "
    "wheel's weights (`stream_ser.vad.SileroNet`, checked against the TorchScript model when loaded): every "
    "queued chunk of every stream goes through its encoder in one batch (it has no memory), only its LSTM cell "
    "steps chunk round by chunk round, and the STFT is an FFT instead of a convolution with 258 basis rows. "
    "The same answers: `python -m bench.int8_agreement` gives the bundled model the same UAR and WA to the last "
    "digit, fp32 and the fast path, and the same 11 changed answers. An engine hop of 256 bundled-model streams "
    "fed as fast as possible (`python -m bench.profile_engine --checkpoint bundled --streams 256`): 172 -> 157 "
    "ms under the profiler, speech detection 48 -> 28 ms. One stream pushing a hop's 5120 samples at a time: "
    "speech detection 2.5 -> 1.0 ms a hop, the whole push 6.1 -> 3.9 ms. This benchmark's one stream is fed 20 "
    "ms at a time, which spreads the detection over the pushes before a hop, so it moved little (p50 3.27 -> "
    "3.22 ms, p99 4.36 -> 4.11). Capacity 384 -> 448 streams (512 missed: p99 330 ms).",
    "- 2026-11-27, where a hop of 256 bundled-model streams goes now (`python -m bench.profile_engine "
    "--checkpoint bundled --streams 256`, which now prints it by phase; 160 ms a hop under the profiler): speech "
    "detection 29 ms, log-Mel frames 25, segments (deltas, speaker statistics, normalisation) 46, CNN embedding "
    "and head projection 26, the head 14, the rest of the engine's step 19. The functions called once per "
    "stream or more take 48 ms of that as their own time, 0.19 ms a stream: on a GPU, where the batched stages "
    "shrink, that alone would fill a 320 ms hop at about 1700 streams, so issue 12's 2000 streams need the "
    "per-stream state held as batched tensors.",
    "- 2026-11-27, 07:29-07:37, the int8 and `default.pt` sections above: large freed blocks kept in the process "
    "(`stream_ser.allocator.keep_freed_memory`, which `stream-ser`, `ser-offline` and these benchmarks call "
    "first; glibc's mmap and trim thresholds at 1 GiB) and the engine's frame energies computed with its log-Mel "
    "frames in one call. glibc had handed every large temporary back to the kernel when it was freed, so each "
    "hop's FFT buffers (16 MiB at 256 streams) and each training step's activations came back with a page fault "
    "per 4 KiB page. An engine hop of 512 bundled-model streams fed as fast as possible (`python -m "
    "bench.profile_engine --checkpoint bundled --streams 512 --hops 20 --timing`, with and without "
    "`--default-malloc`, run alternately, six pairs): median 215-240 ms kept against 290-316 ms with glibc's "
    "defaults (before this session's change, a852b22: about 294 ms); peak memory at that load (max RSS) 2.5 -> "
    "3.4 GiB, the cost. The log-Mel of 8192 frames on one thread 32 -> 11 ms. Stage-1 training, the rows above "
    "against 04:36's: 227 px 46 -> 63 (batch 32) and 59 -> 81 (batch 128) segments/s, 112 px 72 -> 122 and 155 "
    "-> 200. One stream: no difference (227 px, three alternating pairs of `hop_latency`, p50 6.3-6.5 ms either "
    "way). Capacity near its edge moves by a rung between runs of the same code, so four runs after the change "
    "(06:40-06:47, whose JSON the next run overwrote, figures from its log; 07:08-07:15 and 07:15-07:23 in "
    "`bench/results/history/`; and 07:29-07:37, above; `bench.bounds` had the host's memory as fast as at 02:41 "
    "throughout, though one-stream latencies drifted by 30 % between them): 227 px 192 / 224 / 160 / 192 streams "
    "(before: 160), 112 px at least 448 / 384 / 448 / 512 (before: 384), the bundled model 512 / 448 / 448 / 512 "
    "(before: 448). The per-hop medians above are the firmer figure.",
    "- 2026-11-27, a burst of new streams: a hop in which every stream's window is still partial built each "
    "stream's padding segment with its own front-end call and compared it with the cached ones stream by stream "
    "(`torch.equal`, on a GPU a wait each). Now all of a hop's padding segments are normalised in one call "
    "(`recognizer.padding_segments`) and compared all at once (`PaddingCache.projections`). 256 fresh "
    "bundled-model streams, their hops 2-7 (`python -m bench.profile_engine --checkpoint bundled --streams 256 "
    "--timing --partial-windows`, three alternating pairs against 0d54f55): median 137-140 -> 107-123 ms, about "
    "a full-window hop's 106-111 ms. The capacity ladder does not see it: its streams start together and it "
    "times full windows only.",
    "- 2026-11-27, 09:12-09:21, the int8 and `default.pt` sections above: less of an engine hop's work done "
    "stream by stream (`git log 170b8e3..01f4f86`). Each stream's log-Mel frames are kept on the host (a numpy "
    "append instead of a `torch.cat` per stream, which on a GPU is a kernel launch each); every stream's STFT "
    "frames are gathered by start index from one joined buffer (`Frontend._frames_many`), with no unfold and cat "
    "per stream; every new segment's speech-detector frame mask comes from one call (`vad.frame_masks`); the "
    "speaker statistics of all streams are added in three `foreach` calls (`RunningStats.add_each`); the "
    "detector's history is an array, its queue the unscored samples themselves; blocks are checked by their "
    "extremes; and the moments run on the segments' device. Under the profiler (`python -m bench.profile_engine "
    "--checkpoint bundled --streams 256`) the own time of functions called once per stream or more fell from 36 "
    "to 18 ms a hop. Hop medians, alternating pairs against 170b8e3 (`--timing`): 512 streams 229-235 -> 205-212 "
    "ms (three pairs), 256 fresh streams' partial-window hops 109-110 -> 101-102 ms (`--partial-windows`, two "
    "pairs). Besides, a prediction's dict is built field by field (`Prediction.to_dict`, 31 -> 1.0 us; with its "
    "JSON message 9.8 us), and the live recognizer hands a hop's predictions to the server's loop in one wake-up. "
    "Since this run the capacity ladder makes every prediction into the message the server sends (`to_dict` and "
    "JSON), as `stream-ser live` does, so these capacities carry a cost the earlier ones did not (with `asdict`, "
    "about 18 ms a hop at 576 streams; with `to_dict`, about 6). Against 07:29's run: 227 px 192 -> 224 streams (256 missed, p99 353 ms), "
    "112 px 512 -> 576 (640 missed), the bundled model 512 -> 576 (640 missed, p99 326 ms); one stream p99 227 px "
    "8.2 -> 8.3 ms, 112 px 5.7 -> 4.1, the bundled model 4.7 -> 3.4 (p50 3.0). One run each: capacity near its "
    "edge moves by a rung between runs (the 07:29 note); the hop medians above are the firmer figure. The "
    "previous section is `bench/results/history/cpu-2threads-amd-epyc-int8-2026-11-27-0729.json`. These capacities are "
    "the engine's, fed in-process; the whole server over real websockets (`python -m bench.server_capacity`, "
    "`docs/reliability.md`) carried 320 to 448 bundled-model producers in three runs, on the same two cores as "
    "its clients.",
    "- 2026-11-27, 12:08-12:16, the int8 and `default.pt` sections above, in a slow hour of this host "
    "(`python -m bench.bounds` at 12:20: FC6 + FC7 of one 227 px segment 1.96-2.11 ms, against 1.24 at 02:41 "
    "and 05:07; this run's front-end 4247 audio-s/s against 09:12's 5540, its training rows 8-12 % lower). "
    "Three changes (`git log b8cf3db..HEAD`). (1) Engine shards (`stream_ser.engine`): on the CPU an engine "
    "splits its streams in two, and a step that feeds at least 192 streams (`SHARD_MIN_STREAMS`) steps the two "
    "halves side by side, each in a thread of its own on one intra-op thread. Much of a hop is operations too "
    "small to use two threads well, and torch releases Python's lock inside them, so two such batches on one "
    "thread each do more than one batch on two. Fewer streams, one batch in the caller's thread, as before "
    "(hop medians, the bundled model: 160 streams 57 ms as one batch, 62 as two shards; 192 streams 72 against "
    "68). (2) Every thread allocates from the main malloc heap (`stream_ser.allocator`, `M_ARENA_MAX` = 1): a "
    "thread's own arena cannot keep a block over 64 MiB whatever the thresholds, and the shards (like the live "
    "recognizer's thread) make such blocks every hop at 227 px: two shards at 224 streams took a median 596 ms a "
    "hop with per-thread arenas, 296 ms with the main heap (one run each). (3) The speaker statistics' per-segment sums as two "
    "float32 batched products (47 -> 6 ms for 416 segments; within 1e-6 of float64 sums, tested). The capacity "
    "rung, one batch against two shards run alternately in this hour (`bench.run.capacity_run`, 12 hops): the "
    "bundled model at 640 streams p50 294 / 329 / 477 ms, never real time, against 265 / 269 / 276 ms, real time "
    "all three times; 112 px at 512 streams p50 270-274 against 261-269 ms; 227 px at 224 streams the same "
    "(305 against 306 ms; 387 against 371). This run against 09:12's: the bundled model 576 -> 768 streams (832 "
    "missed, p99 336 ms); 227 px 224 -> 192 (224 missed, p99 415 ms) and 112 px 576 -> 512 (576 missed), which "
    "the slow hour explains, as the pairs above show. One stream of the bundled model is unchanged (three "
    "alternating pairs of `hop_latency` against b8cf3db: p50 3.24-3.49 against 3.33-3.56 ms); this run's p50 3.9 "
    "ms is the hour's. This run is kept as `bench/results/history/cpu-2threads-amd-epyc-int8-2026-11-27-1208-"
    "slow-host.json`; 09:12's as `...-0912.json`.",
    "- 2026-11-27, 12:35-12:40, the int8 and `default.pt` sections above: the same code and the same two commands "
    "as 12:08, the host fast again (`bench.bounds` at 12:35: FC6 + FC7 1.21-1.23 ms). Against 09:12's run (before "
    "the shards, the single malloc arena and the float32 moments): the bundled model 576 -> 768 streams (p99 "
    "294.6 ms; 832 missed, p99 334 ms); 227 px 224 -> 224 (p99 305 ms; 256 missed); 112 px 576 -> 576 (p99 297 "
    "ms; 640 missed, p99 335 ms); one stream p99 227 px 8.3 -> 6.6 ms, 112 px 4.1 -> 4.7, the bundled model 3.4 "
    "-> 4.3 (p50 3.0 -> 3.7; the alternating pairs in the 12:08 note found no difference for one stream, so this "
    "is the run's spread); front-end 2.9x librosa. The whole server (`python -m bench.server_capacity`, 12:41, "
    "`docs/reliability.md`): 384 producers (448 missed by 1.4 ms of p99).",
    "- 2026-11-27, 13:30-13:38, the fp32 section above, rerun with today's code (`python -m bench.run --precision "
    "fp32 --ladder 1 32 64 96 128 160 192 224 256 320 384`; the host middling, `bench.bounds` FC6 + FC7 of the "
    "int8 path 1.38-1.45 ms): what `--precision fp32` users get now. Against the 2026-11-24 fp32 run: 227 px one "
    "stream p99 27.6 -> 24.0 ms, 24 -> 32 streams (64 missed), cache 4.0 -> 3.1x; 112 px p99 21.1 -> 16.5 ms, "
    "64 -> 128 streams (160 missed), cache 2.4 -> 1.9x. Not all of that is the code: the stage-1 training rows "
    "rose 1.6-1.9x too (227 px batch 32: 32 -> 58 segments/s), and their code changed only in that freed memory "
    "is now kept (`stream_ser.allocator`), so the host of 11-24 was slower, or paid page faults, or both. A "
    "segment's float32 embedding costs what it did (227 px, 19.9 -> 20.6 ms a hop), while the rest of the hop "
    "got cheaper (batched speech detection, front-end and statistics; one intra-op thread for a hop's small "
    "operations), so the cache's ratio fell. Against the int8 section (12:35): int8 is 3.6x faster for one stream at 227 px (p99 24.0 against "
    "6.6 ms) and carries 7x the streams (32 against 224). The corpus front-end now tries 16, 128 and all 535 "
    "files per call (4302, 4513 and 2944 s/s here; in a quick run ten minutes earlier 5098, 1773 and 1444): "
    "the choice moves by run on this CPU, so the figure is the fastest of the three.",
    "- 2026-11-27, `torch.compile` (Inductor, `dynamic=True`, frozen weights), tried on each batched part of a "
    "hop of the bundled model and not kept (`python -m bench.torch_compile`, "
    "`bench/results/compile/cpu-2threads-amd-epyc.json`; medians, eager -> compiled, at 1 / 64 / 384 windows or "
    "segments): the head over the windows 0.40 -> 0.56, 5.6 -> 5.7, 20.0 -> 18.9 ms (its recurrent matrix "
    "products are the work, which Inductor leaves as they are); a hop's deltas and speaker normalisation 0.22 -> "
    "0.34, 3.2 -> 1.8, 11.8 -> 9.1 ms (fused; about 1 % of a 512-stream hop, and slower for one stream); the "
    "float32 embedder and projection 13.1 -> 10.2, 66 -> 34, 331 -> 181 ms, still 4-7x the int8 path's eager "
    "1.5, 6.8, 33 ms; the int8 path itself cannot be traced (its quantised modules have no fake-tensor kernels, "
    "so Dynamo runs them eagerly: 1.5 -> 1.9 ms). What it would cost: 2-20 s of compilation at start-up, a C++ "
    "compiler on the user's machine, and recompilations as a hop's batch changes.",
    "- 2026-11-27, the quantised-kernel engine of the int8 path (`python -m bench.quantized_engines`, three runs, "
    "`bench/results/precision/quantized-engines-cpu-2threads-amd-epyc.json` the first; the bundled model's "
    "embedding and head input projection, medians of 20, at 1 / 64 / 384 segments): x86 (PyTorch's default, "
    "kept) 1.01-1.05, 6.3-6.6, 31.3-32.3 ms; fbgemm 0.89-0.96, 7.5-8.4, 39.5-42.3 ms; oneDNN 1.13-1.21, "
    "6.2-6.9, 30.3-32.0 ms. The three compute the same numbers (2.91 % from float32 each, on the same images). "
    "fbgemm would save about 0.1 ms of a one-stream hop and cost a quarter more at 384 segments; oneDNN is "
    "within the runs' spread of x86 for many streams and slower for one.",
    "- 2026-11-27, evening, what an engine hop dispatches (`python -m bench.profile_engine --checkpoint bundled "
    "--streams 64 --ops`: the tensor operations of one hop, counted by a dispatch mode, at N and N/4 streams; "
    "each is a kernel launch where the model runs on a GPU). The bundled model: 383 operations a hop with full "
    "windows and 425 in fresh streams' partial ones, at 2, 16 or 64 streams alike; an untrained 112 px model "
    "(float32, per-segment normalisation) 336. Until now the speaker statistics added three a stream (two row "
    "copies and a read of the frame count, on host tensors whatever the device, so no launches, but 1-2 us "
    "of dispatch each); they are numpy copies and a Python count now, and `tests/test_engine.py` holds a hop's "
    "operations equal at 2 and 6 streams (on the CPU, and on a GPU where there is one). So on a GPU a hop "
    "launches the same few hundred kernels for 10 streams or 500 (beyond the engine's batch of 512, its CNN and "
    "head calls repeat per 512); what still grows with the streams is host "
    "Python, about 70 us a stream a hop here (under the profiler, 256 streams: feeding and checking samples, "
    "each stream's frame and detector bookkeeping, building its prediction). 512 bundled-model streams, "
    "`--timing`, three alternating pairs against d9b918a: median 169-181 -> 168-177 ms a hop (the host work "
    "removed is a millisecond or two of it: within the spread).",
    "- 2026-11-27, night, the corpus front-end's host work (`Frontend.segments_many`, for the GPU's front-end "
    "row: at 500x librosa the 535 EMO-DB files must take about 7 ms on the GPU machine). It dispatched 38 "
    "operations a call whatever the number of files, but four views a file (each file's log-Mel frames cut "
    "into its segments apart, and its samples flattened), 2164 views for the whole corpus in one call: "
    "host time that on a GPU nothing hides. The segments are now gathered from the joined log-Mel frames in "
    "one call by start indices computed on the host, as the frames already were from the joined samples: 38 "
    "operations and 25 views for 16 or 535 files (`count_tensor_ops`; `tests/test_features.py` holds them "
    "equal for 3 and 9 files, on a GPU too where there is one). Timed apart on this CPU, the per-file cutting "
    "took 1.46 ms for 535 files and the start indices take 0.06 ms (best of 50). The CPU figure does not "
    "change (its calls are bound by the FFT and memory traffic); the GPU one needs a lent GPU "
    "(`scripts/gpu-bench.sh` tries 16, 128 and 535 files a call).",
    "- 2026-11-27, evening, on another machine: an Intel Xeon (2 cores, AVX-512 VNNI and AMX; the sections "
    "`cpu-2threads-intel-xeon-*` above; `python -m bench.run --precision int8 --ladder 1 32 64 96 128 160 192 "
    "224 256 320 384 448`, 3.5 min, then the bundled model) instead of the AMD EPYC of the other CPU sections. "
    "It is a slower host all round, not another code path: librosa 720 audio-s/s against 1782, stage-1 "
    "training 30-124 segments/s against 64-195, one stream's front-end p50 6.3-7.4 ms against 2.7-3.3. So "
    "on it 227 px misses the one-stream target (p99 17.3 ms; 6.6 on the AMD) and 112 px meets it (10.7); "
    "capacity 96 streams at 227 px and 256 at 112 px (both targets met; the AMD 224 and 576); the bundled "
    "model p99 9-11 ms, 320-384 streams (the AMD 768); front-end 2.1x librosa file by file, 3.9x as a corpus. "
    "On it "
    "AMX does not change which path is fastest (the bundled model's embedding and projection, one 64 px "
    "segment on one thread, medians of 30 timed by a one-off script: fp32 17.6 ms, int8 2.2, bf16 15.2, bf16 "
    "with the pool folded 10.0; FC6/FC7's weight traffic dominates, and int8 moves a quarter of it).",
    "- 2026-11-27, evening, the int8 convolutions' accuracy again (the row they miss): each activation as two "
    "int8 levels (`--precision int8x2`, `stream_ser.model._TwoLevelConvStack`): floor to the calibrated step, "
    "then the remainder in 255ths of it, both through oneDNN's int8 convolution with float32 output (the "
    "second call adds the bias and ReLU to the first's sum), the same stored ranges. The bundled model's conv "
    "stack 0.67 % from float32 against 2.53 % (the weights' own share is 0.56 %; `python -m "
    "bench.conv_int8_error`, `bench/results/precision/conv-int8-error-cpu-2threads-intel-xeon.json`, which "
    "also times the stacks); 6 of its 1975 answers change against 11 (`bench/results/precision/"
    "bundled-int8x2-cpu.json`). Zero points other than 0 made oneDNN's kernels 5-12x slower (compensation "
    "per call), hence floor and a remainder that is never negative. Cost, conv stack at 64 px on one thread: "
    "1 segment 3.4 ms (int8 2.2, float32 3.5), 64 segments 19.3 ms (int8 6.7, float32 64.0). The bundled "
    "model live, three alternating pairs on the Xeon: one stream p99 10.7-14.0 ms against int8's 9.2-11.1; "
    "256-320 streams (320 and 384 missed) against 320-384 (384 once, 448 twice missed; four runs). On held-out speakers "
    "(`docs/results/emodb-cpu-int8x2`, 10 folds on the Xeon) it changes 2 folds by one answer each (-2.04, "
    "+2.38; mean +0.03 points), single-level int8 3 folds (+1.43 to +3.57; mean +0.66), and int8 FC6/FC7 "
    "without int8 convolutions one (-1.30): no int8 path keeps every fold within 0.5 points on these models. "
    "So the default stays single-level int8, the fastest; int8x2 is an option for features closer to "
    "float32.",
    "",
]

TARGETS = {"cpu": {"p99_ms": 12.0, "cache_ratio": 6.0, "streams": {"227": 48, "112": 128}, "frontend_ratio": 20},
           "cuda": {"p99_ms": 5.0, "cache_ratio": None, "streams": {"227": 2000, "112": 2000}, "frontend_ratio": 500}}


def _device_targets(r: dict) -> dict:
    return TARGETS["cuda" if r["machine"]["device"].startswith("cuda") else "cpu"]


def _targets(r: dict) -> list[str]:
    """The issue's targets against this machine's figures, per CNN input size."""
    t = _device_targets(r)
    models = {size: b for size, b in r["models"].items() if "checkpoint" not in b}  # the targets are per size
    if not models:
        return []
    L = ["| target (issue 12) | " + " | ".join(f"{s} px" for s in models) + " |",
         "|---|" + "---|" * len(models)]

    def cell(ok: bool, text: str) -> str:
        return f"{'met' if ok else '**missed**'}: {text}"

    L.append(f"| one stream, p99 per-hop < {t['p99_ms']:.0f} ms | " + " | ".join(
        cell(b["hop_latency"]["total"]["p99"] < t["p99_ms"], f"{b['hop_latency']['total']['p99']:.1f} ms")
        for b in models.values()) + " |")
    if t["cache_ratio"]:
        L.append(f"| cache >= {t['cache_ratio']:.0f}x cheaper per hop | " + " | ".join(
            cell(b["cache"]["ratio"] >= t["cache_ratio"], f"{b['cache']['ratio']:.1f}x") for b in models.values())
            + " |")
    L.append("| real-time streams (" + ", ".join(f">= {n} at {size} px" for size, n in t["streams"].items()
                                              if size in models) + ") | " + " | ".join(
        cell(b["capacity"]["max_realtime_streams"] >= t["streams"].get(size, 0),
             str(b["capacity"]["max_realtime_streams"])) for size, b in models.items()) + " |")
    return L + [""]


def measure_model(model, audio: list[np.ndarray], long_file: Path, long_audio: np.ndarray, ladder: list[int],
                  repeats: int, smoke: bool) -> dict:
    """Figures 1-4 for one model: per-hop latency, websocket end to end, the cache's worth, capacity; with
    the start-up objects frozen out of the garbage collector's full collections, as `stream-ser live` runs."""
    with startup_objects_frozen():
        warm_up(model)  # as `stream-ser live` does before serving
        b = {"inference": model.meta.get("inference")}
        b["hop_latency"] = _median_of([hop_latency(model, audio) for _ in range(repeats)])
        print(f"  hop latency total {b['hop_latency']['total']}", flush=True)
        if not smoke:
            b["websocket_e2e"] = _median_of([websocket_e2e(model, long_file) for _ in range(repeats)])
            print(f"  websocket e2e {b['websocket_e2e']}", flush=True)
        b["cache"] = _median_of([cache_ratio(model, long_audio, 5 if smoke else 40) for _ in range(repeats)])
        print(f"  cache ratio {b['cache']['ratio']:.2f}", flush=True)
        b["capacity"] = capacity(model, audio, ladder, 3 if smoke else 12)
    return b


def _checkpoint_path(ap: argparse.ArgumentParser, spec: str | None) -> Path | None:
    if spec is None:
        return None
    if spec == "bundled":
        from stream_ser.assets import default_checkpoint
        path = default_checkpoint()
        if path is None:
            ap.error("--checkpoint bundled: this install has no bundled model (stream_ser/assets/default.pt)")
        return path
    path = Path(spec)
    if not path.is_file():
        ap.error(f"--checkpoint {spec}: no such file")
    return path


def measure_checkpoint(path: Path, device: torch.device, precision: str, audio: list[np.ndarray], long_file: Path,
                       long_audio: np.ndarray, ladder: list[int], repeats: int, smoke: bool) -> tuple[str, dict]:
    """A trained model's figures 1-4, loaded as `stream-ser live` loads it (its own image size, normalisation,
    int8 calibration and temperature) -> (its key in the machine's results, ``"<size>, trained: <file>"``,
    and its figures, with what the model is and when it was measured under ``"checkpoint"``)."""
    from stream_ser.model import load_checkpoint

    model = load_checkpoint(path, device, precision)
    key = f"{model.frontend_config.image_size}, trained: {path.name}"
    print(f"{key} ({model.meta.get('inference') or precision})", flush=True)
    b = measure_model(model, audio, long_file, long_audio, ladder, repeats, smoke)
    b["checkpoint"] = {"file": path.name, "image_size": model.frontend_config.image_size,
                       "normalization": model.frontend_config.normalization, "arch": model.model_config.arch,
                       "labels": len(model.labels), "date": time.strftime("%Y-%m-%d %H:%M")}
    return key, b


def save_json(result: dict, out: Path | str, name: str) -> Path:
    """Write ``result`` as ``out/<name>.json`` (folders made), print it and where it went; the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return path


def _results_path(out: Path, name: str, smoke: bool) -> Path:
    return out / f"{name}{'-smoke' if smoke else ''}.json"


def _write_results(result: dict, out: Path, docs: Path, smoke: bool) -> int:
    """Write this machine's results and (but for a smoke run) docs/benchmarks.md from every machine's."""
    path = _results_path(out, result["name"], smoke)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    if not smoke:
        write_markdown(out, docs)
    print(f"wrote {path}" + ("" if smoke else f" and {docs}"))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-sizes", type=int, nargs="+", default=[227, 112],
                    help="CNN input sizes to measure (227: the paper; 112: the bundled model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI: checks the code, measures nothing useful")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--precision", choices=("fp32", "int8", "int8x2", "bf16", "fp16"), default=None,
                    help="int8: FC6/FC7 dynamically quantised and the convolutions statically, as `stream-ser "
                         "live` runs on a CPU (CPU only); int8x2: the same with the convolutions' activations as "
                         "two int8 levels (CPU only); bf16 / fp16: the CNN in half precision (for a GPU). "
                         "Default: fp32, or with --checkpoint what `stream-ser live` picks (int8 on a CPU)")
    ap.add_argument("--checkpoint", default=None, metavar="PATH|bundled",
                    help="measure this trained model, loaded as `stream-ser live` loads it, instead of untrained "
                         "ones at --image-sizes (`bundled`: the model that ships with stream_ser, which "
                         "`stream-ser live` runs by default); its section joins this machine's existing results "
                         "(the other figures are kept), and the front-end and training figures are not re-run")
    ap.add_argument("--ladder", type=int, nargs="+", default=None, help="stream counts to try for capacity")
    ap.add_argument("--frontend-only", action="store_true",
                    help="measure only the front-end against librosa and update that figure in this machine's "
                         "existing results (the other figures are kept)")
    args = ap.parse_args(argv)
    keeps_freed = keep_freed_memory()  # as the console scripts run (stream_ser.allocator)
    device = torch.device(args.device)
    torch.manual_seed(0)
    smoke = args.smoke
    files = _files(2 if smoke else 12, min_s=3.5)  # long enough for several 3 s windows
    audio = [load_audio(f).numpy() for f in files]
    long_file = max(files if smoke else _files(), key=lambda f: f.stat().st_size)  # the longest: most windows
    long_audio = load_audio(long_file).numpy()
    ladder = args.ladder or ([1, 2] if smoke else
                             ([1, 64, 256, 512, 1024, 1536, 2048, 3072, 4096] if device.type == "cuda"
                              else [1, 8, 16, 24, 32, 40, 48, 64, 80, 96, 128]))
    repeats = 1 if smoke else args.repeats
    machine = {"cpu": cpu_model(), "threads": torch.get_num_threads(),
               "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "keeps_freed_memory": keeps_freed}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    if args.precision in ("int8", "int8x2") and device.type != "cpu":
        ap.error(f"--precision {args.precision} is a CPU path")
    checkpoint = _checkpoint_path(ap, args.checkpoint)
    precision = args.precision or ("fp32" if checkpoint is None or device.type != "cpu" else "int8")
    machine["precision"] = precision
    name = machine_name(device) + ("" if precision == "fp32" else f"-{precision}")
    result = {"name": name, "date": time.strftime("%Y-%m-%d %H:%M"), "smoke": smoke,
              "machine": machine, "models": {}, "notes": []}
    out, docs = Path(args.out), Path(args.docs)
    if args.frontend_only or checkpoint is not None:  # one part measured again: this machine's others are kept
        kept = _results_path(out, name, smoke)
        if kept.is_file():
            result = json.loads(kept.read_text())
    if args.frontend_only:
        result["frontend"] = frontend_throughput(files if smoke else _files(), device)
        result["frontend"]["date"] = time.strftime("%Y-%m-%d %H:%M")
        print(f"  {result['frontend']}", flush=True)
        return _write_results(result, out, docs, smoke)
    if checkpoint is not None:
        key, b = measure_checkpoint(checkpoint, device, precision, audio, long_file, long_audio, ladder, repeats,
                                    smoke)
        b["keeps_freed_memory"] = keeps_freed
        result.setdefault("models", {})[key] = b
        return _write_results(result, out, docs, smoke)
    for size in args.image_sizes:
        print(f"CNN input {size} px", flush=True)
        model = EmotionModel(FrontendConfig(image_size=size)).to(device).eval()
        if precision in ("int8", "int8x2"):
            # int8 convolutions as a trained checkpoint gets them: activation ranges from real speech (here
            # this untrained model's, from the benchmark's files; the speed does not depend on the values)
            with torch.no_grad():
                imgs = model.images(torch.cat([model.frontend.segments(torch.from_numpy(a))[0] for a in audio[:4]]))
            model.meta[CONV_INT8_KEY] = calibrate_conv_int8(model, imgs)
            quantize_for_cpu(model, 2 if precision == "int8x2" else 1)
        elif precision != "fp32":
            half_precision_cnn(model, precision)
        result["models"][str(size)] = measure_model(model, audio, long_file, long_audio, ladder, repeats, smoke)
    print("front-end throughput", flush=True)
    result["frontend"] = frontend_throughput(files if smoke else _files(), device)
    print(f"  {result['frontend']}", flush=True)
    result["training"] = [training_throughput(s, bt, device, 1 if smoke else 4)
                          for s in args.image_sizes for bt in ((32,) if smoke else (32, 128))]
    print(f"  training {result['training']}", flush=True)
    return _write_results(result, out, docs, smoke)


if __name__ == "__main__":
    raise SystemExit(main())
