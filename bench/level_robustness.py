"""Does a model's answer depend on the input level? Every utterance of EMO-DB and RAVDESS scaled by a
gain (-30 ... +10 dB, clipped to [-1, 1]) through the offline evaluation (per-speaker statistics from the
scaled audio, ``offline.train.evaluate_model``), against the same at 0 dB.

    python -m bench.level_robustness [--checkpoint PATH] [--gains-db -10 -20 ...] [--moved] [--live | --live-only]
                                     [--out FILE]

A microphone's gain is the user's, not the speaker's emotion: an answer that moves with it is noise.
The per-speaker normalisation removes a constant level from the log-Mel, so what can still move the
answer is what compares the level with a fixed threshold: the speech onset that starts an utterance's
window (``ONSET_DBFS``), the speech gate of the speaker statistics (``SPEECH_GATE_LOG_POWER``) and the
log floor (with the zero padding of short utterances). ``--moved`` also runs each gain with the two
thresholds moved by the same gain, to show how much of the change they account for.
Training data for the bundled model, so only the agreement with 0 dB matters, not the UAR.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

GAP_NOISE_RMS = 10 ** (-70 / 20)  # a microphone's own noise between the utterances of the live streams


def main(argv=None) -> int:
    from stream_ser.assets import default_checkpoint
    from stream_ser.model import load_checkpoint

    ap = argparse.ArgumentParser(prog="python -m bench.level_robustness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the bundled model")
    ap.add_argument("--emodb", default="../shared/data/emodb")
    ap.add_argument("--ravdess", default="../shared/data/ravdess")
    ap.add_argument("--gains-db", type=float, nargs="+", default=[-10, -20, -30, 10])
    ap.add_argument("--moved", action="store_true", help="also with the onset and gate thresholds moved by the gain")
    ap.add_argument("--live", action="store_true",
                    help="also one live stream per corpus (a StreamingRecognizer over 20 utterances of one speaker "
                         "in a row, speech detection and running statistics as `stream-ser live` has them)")
    ap.add_argument("--live-only", action="store_true", help="only the live streams (no offline rows)")
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    path = args.checkpoint or default_checkpoint()
    model = load_checkpoint(path, "cpu")
    out = {"checkpoint": str(path), "date": time.strftime("%Y-%m-%d %H:%M")}
    if not args.live_only:
        out |= offline_agreement(model, args.emodb, args.ravdess, args.gains_db, args.moved)
    if args.live or args.live_only:
        out["live"] = live_agreement(model, args.emodb, args.ravdess, args.gains_db)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def offline_agreement(model, emodb: str, ravdess: str, gains_db: list[float], moved_too: bool) -> dict:
    """Every utterance of both corpora through the offline evaluation at each gain (and, with ``moved_too``,
    with the onset and gate thresholds moved by the gain) -> {"utterances", "rows"}: UAR and the share of
    answers equal to those at 0 dB, all and per corpus."""
    import offline.train as train
    import stream_ser.adaptation as adaptation
    import stream_ser.config as config
    from offline.corpora import load_corpus

    corpus = load_corpus("emodb+ravdess", f"{emodb},{ravdess}")
    which = np.array([u.uid.startswith("ravdess:") for u in corpus.utterances])  # combine() prefixes the corpus
    gate0, onset0, perturb0 = adaptation.SPEECH_GATE_LOG_POWER, config.ONSET_DBFS, train.speed_perturb

    def run(gain_db: float, moved: bool) -> tuple[dict, np.ndarray]:
        g = 10 ** (gain_db / 20)
        train.speed_perturb = lambda w, speed: (w * g).clamp(-1.0, 1.0)  # the bank's one hook on the waveform
        adaptation.SPEECH_GATE_LOG_POWER = gate0 + (gain_db / 10 * math.log(10) if moved else 0.0)
        config.ONSET_DBFS = onset0 + (gain_db if moved else 0.0)
        try:
            bank = train.FeatureBank(corpus, model.frontend_config, None, torch.device("cpu"), log=lambda m: None)
            t0 = time.perf_counter()
            r = train.evaluate_model(model, bank, corpus.utterances, torch.device("cpu"))
        finally:
            train.speed_perturb = perturb0
            adaptation.SPEECH_GATE_LOG_POWER, config.ONSET_DBFS = gate0, onset0
        return {"gain_db": gain_db, "thresholds_moved": moved, "uar": r["uar"],
                "seconds": time.perf_counter() - t0}, np.array(r["probs"]).argmax(-1)

    base, ref = run(0.0, False)
    rows = [base | {"same_answer": 1.0}]
    print(f"  0 dB: UAR {100 * base['uar']:.2f} %", flush=True)
    for db in gains_db:
        for moved in ((False, True) if moved_too else (False,)):
            row, pred = run(db, moved)
            same = pred == ref
            row |= {"same_answer": float(same.mean()), "same_answer_emodb": float(same[~which].mean()),
                    "same_answer_ravdess": float(same[which].mean())}
            rows.append(row)
            print(f"{db:+5.0f} dB{' (thresholds moved)' if moved else ''}: UAR {100 * row['uar']:.2f} %, same answer "
                  f"as at 0 dB {100 * row['same_answer']:.1f} % (EMO-DB {100 * row['same_answer_emodb']:.1f}, "
                  f"RAVDESS {100 * row['same_answer_ravdess']:.1f})", flush=True)
    return {"utterances": len(corpus.utterances), "rows": rows}


def live_agreement(model, emodb: str, ravdess: str, gains_db: list[float]) -> list[dict]:
    """The same question on the live path: one speaker's first 20 utterances as one stream, 0.5 s of a
    microphone's own noise (white, -70 dBFS at 0 dB) between them, pushed 320 ms at a time, at each gain
    (which scales the noise with the speech, as a microphone's gain does); the share of windows whose label
    (None: no speech) is the one given at 0 dB. (Until 2026-11-26 the gaps were digital zeros, which no
    microphone gives and which the log floor keeps at one level whatever the gain.)"""
    from stream_ser.audio import load_audio
    from stream_ser.recognizer import StreamingRecognizer

    rows = []
    for name, files in (("emodb speaker 03", sorted(Path(emodb).glob("wav/03*.wav"))[:20]),
                        ("ravdess actor 03", sorted(Path(ravdess).glob("Actor_03/*.flac"))[:20])):
        if not files:
            continue
        rng = np.random.default_rng(0)
        x = np.concatenate([np.concatenate([load_audio(f).numpy(), rng.normal(0, GAP_NOISE_RMS, 8000).astype(np.float32)])
                            for f in files])
        labels = {}
        for db in [0.0] + list(gains_db):
            rec = StreamingRecognizer(model)
            y = np.clip(x * 10 ** (db / 20), -1, 1).astype(np.float32)
            labels[db] = [p.label for i in range(0, len(y), 5120) for p in rec.push(y[i:i + 5120])]
        for db in gains_db:
            same = float(np.mean([a == b for a, b in zip(labels[0.0], labels[db])]))
            rows.append({"stream": name, "gain_db": db, "windows": len(labels[0.0]), "same_label": same})
            print(f"live, {name} ({len(files)} utterances, {len(labels[0.0])} windows), {db:+.0f} dB: "
                  f"same label as at 0 dB {100 * same:.1f} %", flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
