"""What ``torch.compile`` would buy the live path on the CPU, measured (issue 12 lists it as a lever):

    python -m bench.torch_compile [--checkpoint bundled|PATH] [--repeats 15]

Each part of an engine hop that runs as one batched call, eager against ``torch.compile`` (Inductor,
``dynamic=True`` since a hop's batch changes with the streams fed; weights frozen, so that oneDNN's
prepacked kernels can be used), at the batch sizes of one stream (1) and of many streams:

1. the head over the windows (``head.infer``: both LSTM directions over 8 cached projections);
2. a hop's new segments: deltas and speaker normalisation (``Frontend._with_deltas`` and ``normalize``);
3. the embedder and the head's input projection, float32 (``--precision fp32``) and int8 (as
   ``stream-ser live`` runs it on a CPU).

Each compiled result is checked against eager (relative L2). Prints the compile time and the medians, and
writes ``bench/results/compile/<machine>.json``. A measurement for the notes of docs/benchmarks.md, not
a path the live recognizer takes.
"""

from __future__ import annotations

import argparse
import time
import warnings

from stream_ser.allocator import keep_freed_memory
from stream_ser.openmp import prefer_passive_wait

prefer_passive_wait()  # as `stream-ser` runs

import torch  # noqa: E402

from bench.run import ROOT, _checkpoint_path, cpu_model, machine_name, median_ms, rel_l2, save_json  # noqa: E402

BATCHES = (1, 8, 64, 384)  # windows or segments per call: one stream, then an engine hop's worth


def _rel(a, b) -> float:
    """rel_l2 of two results, of their first parts where they are tuples (the head: logits, attention)."""
    return rel_l2(*((a[0], b[0]) if isinstance(a, tuple) else (a, b)))


def compare(name: str, fn, make, repeats: int, batches=BATCHES) -> dict:
    """Eager ``fn`` against its compiled self on inputs ``make(batch)`` -> a dict of times (ms) per batch, or
    of why it could not be compiled (Inductor needs a C++ compiler on the CPU)."""
    import torch._dynamo
    torch._dynamo.reset()
    t0 = time.perf_counter()
    compiled = torch.compile(fn, dynamic=True)
    probe = make(16)
    try:
        with torch.no_grad():
            err = _rel(compiled(*probe), fn(*probe))
    except Exception as e:  # (a missing compiler, or an operator Inductor cannot lower: reported, not fatal)
        print(f"{name}: not compiled: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", flush=True)
        return {"failed": f"{type(e).__name__}: {str(e).strip()[:1000]}"}
    out = {"compile_s": time.perf_counter() - t0, "rel_l2_vs_eager": err, "ms": {}}
    for b in batches:
        x = make(b)
        with torch.no_grad():
            out["ms"][str(b)] = {"eager": median_ms(lambda: fn(*x), repeats),
                                 "compiled": median_ms(lambda: compiled(*x), repeats)}
    print(f"{name}: compiled in {out['compile_s']:.1f} s, rel. L2 {err:.1e}; "
          + "; ".join(f"{b}: {t['eager']:.2f} -> {t['compiled']:.2f} ms" for b, t in out["ms"].items()), flush=True)
    return out


def main(argv=None) -> int:
    from stream_ser.model import load_checkpoint

    ap = argparse.ArgumentParser(prog="python -m bench.torch_compile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="bundled", help="bundled (default: the model stream-ser live runs) or a path")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES),
                    help="windows or segments per call (default: %(default)s)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compile"))
    args = ap.parse_args(argv)
    path = _checkpoint_path(ap, args.checkpoint)
    keep_freed_memory()  # as the console scripts run
    warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation; Inductor's notes on CUDA
    import torch._inductor.config as inductor
    inductor.freezing = True  # weights as constants: what lets Inductor use oneDNN's prepacked kernels
    torch.manual_seed(0)
    res = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "checkpoint": str(path), "parts": {}}
    int8 = load_checkpoint(path, "cpu")
    fp32 = load_checkpoint(path, "cpu", precision="fp32")
    cfg = int8.frontend_config
    size, H4 = cfg.image_size, int8.head.lstm.weight_hh_l0.shape[0]
    fe = int8.frontend

    def segments(static, mean, std):
        return fe.normalize(fe._with_deltas(static), (mean, std))

    parts = res["parts"]
    parts["head over the windows"] = compare(
        "head over the windows", int8.head.infer, lambda b: (torch.randn(b, cfg.segments_per_utterance, 2, H4),),
        args.repeats, args.batches)
    parts["segments: deltas and normalisation"] = compare(
        "segments: deltas and normalisation", segments,
        lambda b: (torch.randn(b, cfg.n_mels, cfg.segment_frames) - 5, torch.randn(b, cfg.channels, cfg.n_mels),
                   torch.rand(b, cfg.channels, cfg.n_mels) + 0.5), args.repeats, args.batches)
    for label, model in (("fp32", fp32), ("int8", int8)):
        parts[f"embedding and projection, {label}"] = compare(
            f"embedding and projection, {label}", lambda x, m=model: m.head.project(m.embed(x)),
            lambda b: (torch.randn(b, cfg.channels, size, size),), args.repeats, args.batches)
    save_json(res, args.out, machine_name(torch.device("cpu")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
