"""What bounds issue 12's two missed CPU targets, measured rather than argued:

    python -m bench.bounds [--image-sizes 227 112 64] [--repeats 50]

1. The embedding cache (target: a hop >= 6x cheaper than re-embedding the window). Each part of the CNN
   and the head's input projection timed on the CPU fast path (int8, as `stream-ser live` runs it) at
   batch 1 (a cached hop) and batch 8 (a re-embedded window), on the live hop's threads
   (``stream_ser.openmp``). A batch of 8 reads FC6/FC7's and the projection's weights from memory once, as
   a batch of 1 does, so the ratio can be at most (conv x8 + FC and projection at batch 8) / (conv x1 + FC
   and projection at batch 1), whatever the cache does.
2. The front-end (target: >= 20x librosa on all of EMO-DB). Its stages timed cumulatively over every file,
   one intra-op thread, best of several passes, each file's frames cut and padded just before: the FFT
   alone, the FFT with the power spectrum, filterbank and log (the log-Mel), and the whole front-end
   (deltas, segments, normalisation). The FFT alone is the floor of any front-end that computes this
   transform (512-point FFTs of 25 ms frames every 10 ms); librosa's time over it is the highest ratio to
   librosa this transform allows.

Writes ``bench/results/bounds/<machine>.json`` (and prints it); the notes of docs/benchmarks.md
(``bench/run.py``'s ``CPU_NOTES``) quote it with the date.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from stream_ser.allocator import keep_freed_memory
from stream_ser.openmp import intra_op_threads, prefer_passive_wait

prefer_passive_wait()  # as `stream-ser` runs

import torch  # noqa: E402

from bench.run import ROOT, _files, cpu_model, librosa_features, machine_name, median_ms, save_json  # noqa: E402
from stream_ser.audio import load_audio  # noqa: E402
from stream_ser.config import FrontendConfig  # noqa: E402
from stream_ser.model import CONV_INT8_KEY, EmotionModel, calibrate_conv_int8, quantize_for_cpu  # noqa: E402
from stream_ser.openmp import embedding_threads  # noqa: E402


def cnn_parts(image_size: int, audio: list[np.ndarray], repeats: int) -> dict:
    """ms per call of the int8 conv stack, FC6+FC7 and the head's input projection at batch 1 and 8, and the
    cache-ratio bound they give."""
    model = EmotionModel(FrontendConfig(image_size=image_size)).eval()
    with torch.no_grad():
        imgs = model.images(torch.cat([model.frontend.segments(torch.from_numpy(a))[0] for a in audio[:4]]))
        model.meta[CONV_INT8_KEY] = calibrate_conv_int8(model, imgs)
        quantize_for_cpu(model)
    e = model.embedder
    out: dict = {"image_size": image_size, "inference": model.meta.get("inference")}
    with torch.no_grad(), intra_op_threads(1):  # a live hop's threads: one, but for batches worth more
        for batch in (1, 8):
            x = imgs[:batch].contiguous()
            threads = embedding_threads(batch, image_size, int8_convolutions=True)
            with intra_op_threads(threads):
                feats = e.features(x)
                flat = e.avgpool(feats).flatten(1)
                fc = e.fc(flat)
                conv_ms = median_ms(lambda: e.features(x), repeats)
                fc_ms = median_ms(lambda: e.fc(flat), repeats)
                proj_ms = median_ms(lambda: model.head.project(fc[None]), repeats)
            out[f"batch{batch}"] = {"conv_ms": conv_ms, "fc6_fc7_ms": fc_ms, "head_projection_ms": proj_ms,
                                    "threads": threads}
    b1, b8 = out["batch1"], out["batch8"]
    out["cache_ratio_bound"] = sum(b8[k] for k in ("conv_ms", "fc6_fc7_ms", "head_projection_ms")) / sum(
        b1[k] for k in ("conv_ms", "fc6_fc7_ms", "head_projection_ms"))
    return out


def frontend_stages(waves: list[np.ndarray], repeats: int) -> dict:
    """audio-seconds per second of each cumulative front-end stage and of librosa, over every file. The
    FFT stages are timed per file on that file's frames, cut and padded just before (untimed), so they are
    in cache as the front-end has them; the best of ``repeats`` passes."""
    from stream_ser.features import Frontend

    fe = Frontend()
    cfg = fe.config
    secs = sum(len(w) for w in waves) / cfg.sample_rate
    tw = [torch.from_numpy(w) for w in waves]

    def padded(w: torch.Tensor) -> torch.Tensor:  # windowed frames zero-padded to n_fft: the FFT's input
        frames = w.unfold(0, cfg.win_length, cfg.hop_length)
        buf = frames.new_zeros(frames.shape[0], cfg.n_fft)
        buf[:, :cfg.win_length] = frames * fe.window
        return buf

    def fft_stages() -> tuple[float, float]:
        t_fft = t_lm = 0.0
        for w in tw:
            buf = padded(w)
            t0 = time.perf_counter()
            s = torch.fft.rfft(buf)
            t1 = time.perf_counter()
            ((s.real.square() + s.imag.square()) @ fe.mel_fb).clamp_min_(cfg.log_floor).log_()
            t2 = time.perf_counter()
            t_fft, t_lm = t_fft + t1 - t0, t_lm + t2 - t0
        return t_fft, t_lm

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def librosa_path():
        for w in waves:
            librosa_features(w)

    out = {"files": len(waves), "audio_s": secs, "frames": sum(cfg.frames_for(len(w)) for w in waves),
           "passes": repeats}
    librosa_path()  # numba's JIT
    with torch.no_grad(), intra_op_threads(1):
        fft_stages()
        stages = [fft_stages() for _ in range(repeats)]
        out["fft_only"] = secs / min(a for a, _ in stages)
        out["log_mel_from_padded_frames"] = secs / min(b for _, b in stages)
        out["log_mel"] = secs / min(timed(lambda: [fe.log_mel(w) for w in tw]) for _ in range(repeats))
        out["front_end"] = secs / min(timed(lambda: [fe.segments(w) for w in tw]) for _ in range(repeats))
    out["librosa"] = secs / min(timed(librosa_path) for _ in range(repeats))
    out["ceiling_ratio_fft_only"] = out["fft_only"] / out["librosa"]
    out["ratio_front_end"] = out["front_end"] / out["librosa"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bounds", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-sizes", type=int, nargs="+", default=[227, 112, 64])
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per figure (median); front-end: passes")
    ap.add_argument("--frontend-repeats", type=int, default=5,
                    help="passes over the corpus per front-end figure (the best)")
    ap.add_argument("--files", type=int, default=None, help="EMO-DB files for the front-end (default: all)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bounds"))
    args = ap.parse_args(argv)
    keep_freed_memory()  # as the console scripts run (stream_ser.allocator)
    audio = [load_audio(f).numpy() for f in _files(12, min_s=3.5)]
    res = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M"),
           "cnn": [cnn_parts(s, audio, args.repeats) for s in args.image_sizes]}
    print(json.dumps(res["cnn"], indent=1), file=sys.stderr, flush=True)  # the CNN part while the front-end runs
    res["frontend"] = frontend_stages([load_audio(f).numpy() for f in _files(args.files)], args.frontend_repeats)
    save_json(res, args.out, machine_name(torch.device("cpu")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
