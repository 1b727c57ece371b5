"""The int8 convolutions' activation ranges of a checkpoint (``ser-offline int8-calibrate``).

On a CPU the live recognizer runs FC6/FC7 in int8 with dynamic quantisation; the
convolutions can run in int8 too, 2-3x faster, but static quantisation needs the
range of every activation fixed beforehand (:func:`stream_ser.model.calibrate_conv_int8`).
Those ranges are measured here on real speech, through the live path itself:
per speaker, a fresh :class:`~stream_ser.recognizer.StreamingRecognizer` (its own
speech detector and speaker statistics, as live) hears a few of their files, and
every image its CNN is given is kept. They are written into the checkpoint's
``meta["conv_int8"]``; ``load_checkpoint`` then runs the convolutions in int8 on
a CPU (checkpoints without them keep float32 convolutions).

The ranges are a property of the weights and of what speech looks like after
the front-end, not of any test speaker; `ser-offline train` measures them on its
own training speakers.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch

from stream_ser.audio import AudioError, load_audio
from stream_ser.model import (CONV_INT8_KEY, EmotionModel, calibrate_conv_int8, quantize_for_cpu, read_checkpoint,
                              write_payload)
from stream_ser.recognizer import StreamingRecognizer

from .corpora import Utterance

# --- constants ----------------------------------------------------------------------
FILES_PER_SPEAKER = 4  # files each speaker's recognizer hears
MAX_IMAGES = 2048  # CNN images kept for the observers (a random subset where more were made)


def live_images(model: EmotionModel, utterances: list[Utterance], files_per_speaker: int = FILES_PER_SPEAKER,
                seed: int = 0, max_images: int = MAX_IMAGES, log=print) -> tuple[torch.Tensor, dict]:
    """The CNN images [N, C, S, S] the live path makes of ``files_per_speaker`` random files of each speaker
    (float32 model, one recognizer per speaker hearing them in turn, each file flushed) -> (images, counts).
    Unreadable files are reported and skipped."""
    by_spk: dict[str, list[Utterance]] = {}
    for u in utterances:
        by_spk.setdefault(u.speaker, []).append(u)
    rng = random.Random(seed)
    kept: list[torch.Tensor] = []
    hook = model.embedder.register_forward_pre_hook(lambda _m, args: kept.append(args[0].detach().float().cpu()))
    files = bad = 0
    try:
        for spk in sorted(by_spk):
            rec = StreamingRecognizer(model, stream=spk)
            for u in rng.sample(by_spk[spk], min(files_per_speaker, len(by_spk[spk]))):
                try:
                    wave = load_audio(u.path).numpy()
                except AudioError as e:
                    log(f"warning: int8 calibration skips {u.uid}: {e}")
                    bad += 1
                    continue
                rec.push(wave)
                rec.flush()
                files += 1
    finally:
        hook.remove()
    if not kept:
        raise ValueError("no readable speech to calibrate the int8 convolutions on")
    images = torch.cat(kept)
    if len(images) > max_images:
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_images]]
    return images, {"files": files, "bad_files": bad, "speakers": len(by_spk)}


def conv_int8_meta(model: EmotionModel, utterances: list[Utterance], corpus: str, seed: int = 0,
                   log=print) -> dict:
    """``meta["conv_int8"]`` for a float32 model (CPU) from its training speakers' files, with how far the
    int8 features of those images are from float32's (relative L2, FC7 features)."""
    model = copy.deepcopy(model).cpu().eval()
    images, counts = live_images(model, utterances, seed=seed, log=log)
    cal = calibrate_conv_int8(model, images) | counts | {"corpus": corpus, "seed": seed}
    probe = copy.deepcopy(model)
    probe.meta = dict(probe.meta) | {CONV_INT8_KEY: cal}
    quantize_for_cpu(probe)
    with torch.no_grad():
        x = images[:256]
        ref, got = model.embed_images(x), probe.embed_images(x)
    cal["features_rel_l2"] = round(float((got - ref).norm() / ref.norm()), 5)
    log(f"int8 convolutions calibrated on {len(images)} live CNN images of {counts['files']} files "
        f"({counts['speakers']} speakers): FC7 features within {100 * cal['features_rel_l2']:.2f} % (relative L2) "
        "of float32, with int8 FC6/FC7 as well")
    return cal


def calibrate_int8_checkpoint(checkpoint: Path, utterances: list[Utterance], corpus: str, out: Path,
                              seed: int = 0, log=print, payload: dict | None = None) -> dict:
    """Measure the ranges on ``utterances`` (the checkpoint's training speakers') and write ``out``: the
    checkpoint's file with ``meta["conv_int8"]`` set and nothing else changed (weights copied as stored).
    ``payload``: the checkpoint's contents if already read (:func:`read_checkpoint`), so it is read once."""
    from stream_ser.model import load_checkpoint
    if payload is None:
        payload = read_checkpoint(checkpoint)  # CheckpointError when missing, unreadable or not a checkpoint
    model = load_checkpoint(checkpoint, "cpu", precision="fp32", payload=payload)
    model.meta.pop(CONV_INT8_KEY, None)
    cal = conv_int8_meta(model, utterances, corpus, seed, log)
    payload["meta"] = dict(payload["meta"] or {}) | {CONV_INT8_KEY: cal}
    write_payload(payload, out)
    return cal
