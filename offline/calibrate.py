"""Probability calibration of a checkpoint (``ser-offline calibrate``): one softmax temperature.

The models are over-confident: on held-out speakers the bundled recipe gives its
top class 79 % on average and is right 61 % of the time (two-fold pilot); the
EMO-DB recipe 92 % against 80 %. Dividing the logits by a temperature ``T`` fixes
how sure the probabilities are without changing which label is on top (so UAR,
WA and every label a user sees stay the same).

``T`` is fitted by minimising the negative log-likelihood of **held-out**
predictions of the checkpoint's recipe: the per-utterance probabilities that
``ser-offline loso`` stores for each fold's test speakers (``results.json``,
``fold_runs[*].predictions``). Those come from the fold models, not from the
checkpoint itself, which has seen every speaker; the temperature is a property
of the recipe, measured where it can be measured honestly. It is written into
the checkpoint's ``meta["calibration"]`` (with what it was fitted on and the
before/after figures); ``EmotionModel.probabilities`` applies it everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from stream_ser.model import read_checkpoint, write_payload

# --- constants ----------------------------------------------------------------------
T_MIN, T_MAX = 0.05, 20.0  # search range of the temperature
ECE_BINS = 10  # expected calibration error: confidence bins of 0.1
PROB_FLOOR = 1e-12  # stored probabilities are rounded to 5 decimals: some are 0


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, PROB_FLOOR, 1.0))


def at_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """Probabilities [N, K] (made at temperature 1) -> the same at temperature ``t``: softmax(log p / t),
    which equals softmax(logits / t) because log p differs from the logits by a constant per row."""
    z = _log_probs(probs) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    return float(-_log_probs(probs[np.arange(len(labels)), labels]).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |confidence - accuracy| averaged over confidence bins, weighted by size."""
    conf, hit = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(conf[m].mean() - hit[m].mean())
    return float(total)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [T_MIN, T_MAX] that minimises the NLL of ``labels`` under ``probs`` [N, K].

    The NLL is convex in 1/T, so a golden-section search on log T finds it; 60 steps shrink the range
    to well under 1e-6 of itself."""
    if len(labels) == 0:
        raise ValueError("no predictions to calibrate on")
    lp = torch.from_numpy(_log_probs(probs)).double()
    y = torch.from_numpy(np.asarray(labels)).long()

    def loss(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(lp / np.exp(log_t), y))

    a, b = np.log(T_MIN), np.log(T_MAX)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2))


def held_out_predictions(run_dirs: list[Path], labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """All fold-runs' test predictions of loso runs (probabilities [N, K], true label indices [N]).

    Every run must have the checkpoint's label set in the same order (else the columns would mean other
    emotions)."""
    probs, true = [], []
    for d in run_dirs:
        path = Path(d) / "results.json"
        try:
            r = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path} not found (give finished `ser-offline loso` run folders)") from None
        if tuple(r.get("labels", ())) != tuple(labels):
            raise ValueError(f"{path}: labels {r.get('labels')} differ from the checkpoint's {list(labels)}")
        recs = [fr for fr in r.get("fold_runs", []) if fr.get("predictions", {}).get("probs")]
        if not recs:
            raise ValueError(f"{path}: no fold-run with stored test probabilities")
        for fr in recs:
            p = np.asarray(fr["predictions"]["probs"], dtype=np.float64)
            probs.append(p / p.sum(axis=1, keepdims=True))
            true.append(np.asarray(fr["predictions"]["true"], dtype=np.int64))
    return np.concatenate(probs), np.concatenate(true)


def calibrate_checkpoint(checkpoint: Path, run_dirs: list[Path], out: Path) -> dict:
    """Fit the temperature on the runs' held-out predictions and write ``out``: the checkpoint's file with
    ``meta["calibration"]`` set and nothing else changed (weights are copied as stored, compact or not)."""
    payload = read_checkpoint(checkpoint)  # CheckpointError when missing, unreadable or not a checkpoint
    labels = tuple(payload["labels"])
    probs, true = held_out_predictions(run_dirs, labels)
    t = fit_temperature(probs, true)
    cal = at_temperature(probs, t)
    info = {"temperature": round(t, 4), "fitted_on": [str(d) for d in run_dirs], "n_predictions": int(len(true)),
            "nll_before": round(nll(probs, true), 4), "nll_after": round(nll(cal, true), 4),
            "ece_before": round(ece(probs, true), 4), "ece_after": round(ece(cal, true), 4),
            "mean_confidence_before": round(float(probs.max(1).mean()), 4),
            "mean_confidence_after": round(float(cal.max(1).mean()), 4),
            "accuracy": round(float((probs.argmax(1) == true).mean()), 4)}
    payload["meta"] = dict(payload["meta"] or {}) | {"calibration": info}
    write_payload(payload, out)
    return info
