"""One live stream's per-hop latency while other work keeps the cores busy, with OpenMP's worker
threads spinning (libgomp's default wait policy) or sleeping (``OMP_WAIT_POLICY=PASSIVE``, what
``stream-ser`` sets for itself).

    python -m bench.under_load [--checkpoint PATH] [--files 6]

Why: on this 2-core machine, with another PyTorch job running, a tanh over one 64 x 128 tensor took
8 ms instead of 18 us and a small matmul 16 ms instead of 0.2 ms. Each of a hop's small parallel ops
waited for an OpenMP worker that had lost its core, so the loaded per-hop times were scheduler
slices, not compute. The policy is read once, when torch loads, so every cell runs in a fresh child
process:

- policy: the default (``OMP_WAIT_POLICY`` unset) or ``PASSIVE``;
- load: none; a PyTorch job (2 intra-op threads of matmuls, as a training run); two busy Python
  processes (as any other program).

Measured as ``bench.run``'s per-hop latency: the checkpoint as ``stream-ser live`` loads it (the int8
fast path on the CPU), fed 20 ms chunks as fast as it takes them. Writes
``bench/results/load/<machine>.json`` and the "Under load" section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("default", "PASSIVE")
LOADS = {
    "none": [],
    "pytorch-job": [[sys.executable, "-c",
                     "import torch\ntorch.set_num_threads(2)\na = torch.randn(256, 256)\nwhile True:\n    a @ a"]],
    "two-busy-processes": [[sys.executable, "-c", "while True:\n    pass"]] * 2,
}
LOAD_WORDS = {"none": "idle", "pytorch-job": "another PyTorch job (2 threads)",
              "two-busy-processes": "two busy processes"}


def child(checkpoint: str, n_files: int) -> dict:
    """In the child: the per-hop latency of one stream (``bench.run.hop_latency``) with this process's policy."""
    import torch

    from bench.run import _files, hop_latency
    from stream_ser.audio import load_audio
    from stream_ser.model import load_checkpoint

    model = load_checkpoint(checkpoint, "cpu")
    audio = [load_audio(f).numpy() for f in _files(n_files, min_s=3.5)]
    hop_latency(model, audio[:1])  # warm-up
    r = hop_latency(model, audio)
    return {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "image_size": model.frontend_config.image_size,
            "precision": "int8" if "int8" in model.meta.get("inference", "") else "fp32"} | r


def run_cell(policy: str, load: str, checkpoint: str, n_files: int) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # the loads: the default policy
    env = base if policy == "default" else base | {"OMP_WAIT_POLICY": policy}
    hogs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=base)
            for cmd in LOADS[load]]
    try:
        time.sleep(1.0 if hogs else 0.0)
        out = subprocess.run([sys.executable, "-m", "bench.under_load", "--child", "--checkpoint", checkpoint,
                              "--files", str(n_files)], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=False)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    if out.returncode != 0:
        raise SystemExit(f"child ({policy}, {load}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> list[str]:
    """The "Under load" section of docs/benchmarks.md from the JSON files of bench/results/load."""
    L = ["## Under load: one stream while other work keeps the cores busy", "",
         "Written by `python -m bench.under_load` (see its docstring). Per-hop compute of one stream, p50 / p99 in "
         "ms, the checkpoint as `stream-ser live` loads it. `stream-ser` sets `OMP_WAIT_POLICY=PASSIVE` for itself "
         "(unless the environment sets a policy), so its OpenMP workers sleep between parallel regions instead "
         "of spinning.", ""]
    for r in rows:
        L += [f"### {r['name']}", "",
              f"{r['machine']} · {r['threads']} torch threads · {r['model']} · {r['date']}", "",
              "| load | default policy, p50 / p99 | `PASSIVE`, p50 / p99 |", "|---|---|---|"]
        for load in LOADS:
            cells = [r["cells"].get(f"{p}/{load}") for p in POLICIES]
            if any(c is None for c in cells):
                continue
            L.append(f"| {LOAD_WORDS[load]} | " + " | ".join(
                f"{c['total']['p50']:.1f} / {c['total']['p99']:.1f}" for c in cells) + " |")
        L += [""] + [f"- {n}" for n in r.get("notes", [])] + [""]
    return L


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.under_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "stream_ser" / "assets" / "default.pt"),
                    help="model to stream (default: the bundled one)")
    ap.add_argument("--files", type=int, default=6, help="EMO-DB files streamed per cell (a fresh stream each)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.checkpoint, args.files)))
        return 0
    if not Path(args.checkpoint).is_file():
        ap.error(f"no checkpoint at {args.checkpoint}")
    import torch

    from bench.run import cpu_model, machine_name, write_markdown

    cells = {}
    for load in LOADS:
        for policy in POLICIES:
            c = run_cell(policy, load, args.checkpoint, args.files)
            cells[f"{policy}/{load}"] = c
            print(f"{policy:8s} {load:20s} total p50 {c['total']['p50']:7.2f} p99 {c['total']['p99']:7.2f} ms "
                  f"({c['hops']} hops)", flush=True)
    any_cell = next(iter(cells.values()))
    cpu = machine_name(torch.device("cpu"))
    result = {"name": cpu, "machine": f"{cpu_model()}, {os.cpu_count()} cores", "threads": any_cell["threads"],
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "model": f"{Path(args.checkpoint).name}, {any_cell['image_size']} px, {any_cell['precision']}",
              "files": args.files, "cells": cells, "notes": []}
    out = Path(args.out) / "load"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{cpu}.json"
    if path.is_file():  # keep notes written by hand
        result["notes"] = json.loads(path.read_text()).get("notes", [])
    path.write_text(json.dumps(result, indent=1))
    write_markdown(Path(args.out), Path(args.docs))
    print(f"wrote {path} and {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
