"""Which of PyTorch's quantised-kernel engines the CPU fast path should run on, measured (issue 12 names
x86/fbgemm and oneDNN):

    python -m bench.quantized_engines [--checkpoint bundled|PATH] [--repeats 20]

For each engine this machine supports of ``stream_ser.model.CONV_INT8_ENGINES``, in a fresh interpreter
(the engine is fixed when the model is quantised): the model loaded as ``stream-ser live`` loads it, then
its embedding and head input projection (the int8 part of a hop) timed at 1 and 8 segments on one intra-op
thread and at 64 and 384 on all of them, as the live path runs them (``stream_ser.openmp``), and their
error against float32 (relative L2, on the same random images). Writes
``bench/results/precision/quantized-engines-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

from stream_ser.openmp import prefer_passive_wait

prefer_passive_wait()  # as `stream-ser` runs (before torch loads, here and in each engine's interpreter)

BATCHES = ((1, 1), (8, 1), (64, 0), (384, 0))  # (segments, intra-op threads; 0: all)


def measure(engine: str, checkpoint: str, repeats: int) -> dict:
    """One engine, in this interpreter: {"inference", "rel_l2_vs_fp32", "ms": {segments: median}}."""
    import torch
    torch.backends.quantized.engine = engine
    from bench.run import median_ms, rel_l2
    from stream_ser.allocator import keep_freed_memory
    from stream_ser.model import load_checkpoint
    from stream_ser.openmp import intra_op_threads
    keep_freed_memory()
    warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation
    torch.manual_seed(0)
    model, ref = load_checkpoint(checkpoint, "cpu"), load_checkpoint(checkpoint, "cpu", precision="fp32")
    size = model.frontend_config.image_size

    def run(m, x):
        with torch.no_grad():
            return m.head.project(m.embed(x))

    x = torch.randn(64, model.frontend_config.channels, size, size)
    got, want = run(model, x), run(ref, x)
    out = {"inference": model.meta.get("inference"), "rel_l2_vs_fp32": rel_l2(got, want),
           "ms": {}}
    for n, threads in BATCHES:
        x = torch.randn(n, model.frontend_config.channels, size, size)
        with intra_op_threads(threads or torch.get_num_threads()):
            out["ms"][str(n)] = median_ms(lambda: run(model, x), repeats)
    return out


def main(argv=None) -> int:
    import torch

    from bench.run import ROOT, _checkpoint_path, cpu_model, machine_name, save_json
    from stream_ser.model import CONV_INT8_ENGINES

    ap = argparse.ArgumentParser(prog="python -m bench.quantized_engines", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="bundled", help="bundled (default: the model stream-ser live runs) or a path")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "precision"))
    ap.add_argument("--one", metavar="ENGINE", help=argparse.SUPPRESS)  # (the child's side: measure one, print JSON)
    args = ap.parse_args(argv)
    path = _checkpoint_path(ap, args.checkpoint)
    if args.one:
        print(json.dumps(measure(args.one, str(path), args.repeats)))
        return 0
    res = {"cpu": cpu_model(), "torch": torch.__version__, "default_engine": torch.backends.quantized.engine,
           "date": time.strftime("%Y-%m-%d %H:%M"), "checkpoint": str(path), "engines": {}}
    for engine in CONV_INT8_ENGINES:
        if engine not in torch.backends.quantized.supported_engines:
            res["engines"][engine] = {"skipped": "not supported by this build of torch"}
            continue
        r = subprocess.run([sys.executable, "-m", "bench.quantized_engines", "--one", engine, "--checkpoint", str(path),
                            "--repeats", str(args.repeats)], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if r.returncode:
            res["engines"][engine] = {"failed": r.stderr.strip().splitlines()[-1:]}
            continue
        res["engines"][engine] = e = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{engine}: " + ", ".join(f"{n} segments {ms:.2f} ms" for n, ms in e["ms"].items())
              + f"; {100 * e['rel_l2_vs_fp32']:.2f} % from fp32", file=sys.stderr, flush=True)
    save_json(res, args.out, f"quantized-engines-{machine_name(torch.device('cpu'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
