"""Cross-corpus evaluation: train on one corpus, test on every speaker of another.

The model is trained on all speakers of the training corpus but one, which
validates (model selection); it is tested on every utterance of the test corpus
whose label the training corpus also has (the shared labels). UAR is the mean
recall over the shared labels; a prediction of a label the test corpus lacks
(EMO-DB's boredom on RAVDESS) counts as an error. With ``speaker``
normalisation the test is run twice: with each test speaker's own statistics
(adaptation on) and with the training corpus's statistics (adaptation off).
Finished runs are saved one file each and never recomputed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .corpora import Corpus
from .evaluate import machine_info
from .metrics import mean_std
from .train import FeatureBank, TrainConfig, build_split, embed_split, head_probs, save_json, train_model


def shared_labels(train: Corpus, test: Corpus) -> list[str]:
    shared = [lab for lab in test.labels if lab in train.labels]
    if not shared:
        raise ValueError(f"{train.name} and {test.name} share no label ({train.labels} / {test.labels})")
    return shared


@torch.no_grad()
def test_on(model, bank: FeatureBank, utts, device, per_speaker: bool) -> dict:
    """Predictions of ``model`` (its own label set) on ``utts`` of another corpus."""
    # per_speaker=False (adaptation off): every test speaker gets the training corpus's statistics
    split = build_split(bank, model, utts, (1.0,), device, per_speaker=per_speaker)
    probs = head_probs(model, embed_split(model, split, device, amp=False))
    by_uid = {u.uid: u for u in utts}
    uids = [u.split("@")[0] for u in split.uids]
    return {"uids": uids, "true": [by_uid[u].label for u in uids],
            "pred": [model.labels[i] for i in probs.argmax(-1).tolist()]}


def score(true: list[str], pred: list[str], shared: list[str], model_labels: list[str]) -> dict:
    """Confusion [shared x model labels], recall per shared label, UAR over them, WA."""
    cm = np.zeros((len(shared), len(model_labels)), dtype=np.int64)
    for t, p in zip(true, pred):
        cm[shared.index(t), model_labels.index(p)] += 1
    hits = np.array([cm[i, model_labels.index(lab)] for i, lab in enumerate(shared)])
    support = cm.sum(axis=1)
    rec = np.where(support > 0, hits / np.maximum(support, 1), np.nan)
    return {"confusion": cm.tolist(), "recall": {lab: float(r) for lab, r in zip(shared, rec)},
            "uar": float(np.nanmean(rec)), "wa": float(hits.sum() / max(cm.sum(), 1)),
            "n": int(cm.sum())}


def run_cross_corpus(train: Corpus, test: Corpus, cfg: TrainConfig, out_dir: Path, device: torch.device,
                     cache_dir: Path | None, command: str = "", val_speaker: str | None = None, log=print,
                     progress=None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = shared_labels(train, test)
    train = train.first_per_speaker(cfg.max_per_speaker)
    test = test.first_per_speaker(cfg.max_per_speaker)
    val_spk = val_speaker or train.speakers[-1]
    if val_spk not in train.speakers:
        raise ValueError(f"validation speaker {val_spk!r} is not in {train.name} ({train.speakers})")
    train_u = [u for u in train.utterances if u.speaker != val_spk]
    val_u = [u for u in train.utterances if u.speaker == val_spk]
    test_u = [u for u in test.utterances if u.label in shared]
    left_out = sorted({u.label for u in test.utterances} - set(shared))
    log(f"train on {train.name} ({len(train_u)} utterances, val speaker {val_spk}); test on {test.name}: "
        f"{len(test_u)} utterances of the shared labels {shared} (left out: {left_out})")
    bank_tr = FeatureBank(train, cfg.frontend_config(), cache_dir, device, log, progress)
    bank_te = FeatureBank(test, cfg.frontend_config(), cache_dir, device, log, progress)
    modes = ["adapted", "not_adapted"] if cfg.normalization == "speaker" else ["plain"]
    runs = []
    t_start = time.time()
    for run in range(cfg.runs):
        path = out_dir / "runs" / f"run{run}.json"
        if path.is_file():
            runs.append(json.loads(path.read_text()))
            log(f"run {run}: done before, not recomputed")
            continue
        seed = cfg.seed + 1000 * run
        t0 = time.time()
        model, info = train_model(bank_tr, train_u, val_u, cfg, device, seed, log, progress)
        rec = {"run": run, "seed": seed, "train_info": info}
        for mode in modes:
            p = test_on(model, bank_te, test_u, device, per_speaker=(mode != "not_adapted"))
            rec[mode] = {**score(p["true"], p["pred"], shared, list(model.labels)), "predictions": p}
            log(f"run {run} {mode}: UAR over {len(shared)} shared labels {100 * rec[mode]['uar']:.2f} % "
                f"(WA {100 * rec[mode]['wa']:.2f} %)")
        rec["seconds"] = time.time() - t0
        save_json(path, rec)
        runs.append(rec)
    summary = {}
    for mode in modes:
        m, s = mean_std(r[mode]["uar"] for r in runs)
        pooled = np.sum([np.asarray(r[mode]["confusion"]) for r in runs], axis=0)
        summary[mode] = {"uar_mean": m, "uar_std": s, "confusion": pooled.tolist(),
                         "recall": {lab: float(pooled[i, list(train.labels).index(lab)] / max(pooled[i].sum(), 1))
                                    for i, lab in enumerate(shared)}}
    results = {"kind": "cross_corpus", "train_corpus": train.name, "test_corpus": test.name,
               "train_labels": list(train.labels), "shared_labels": shared, "left_out_labels": left_out,
               "val_speaker": val_spk, "n_train": len(train_u), "n_val": len(val_u), "n_test": len(test_u),
               "command": command, "preset": cfg.preset, "config": cfg.to_dict(),
               "frontend": cfg.frontend_config().to_dict(), "machine": machine_info(device), "runs": runs,
               "summary": summary, "compute_seconds": sum(r["seconds"] for r in runs),
               "wall_seconds_this_session": time.time() - t_start,
               "bad_files": {**bank_tr.bad, **bank_te.bad}}
    save_json(out_dir / "results.json", results)
    return results


def render_cross_report(results: dict) -> str:
    shared, labels = results["shared_labels"], results["train_labels"]
    lines = [f"# Cross-corpus: train {results['train_corpus']} → test {results['test_corpus']}", "",
             "Command:", "", f"```\n{results['command']}\n```", "",
             f"Trained on {results['n_train']} utterances of {results['train_corpus']} (validation speaker "
             f"{results['val_speaker']}: {results['n_val']} utterances, model selection only); tested on all "
             f"{results['n_test']} utterances of {results['test_corpus']} whose label {results['train_corpus']} "
             f"also has: {', '.join(shared)} (left out: {', '.join(results['left_out_labels']) or 'none'}). "
             "UAR is over the shared labels; an answer outside them is an error.", "",
             f"Machine: {results['machine'].get('cpu')}, device `{results['machine'].get('device')}`; compute "
             f"{results['compute_seconds'] / 60:.1f} min.", "",
             "| test statistics | UAR (%) | " + " | ".join(f"recall {lab}" for lab in shared) + " |",
             "|---|---|" + "---|" * len(shared)]
    names = {"adapted": "each test speaker's own (adaptation on)",
             "not_adapted": f"{results['train_corpus']}'s (adaptation off)", "plain": "as trained"}
    for mode, s in results["summary"].items():
        lines.append(f"| {names[mode]} | **{100 * s['uar_mean']:.2f}**"
                     + (f" ± {100 * s['uar_std']:.2f}" if len(results["runs"]) > 1 else "") + " | "
                     + " | ".join(f"{100 * s['recall'][lab]:.1f}" for lab in shared) + " |")
    for mode, s in results["summary"].items():
        lines += ["", f"Confusion ({names[mode]}; rows true, columns predicted):", "",
                  "| true \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for i, lab in enumerate(shared):
            lines.append(f"| {lab} | " + " | ".join(str(int(x)) for x in s["confusion"][i]) + " |")
    return "\n".join(lines) + "\n"
