"""What a faster inference path changes on the bundled model: fp32 against the CPU's int8 fast path
(``load_checkpoint``'s default on the CPU) or against the CNN in bf16 / fp16 (the GPU's half-precision
paths, run here on the CPU's kernels), on every utterance of the corpora it was trained on, with
per-speaker statistics, through the offline evaluation (``offline.train.evaluate_model``).

    python -m bench.int8_agreement [--precision int8|bf16|fp16] [--checkpoint PATH] [--emodb DIR] [--ravdess DIR]

Training data, so only the differences between the two columns matter (docs/default-model.md).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main(argv=None) -> int:
    from offline.corpora import load_corpus
    from offline.train import FeatureBank, evaluate_model
    from stream_ser.assets import default_checkpoint
    from stream_ser.model import load_checkpoint

    ap = argparse.ArgumentParser(prog="python -m bench.int8_agreement", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the bundled model")
    ap.add_argument("--emodb", default="../shared/data/emodb")
    ap.add_argument("--ravdess", default="../shared/data/ravdess", help="'' leaves RAVDESS out (EMO-DB alone)")
    ap.add_argument("--cache-dir", default=".cache/features")
    ap.add_argument("--precision", choices=("int8", "int8x2", "bf16", "fp16"), default="int8",
                    help="the path compared with fp32 (default: int8, the CPU's fast path)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 / fp16 on the GPU's own kernels)")
    args = ap.parse_args(argv)
    if args.precision in ("int8", "int8x2") and args.device != "cpu":
        ap.error(f"{args.precision} is a CPU path")
    device = torch.device(args.device)
    path = args.checkpoint or default_checkpoint()
    fp32 = load_checkpoint(path, device, precision="fp32")
    fast = load_checkpoint(path, device, precision=args.precision)
    corpus = (load_corpus("emodb+ravdess", f"{args.emodb},{args.ravdess}") if args.ravdess
              else load_corpus("emodb", args.emodb))
    bank = FeatureBank(corpus, fp32.frontend_config, args.cache_dir, device, log=lambda m: None)
    out = {"checkpoint": str(path), "precision": args.precision, "device": str(device),
           "inference": fast.meta.get("inference"), "corpora": corpus.name, "utterances": len(corpus.utterances)}
    res = {}
    other = "cpu_fast_path" if args.precision == "int8" else args.precision
    for name, model in (("fp32", fp32), (other, fast)):
        t0 = time.perf_counter()
        res[name] = evaluate_model(model, bank, corpus.utterances, device)
        out[name] = {"uar": res[name]["uar"], "wa": res[name]["wa"], "seconds": time.perf_counter() - t0}
    a, b = np.array(res["fp32"]["probs"]), np.array(res[other]["probs"])
    out["answers_equal"] = float((a.argmax(-1) == b.argmax(-1)).mean())
    out["answers_differ"] = int((a.argmax(-1) != b.argmax(-1)).sum())
    out["max_abs_prob_diff"] = float(np.abs(a - b).max())
    out["mean_abs_prob_diff"] = float(np.abs(a - b).mean())
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
