"""Where one engine hop goes at N streams: cProfile over hops fed as fast as possible (not on the real-time clock).

    python -m bench.profile_engine --device cuda --streams 256 --image-size 227 [--normalization speaker]
    python -m bench.profile_engine --streams 256 --checkpoint bundled   # the model `stream-ser live` runs
    python -m bench.profile_engine --streams 512 --checkpoint bundled --timing [--default-malloc]  # hop times
    python -m bench.profile_engine --streams 256 --checkpoint bundled --ops   # tensor operations a hop

Prints the milliseconds per hop, where they go by phase (the engine's batched stages, and the work done
stream by stream: what bounds the stream count once the batched stages are cheap, as on a GPU), then the
functions by own time and by cumulative time. Used to find what bounds the engine's stream count
(docs/benchmarks.md); a profile, not a benchmark figure. With ``--timing``, no profile: the median and
fastest hop, for comparing two versions or settings run one after the other. With ``--ops``, no profile:
the tensor operations one hop dispatches (each a kernel launch where the model runs on a GPU), by operator,
at N streams and at N/4: what a hop launches must not grow with its streams.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import statistics
import time

import numpy as np
import torch

from bench.run import _checkpoint_path, _files
from stream_ser.allocator import keep_freed_memory
from stream_ser.audio import load_audio
from stream_ser.config import FrontendConfig, ModelConfig
from stream_ser.engine import MultiStreamEngine
from stream_ser.gcpause import startup_objects_frozen
from stream_ser.model import EmotionModel
from torch.utils._python_dispatch import TorchDispatchMode


# the engine hop's batched stages: (label, module file, function), each called once a hop from the engine
PHASES = (("speech detection (all streams' chunks)", "stream_ser/vad.py", "score_queued"),
          ("log-Mel frames (all streams)", "stream_ser/recognizer.py", "compute_frames"),
          ("segments: deltas, statistics, normalisation", "stream_ser/recognizer.py", "make_segments"),
          ("CNN embedding and head projection", "stream_ser/recognizer.py", "embed_and_project"),
          ("head over the windows", "stream_ser/model.py", "infer"))


def phases(stats: pstats.Stats, hops: int, streams: int) -> list[tuple[str, float]]:
    """(label, ms per hop) of each batched stage, the rest of the engine's step, and the own time of every
    function called at least once per stream per hop (the work done stream by stream, wherever it runs)."""
    raw = stats.stats  # {(file, line, function): (primitive calls, calls, own s, cumulative s, callers)}

    def cum(path: str, fn: str) -> float:
        return sum(v[3] for k, v in raw.items() if k[0].endswith(path) and k[2] == fn)

    out = [(label, 1e3 * cum(path, fn) / hops) for label, path, fn in PHASES]
    step = 1e3 * cum("stream_ser/engine.py", "_step") / hops
    out.append(("the rest of the engine's step", step - sum(ms for _, ms in out)))
    per_stream = sum(v[2] for v in raw.values() if v[1] >= streams * hops)
    out.append(("own time of functions called once per stream or more", 1e3 * per_stream / hops))
    return out


def per_stream_functions(stats: pstats.Stats, hops: int, streams: int) -> list[tuple[tuple, float, float]]:
    """(function key, own ms a hop, calls a hop) of every function called at least once per stream per hop,
    most own time first: the work done stream by stream, which batching has not reached."""
    rows = [(k, 1e3 * v[2] / hops, v[1] / hops) for k, v in stats.stats.items() if v[1] >= streams * hops]
    return sorted(rows, key=lambda r: -r[1])


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active, by name; views (no kernel, no copy) apart."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.views: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.views if func.is_view else self.ops)[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_tensor_ops(fn) -> tuple[collections.Counter, collections.Counter, object]:
    """Run ``fn()`` and count the tensor operations it dispatches: (operations by name, views by name,
    what ``fn`` returned). An operation (not a view) is a kernel launch where its tensors are on a GPU."""
    counter = _OpCounter()
    with counter:
        out = fn()
    return counter.ops, counter.views, out


def fed_engine(model: EmotionModel, streams: int, audio: list[np.ndarray], partial_windows: bool = False,
               shards: int | None = None, hops: int = 10):
    """An engine of ``streams`` streams (file ``i % len(audio)`` each, looped), fed and stepped up to one
    hop short of a full window (with ``partial_windows``: of the first segment) -> (engine, hop, warm_hops,
    hops): ``hop(h)`` feeds every stream its h-th hop of audio (320 ms) and steps the engine, returning its
    predictions; call it for h in 0 .. warm_hops - 1 to warm up, then for the ``hops`` measured ones (with
    ``partial_windows`` at most segments 2-7: fewer than asked, perhaps)."""
    cfg = model.frontend_config
    if partial_windows:  # one hop short of the first segment; one hop to warm up, then segments 2-7
        warm, warm_hops = cfg.segment_samples - cfg.shift_samples, 1
        hops = min(hops, cfg.segments_per_utterance - 2)
    else:  # one hop short of a full window; three hops to warm up
        warm, warm_hops = cfg.segment_samples + (cfg.segments_per_utterance - 2) * cfg.shift_samples, 3
    eng, srcs = MultiStreamEngine(model, shards=shards), []
    for i in range(streams):
        a = audio[i % len(audio)]
        x = np.tile(a, 1 + (warm + (hops + warm_hops) * cfg.shift_samples) // len(a))
        eng.add_stream(f"s{i}")
        eng.feed(f"s{i}", x[:warm])
        srcs.append((f"s{i}", x))
    eng.step()

    def hop(h: int):
        for sid, x in srcs:
            start = warm + h * cfg.shift_samples
            eng.feed(sid, x[start:start + cfg.shift_samples])
        preds = eng.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return preds

    return eng, hop, warm_hops, hops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=227)
    ap.add_argument("--normalization", default="segment", choices=("segment", "speaker"))
    ap.add_argument("--arch", default="dcnn_blstmwa", choices=("dcnn_blstmwa", "cnn_lstm"),
                    help="cnn_lstm: the paper's small baseline CNN, so the per-stream host work shows over the CNN's")
    ap.add_argument("--checkpoint", default=None, metavar="PATH|bundled",
                    help="profile this trained model as `stream-ser live` loads it (`bundled`: the one that ships "
                         "with stream_ser) instead of an untrained one built from the options above")
    ap.add_argument("--hops", type=int, default=10, help="profiled or timed hops (after 3 unprofiled ones; 1 with "
                    "--partial-windows)")
    ap.add_argument("--top", type=int, default=20, help="functions listed per ordering")
    ap.add_argument("--timing", action="store_true",
                    help="no profile: time each hop alone (inside the collector freeze, as `stream-ser live` runs) "
                         "and print the median and the fastest; for before/after comparisons, run alternately")
    ap.add_argument("--ops", action="store_true",
                    help="no profile: count the tensor operations of one hop (kernel launches on a GPU), by "
                         "operator, at --streams streams and at a quarter of them")
    ap.add_argument("--partial-windows", action="store_true",
                    help="time (or profile) fresh streams' first hops, whose windows are partial (segments 2-7, "
                         "so at most 6 hops), instead of full-window hops: a burst of new streams")
    ap.add_argument("--shards", type=int, default=None,
                    help="the engine's shards (stream_ser.engine); default: with --timing the engine's own default, "
                         "as `stream-ser live` runs it; for a profile 1, since the profiler sees only this thread")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc thresholds as they are, to measure what stream_ser.allocator buys")
    args = ap.parse_args(argv)
    if not args.default_malloc:
        keep_freed_memory()  # as the console scripts run (stream_ser.allocator)
    dev = torch.device(args.device)
    if args.checkpoint:
        from stream_ser.model import load_checkpoint
        model = load_checkpoint(_checkpoint_path(ap, args.checkpoint), dev)
        args.image_size, args.normalization = model.frontend_config.image_size, model.frontend_config.normalization
    else:
        model = EmotionModel(FrontendConfig(image_size=args.image_size, normalization=args.normalization),
                             ModelConfig(arch=args.arch)).to(dev).eval()
    audio = [load_audio(f).numpy() for f in _files(12, min_s=3.5)]
    what = f"{dev} {args.streams} streams, {args.image_size} px, {args.normalization} normalisation" \
        + (", partial windows" if args.partial_windows else "")
    if args.ops:
        return _print_ops(model, args, audio, what)
    shards = args.shards if args.shards is not None or args.timing else 1
    eng, hop, warm_hops, args.hops = fed_engine(model, args.streams, audio, args.partial_windows, shards, args.hops)
    what += f", {eng.shards} shard{'s' if eng.shards > 1 else ''}"

    for h in range(warm_hops):  # warm-up: caches, cuDNN plans
        hop(h)
    if args.timing:
        times = []
        with startup_objects_frozen():
            for h in range(warm_hops, warm_hops + args.hops):
                t0 = time.perf_counter()
                hop(h)
                times.append(1e3 * (time.perf_counter() - t0))
        if args.partial_windows and any(rec.window_is_full for rec in eng.streams.values()):
            raise RuntimeError("a timed hop had a full window")  # the hop arithmetic above is wrong
        print(f"{what}, {'default' if args.default_malloc else 'kept'} freed memory: median {statistics.median(times):.1f} "
              f"ms, fastest {min(times):.1f} ms a hop over {args.hops} hops")
        return 0
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    with startup_objects_frozen():  # as the timing and `stream-ser live`: no full collection over torch's objects
        prof.enable()
        for h in range(warm_hops, warm_hops + args.hops):
            hop(h)
        prof.disable()
    ms = 1e3 * (time.perf_counter() - t0) / args.hops
    print(f"{what}: {ms:.1f} ms per hop (profiled)")
    stats = pstats.Stats(prof)
    for label, phase_ms in phases(stats, args.hops, args.streams):
        print(f"  {label:55s} {phase_ms:8.1f} ms a hop ({1e3 * phase_ms / args.streams:6.1f} us a stream)")
    print("\n  functions called once per stream or more, by own time (ms a hop, calls a hop):")
    for (path, line, fn), ms, calls in per_stream_functions(stats, args.hops, args.streams)[:args.top]:
        print(f"  {ms:8.2f} {calls:8.0f}  {path.split('stream_ser/')[-1]}:{line}({fn})")
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    return 0


def _print_ops(model: EmotionModel, args, audio: list[np.ndarray], what: str) -> int:
    """Tensor operations of one measured hop at ``args.streams`` streams and at a quarter of them (one
    batch each: the shards split a hop's operations between threads, not their number per stream)."""
    counts = {}
    for n in sorted({max(1, args.streams // 4), args.streams}):
        eng, hop, warm_hops, _ = fed_engine(model, n, audio, args.partial_windows, shards=1, hops=1)
        for h in range(warm_hops):
            hop(h)
        ops, views, preds = count_tensor_ops(lambda: hop(warm_hops))
        counts[n] = (ops, views, len(preds))
    print(f"{what}: tensor operations in one hop (kernel launches where the model runs on a GPU; views apart)")
    for n, (ops, views, preds) in counts.items():
        print(f"  {n:5d} streams ({preds} predictions): {sum(ops.values())} operations, {sum(views.values())} views")
    if len(counts) == 2:
        (n0, (ops0, _, _)), (n1, (ops1, _, _)) = counts.items()
        grow = {k: (ops1[k] - ops0[k]) / (n1 - n0) for k in ops0 | ops1 if ops1[k] != ops0[k]}
        print(f"  per added stream: {sum(grow.values()):+.2f} operations"
              + "".join(f"; {k} {v:+.3f}" for k, v in sorted(grow.items(), key=lambda kv: -abs(kv[1]))))
        if n1 > eng.max_batch:
            print(f"  (over {eng.max_batch} streams, the engine's largest batch, its CNN and head calls repeat "
                  f"once per {eng.max_batch}: compare counts within one batch)")
    ops = counts[args.streams][0]
    print(f"  by operator at {args.streams} streams: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
