"""Confusion matrices, UAR (the paper's metric), WA, per-class recall, fold summaries."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts [K, K]: rows are true classes, columns predicted."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        cm[int(t), int(p)] += 1
    return cm


def recall_per_class(cm: np.ndarray) -> np.ndarray:
    """Recall of each class; NaN for a class with no true samples (it is left out of UAR)."""
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def uar(cm: np.ndarray) -> float:
    """Unweighted average recall: the mean of the per-class recalls of the classes present."""
    r = recall_per_class(cm)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def wa(cm: np.ndarray) -> float:
    """Weighted accuracy (overall accuracy): correct / all."""
    cm = np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _fold_uar_and_pooled(fold_runs: list[dict], n_classes: int) -> tuple[dict[str, float], np.ndarray]:
    """Each fold's UAR (the mean over its runs), by fold name in order, and the confusion [K, K] summed over
    every fold-run."""
    by_fold: dict[str, list[float]] = {}
    pooled = np.zeros((n_classes, n_classes), dtype=np.int64)
    for r in fold_runs:
        by_fold.setdefault(r["fold"], []).append(r["uar"])
        pooled += np.asarray(r["confusion"], dtype=np.int64)
    return {f: float(np.mean(v)) for f, v in sorted(by_fold.items())}, pooled


def _recall_by_label(cm: np.ndarray, labels: Sequence[str]) -> dict[str, float | None]:
    """Recall per class by label; None for a class with no true samples."""
    return {lab: (None if math.isnan(x) else float(x)) for lab, x in zip(labels, recall_per_class(cm))}


def _one_value(fold_runs: list[dict], key: str):
    """The value every fold-run gives for ``key``; None where some give none or they differ."""
    values = {r.get(key) for r in fold_runs}
    return values.pop() if len(values) == 1 else None


def summarize(fold_runs: list[dict], labels: Sequence[str]) -> dict:
    """The paper's protocol: each fold's UAR is the mean over its runs; report mean +- std over folds.

    Also pooled figures over every test prediction of every run (confusion summed).
    """
    K = len(labels)
    fold_uar, pooled = _fold_uar_and_pooled(fold_runs, K)
    compact = [r["compact_uar"] for r in fold_runs if r.get("compact_uar") is not None]
    conv8 = [r for r in fold_runs if r.get("int8_conv_uar") is not None]

    def against_fp32(key: str, name: str) -> dict:
        """{name}_uar_mean and {name}_max_abs_diff of the fold-runs' ``key`` UAR against their fp32 UAR: a
        mean only over every fold-run (None where some fold-runs lack it)."""
        pairs = [(r[key], r["uar"]) for r in fold_runs if r.get(key) is not None]
        every = len(pairs) == len(fold_runs) and bool(pairs)
        return {f"{name}_uar_mean": float(np.mean([a for a, _ in pairs])) if every else None,
                f"{name}_max_abs_diff": float(max(abs(a - b) for a, b in pairs)) if every else None}

    m, s = mean_std(fold_uar.values())
    ens = ensemble_fold_uar(fold_runs, K)
    em, es = mean_std(ens.values()) if ens else (None, None)
    return {
        # the runs of a fold as one model (their test probabilities averaged); only with >= 2 runs per fold
        "ensemble_fold_uar": ens or None, "ensemble_uar_mean": em, "ensemble_uar_std": es,
        "uar_mean": m, "uar_std": s, "fold_uar": fold_uar,
        "pooled_uar": uar(pooled), "pooled_wa": wa(pooled),
        "recall": _recall_by_label(pooled, labels),
        "confusion": pooled.tolist(), "n_folds": len(fold_uar), "n_fold_runs": len(fold_runs),
        # the int8 compact copy of each fold's model, on the same test speaker (mean over fold-runs)
        "compact_uar_mean": float(np.mean(compact)) if len(compact) == len(fold_runs) and compact else None,
        # ... run with int8 FC6/FC7 inference, as `stream-ser live` runs it on a CPU
        **against_fp32("int8_uar", "int8"),
        # ... and with int8 convolutions as well, calibrated on the fold's training speakers (since 2026-11-26)
        **against_fp32("int8_conv_uar", "int8_conv"),
        "int8_conv_fold_runs": len(conv8),
        # ... with their activations as two int8 levels (precision "int8x2", since 2026-11-27)
        **against_fp32("int8_conv2_uar", "int8_conv2"),
        # what those two columns ran, where the fold-runs say (since 2026-11-27) and all say the same
        "int8_inference": _one_value(fold_runs, "int8_inference"),
        "int8_conv_inference": _one_value(fold_runs, "int8_conv_inference"),
        "int8_conv2_inference": _one_value(fold_runs, "int8_conv2_inference"),
        "uar_run_mean": float(np.mean([r["uar"] for r in fold_runs])) if fold_runs else float("nan"),
        "by_corpus": summarize_by_corpus(fold_runs, labels),
    }


def fold_corpus(fold: str) -> str | None:
    """The corpus of a multi-corpus fold name ("emodb:03" -> "emodb"); None for a single-corpus fold ("03")."""
    return fold.split(":", 1)[0] if ":" in fold else None


def summarize_by_corpus(fold_runs: list[dict], labels: Sequence[str]) -> dict | None:
    """A multi-corpus run's figures per corpus of its held-out speakers, None for a single-corpus run.

    One model per fold is trained on every corpus, but a fold's test speakers come from one corpus, and a
    mean over folds of different corpora (one German speaker, four English actors) answers no user's
    question. Per corpus: UAR mean +- std over its folds, pooled confusion, UAR and recall per class (None for
    a label the corpus never carries)."""
    groups: dict[str, list[dict]] = {}
    for r in fold_runs:
        c = fold_corpus(r["fold"])
        if c is None:
            return None
        groups.setdefault(c, []).append(r)
    if not groups:
        return None
    out = {}
    for c, runs in sorted(groups.items()):
        fold_uar, pooled = _fold_uar_and_pooled(runs, len(labels))
        m, s = mean_std(fold_uar.values())
        present = [lab for lab, n in zip(labels, pooled.sum(axis=1)) if n > 0]
        out[c] = {"uar_mean": m, "uar_std": s, "n_folds": len(fold_uar), "n_fold_runs": len(runs),
                  "pooled_uar": uar(pooled), "pooled_wa": wa(pooled), "labels_present": present,
                  "recall": _recall_by_label(pooled, labels), "confusion": pooled.tolist()}
    return out


def ensemble_fold_uar(fold_runs: list[dict], n_classes: int) -> dict[str, float]:
    """Per fold with at least two runs that kept their test probabilities: the UAR of the mean of the runs'
    probabilities (each utterance by id). {} when no fold qualifies."""
    by_fold: dict[str, list[dict]] = {}
    for r in fold_runs:
        by_fold.setdefault(r["fold"], []).append(r)
    out = {}
    for fold, runs in sorted(by_fold.items()):
        if len(runs) < 2 or not all("probs" in r.get("predictions", {}) for r in runs):
            continue
        acc: dict[str, np.ndarray] = {}
        truth: dict[str, int] = {}
        for r in runs:
            p = r["predictions"]
            for uid, t, pr in zip(p["uids"], p["true"], p["probs"]):
                acc[uid] = acc.get(uid, 0) + np.asarray(pr, dtype=np.float64)
                truth[uid] = t
        uids = sorted(acc)
        cm = confusion_matrix([truth[u] for u in uids], [int(np.argmax(acc[u])) for u in uids], n_classes)
        out[fold] = uar(cm)
    return out
