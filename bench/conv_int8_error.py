"""Where the int8 convolutions' error comes from, measured (issue 12's accuracy row asks every fold's UAR
within 0.5 points of fp32; the int8 convolutions change one answer on some folds, about 2 points there):

    python -m bench.conv_int8_error [--checkpoint bundled|PATH] [--files-per-speaker 4]

Calibration images from half of EMO-DB's speakers, test images from the other half, both what the live path
gives the CNN (``offline.int8_ranges.live_images``). On the test images:

1. The conv stack's error (relative L2 against float32) as ``stream-ser live`` runs it (the ranges
   :func:`stream_ser.model.calibrate_conv_int8` measures: the histogram observer with the engine's 7-bit
   activations), and alternatives: the same ranges with each activation as two int8 levels (``--precision
   int8x2``), ranges measured for 8 bits, the first convolution left in float32,
   every stored range scaled by a common factor, 8-bit ranges from the calibration extremes with a margin
   (no histogram), the channels of every activation brought to comparable ranges before quantising
   (SmoothQuant-style, folded into the weights: ReLU and max-pooling commute with a positive scale), and,
   for scale, the weights alone in int8 (activations float32).
2. Layer by layer, each quantised convolution fed the float32 activations quantised to its input's range:
   the input's quantisation error, the output's error, the share of outputs beyond the calibrated range
   (quant_max steps) and beyond what the 8-bit output holds (255 steps; the kernels clamp there, not at
   quant_max).
3. Whether the int8 kernels compute exactly what integer arithmetic gives: each quantised convolution against
   the same sums done in float64 from its quantised input and weights, requantised. A kernel whose 16-bit
   intermediate sums saturated would differ here by many steps.

4. What the conv stack costs (median ms) in float32, int8 and int8x2 (two int8 levels per activation),
   for 1, 8 and 64 segments on one and two threads.

Writes ``bench/results/precision/conv-int8-error-<machine>.json`` (and prints it).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.run import ROOT, cpu_model, machine_name, median_ms, rel_l2, save_json

SCALE_FACTORS = (0.8, 0.9, 1.25, 1.5)  # common factors tried on every stored range (1.0: as deployed)
MINMAX_MARGINS = (1.0, 1.25, 2.0)  # 8-bit ranges from the calibration extremes times these
EQUALISE_ALPHAS = (0.5, 1.0)  # channel equalisation: 0.5 balances activation and weight ranges, 1 activations only


def _stack(features: nn.Sequential, split: int, activation, calibration: torch.Tensor):
    """features[:split] in float32, the rest quantised with ``activation`` observers calibrated on
    ``calibration`` [N, 3, S, S] -> a callable images -> float maps."""
    from torch.ao.quantization import convert, get_default_qconfig, prepare
    from torch.ao.quantization.qconfig import QConfig

    from stream_ser.model import _QuantizedConvStack
    head = copy.deepcopy(features[:split]).eval()
    stack = _QuantizedConvStack(nn.Sequential(*list(features[split:])))
    stack.qconfig = QConfig(activation=activation, weight=get_default_qconfig(torch.backends.quantized.engine).weight)
    prepare(stack, inplace=True)
    with torch.no_grad():
        for i in range(0, len(calibration), 64):
            stack(head(calibration[i:i + 64]))
    convert(stack, inplace=True)
    return lambda x: stack(head(x))


def _deployed(model, calibration: torch.Tensor, factor: float = 1.0):
    """The conv stack ``load_checkpoint`` builds from ``calibrate_conv_int8``'s ranges (each scale times
    ``factor``, the input's zero point kept)."""
    from stream_ser.model import CONV_INT8_KEY, calibrate_conv_int8, quantize_convolutions
    cal = calibrate_conv_int8(model, calibration)
    cal["points"] = {k: [s * factor, z, lo, hi] for k, (s, z, lo, hi) in cal["points"].items()}
    probe = copy.deepcopy(model)
    probe.meta = dict(probe.meta) | {CONV_INT8_KEY: cal}
    if not quantize_convolutions(probe):
        raise SystemExit(f"this machine's quantised engine ({torch.backends.quantized.engine}) has no int8 convolutions")
    return probe.embedder.features, cal


def _two_level(model, cal: dict):
    """The conv stack ``--precision int8x2`` runs (each activation as two int8 levels) from the same ranges."""
    from stream_ser.model import CONV_INT8_KEY, quantize_convolutions
    probe = copy.deepcopy(model)
    probe.meta = dict(probe.meta) | {CONV_INT8_KEY: cal}
    if not quantize_convolutions(probe, levels=2):
        return None
    return probe.embedder.features


def speed(stacks: dict, images: torch.Tensor, batches=(1, 8, 64), repeats: int = 20) -> list[dict]:
    """Median ms of each conv stack on ``images[:n]`` on one and on two threads (after 3 warm-up calls)."""
    out, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for n in batches:
                x = images[:n]
                row = {"threads": threads, "segments": int(len(x))}
                with torch.no_grad():
                    for name, fn in stacks.items():
                        row[name] = round(median_ms(lambda: fn(x), repeats), 3)
                out.append(row)
    finally:
        torch.set_num_threads(before)
    return out


def _minmax(model, calibration: torch.Tensor, margin: float):
    """The deployed stack with 8-bit ranges (255 steps) from the calibration images' extremes times ``margin``:
    ReLU outputs [0, max], the image symmetric about 0 (zero point 128)."""
    from stream_ser.model import CONV_INT8_KEY, calibrate_conv_int8, quantize_convolutions
    cal = calibrate_conv_int8(model, calibration)
    features = model.embedder.features.float().eval()
    top = {"quant": float(calibration.abs().max())}
    with torch.no_grad():
        x = calibration
        for i, m in enumerate(features):
            x = m(x)
            if isinstance(m, nn.Conv2d):
                name = f"features.{i}"
            elif isinstance(m, nn.ReLU):
                top[name] = float(x.max())
    cal["points"] = {k: ([2 * top[k] * margin / 255, 128, 0, 255] if k == "quant" else [top[k] * margin / 255, 0, 0, 255])
                     for k in cal["points"]}
    probe = copy.deepcopy(model)
    probe.meta = dict(probe.meta) | {CONV_INT8_KEY: cal}
    quantize_convolutions(probe)
    return probe.embedder.features


def _equalised(model, calibration: torch.Tensor, alpha: float):
    """The deployed stack, calibrated anew, after every conv's input channels were scaled to comparable
    ranges: channel k of a conv's input times r_k = W_k^(1 - alpha) / A_k^alpha (A_k its largest value on the
    calibration images, W_k the largest weight reading it), the conv's weights for it divided by r_k and, for
    the image, the image multiplied by r_k before the stack; the conv before scales its output channel k by
    r_k (weights and bias; ReLU and max-pooling commute with it). -> (the quantised stack, its float32 twin,
    which computes what the original does to float rounding)."""
    from stream_ser.model import CONV_INT8_KEY, calibrate_conv_int8, quantize_convolutions
    probe = copy.deepcopy(model)
    f = probe.embedder.features.float().eval()
    convs = [i for i, m in enumerate(f) if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        inputs, x = [], calibration
        for i, m in enumerate(f):
            if i in convs:
                inputs.append(x)
            x = m(x)
        gain = None
        for j, ci in enumerate(convs):
            a = inputs[j].abs().amax(dim=(0, 2, 3))
            w = f[ci].weight.abs().amax(dim=(0, 2, 3)).clamp_min(1e-8)
            r = torch.ones_like(a)
            live = a > 0  # (a channel that never fires keeps its scale)
            r[live] = w[live] ** (1 - alpha) / a[live] ** alpha
            r[live] /= r[live][a[live].argmax()]  # the widest channel keeps its range
            f[ci].weight.div_(r.view(1, -1, 1, 1))
            if j == 0:
                gain = r.view(1, -1, 1, 1)
            else:
                f[convs[j - 1]].weight.mul_(r.view(-1, 1, 1, 1))
                f[convs[j - 1]].bias.mul_(r)
    equal = copy.deepcopy(f)
    probe.meta = dict(probe.meta) | {CONV_INT8_KEY: calibrate_conv_int8(probe, calibration * gain)}
    quantize_convolutions(probe)
    stack = probe.embedder.features
    return (lambda images: stack(images * gain)), (lambda images: equal(images * gain))


def _weights_only(features: nn.Sequential):
    """float32 convolutions with int8 weights (per output channel, symmetric, as the engine's observer):
    what the weights' quantisation alone costs."""
    from stream_ser.model import _quantize_rows
    f = copy.deepcopy(features).eval()
    with torch.no_grad():
        for m in f:
            if isinstance(m, nn.Conv2d):
                q, scale = _quantize_rows(m.weight.reshape(len(m.weight), -1))
                m.weight.copy_((q.float() * scale[:, None]).view_as(m.weight))
    return f


def layers(stack, features: nn.Sequential, images: torch.Tensor, cal: dict) -> list[dict]:
    """Per quantised convolution (fused with its ReLU): errors fed the float32 activations, clipping, and the
    kernel against float64 integer arithmetic."""
    with torch.no_grad():
        ref = [images]
        for m in features:
            ref.append(m(ref[-1]))
    scale, zp = float(stack.quant.scale), int(stack.quant.zero_point)
    out = []
    with torch.no_grad():
        for i, m in enumerate(stack.features):
            if not hasattr(m, "weight") or not callable(m.weight):
                continue
            xq = torch.quantize_per_tensor(ref[i], scale, zp, torch.quint8)
            y = m(xq)
            want = ref[i + 2]  # after the ReLU
            w, b = m.weight().dequantize().double(), m.bias()
            exact = F.relu(F.conv2d(xq.dequantize().double(), w, None if b is None else b.double(), m.stride, m.padding))
            exact_q = torch.quantize_per_tensor(exact.float(), m.scale, m.zero_point, torch.quint8)
            steps = (y.int_repr().int() - exact_q.int_repr().int()).abs()
            qmax = cal["points"][f"features.{i}"][3]
            out.append({"layer": f"features.{i}", "scale": float(m.scale),
                        "input_quantisation_rel_l2": rel_l2(xq.dequantize(), ref[i]),
                        "output_rel_l2": rel_l2(y.dequantize(), want),
                        "beyond_calibrated_range": float((want > qmax * m.scale).float().mean()),
                        "beyond_255_steps": float((want > 255 * m.scale).float().mean()),
                        "kernel_max_steps_from_exact": int(steps.max()),
                        "kernel_share_off_by_more_than_one_step": float((steps > 1).float().mean())})
            scale, zp = float(m.scale), int(m.zero_point)
    return out


def main(argv=None) -> int:
    from offline.corpora import load_corpus
    from offline.int8_ranges import live_images
    from stream_ser.assets import default_checkpoint
    from stream_ser.model import _to_three_channels, load_checkpoint

    ap = argparse.ArgumentParser(prog="python -m bench.conv_int8_error", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="bundled", help="bundled (default: the model stream-ser live runs) or a path")
    ap.add_argument("--emodb", default=os.environ.get("STREAM_SER_EMODB", str(ROOT.parent / "shared" / "data" / "emodb")))
    ap.add_argument("--files-per-speaker", type=int, default=4, help="files each speaker's recognizer hears")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per conv stack and batch (median)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "precision"))
    args = ap.parse_args(argv)
    path = default_checkpoint() if args.checkpoint == "bundled" else Path(args.checkpoint)
    if path is None or not Path(path).is_file():
        ap.error(f"no such checkpoint: {args.checkpoint}")
    warnings.simplefilter("ignore")  # torch 2.11 flags torch.ao.quantization for a future move to torchao
    torch.manual_seed(0)
    model = load_checkpoint(path, "cpu", precision="fp32")
    corpus = load_corpus("emodb", args.emodb)
    speakers = sorted({u.speaker for u in corpus.utterances})
    half = set(speakers[: len(speakers) // 2])
    cal_imgs, _ = live_images(model, [u for u in corpus.utterances if u.speaker in half],
                              args.files_per_speaker, seed=0, log=lambda m: None)
    test_imgs, _ = live_images(model, [u for u in corpus.utterances if u.speaker not in half],
                               args.files_per_speaker, seed=1, log=lambda m: None)
    cal_imgs, test_imgs = _to_three_channels(cal_imgs).float(), _to_three_channels(test_imgs).float()
    features = model.embedder.features.float().eval()
    with torch.no_grad():
        ref = features(test_imgs)
    from torch.ao.quantization.observer import HistogramObserver

    def err(fn) -> float:
        with torch.no_grad():
            return rel_l2(fn(test_imgs), ref)

    deployed, cal = _deployed(model, cal_imgs)
    conv1 = next(i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)) + 1  # after conv1, ReLU, pool
    stack = {"deployed (7-bit ranges, histogram)": err(deployed),
             "8-bit ranges (histogram, no reduce_range)": err(_stack(features, 0, HistogramObserver.with_args(
                 reduce_range=False, dtype=torch.quint8), cal_imgs)),
             "first convolution in float32": err(_stack(features, conv1, HistogramObserver.with_args(
                 reduce_range=True, dtype=torch.quint8), cal_imgs))}
    for f in SCALE_FACTORS:
        stack[f"every range x{f}"] = err(_deployed(model, cal_imgs, f)[0])
    for m in MINMAX_MARGINS:
        stack[f"8-bit ranges from the calibration extremes x{m}"] = err(_minmax(model, cal_imgs, m))
    same = {}  # the equalised stacks in float32 against the original: the rescaling itself changes nothing
    for a in EQUALISE_ALPHAS:
        quantised, twin = _equalised(model, cal_imgs, a)
        stack[f"channels equalised (alpha {a}), 7-bit ranges (histogram)"] = err(quantised)
        same[str(a)] = err(twin)
    two = _two_level(model, cal)
    if two is not None:
        stack["two int8 levels per activation (int8x2: the remainder of each step in 255ths)"] = err(two)
    stack["weights only in int8 (activations float32)"] = err(_weights_only(features))
    channels_last = copy.deepcopy(features).to(memory_format=torch.channels_last)
    timed = {"float32 (channels-last)": lambda x: channels_last(x.contiguous(memory_format=torch.channels_last)),
             "int8": deployed} | ({"int8x2": two} if two is not None else {})
    images = torch.cat([test_imgs] * (1 + 64 // len(test_imgs)))
    res = {"cpu": cpu_model(), "torch": torch.__version__, "engine": torch.backends.quantized.engine,
           "date": time.strftime("%Y-%m-%d %H:%M"), "checkpoint": str(path),
           "image_size": int(test_imgs.shape[-1]), "calibration_images": len(cal_imgs),
           "test_images": len(test_imgs), "calibration_speakers": sorted(half),
           "stack_rel_l2": stack, "equalised_float32_rel_l2": same,
           "layers": layers(deployed, features, test_imgs, cal),
           "conv_stack_ms": speed(timed, images, repeats=args.repeats)}
    save_json(res, args.out, f"conv-int8-error-{machine_name(torch.device('cpu'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
