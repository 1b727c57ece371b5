"""Reports from ``results.json``: ``report.md`` with tables like the paper's, and ``confusion.png``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The paper's figures (UAR %, mean +- std over folds), Tables 1-6.
PAPER = {
    "emodb": {"proposed": (87.86, 6.92), "no_pretrain": (81.31, 4.89), "c1": (80.37, 6.17), "c2": (85.05, 8.75),
              "x1": (80.92, 6.38), "x3": (84.72, 7.76), "no_attention": (80.17, 6.57), "baseline": (78.01, 6.91)},
    "iemocap": {"proposed": (68.50, 6.20), "no_pretrain": (64.04, 5.24), "c1": (62.38, 4.58), "c2": (66.25, 6.65),
                "no_attention": (65.14, 4.94), "baseline": (58.23, 5.21)},
}


def _part_time(part: dict) -> str:
    """A merged part's wall time; a part resumed from fold-runs made earlier says so (its wall time is not theirs)."""
    wall, compute = part.get("wall_seconds"), part.get("compute_seconds")
    if compute and (wall or 0) < compute / 2:
        return f" (resumed: its fold-runs were made earlier, {compute / 60:.1f} min)"
    return f" ({wall / 60:.1f} min)" if wall else ""


def paper_reference(corpus: str, cfg: dict) -> tuple[str, tuple[float, float]] | None:
    """The paper's number for the setting closest to ``cfg`` (one changed factor at most)."""
    ref = PAPER.get(corpus)
    if not ref:
        return None
    changed = []
    if cfg.get("arch") == "cnn_lstm":
        return "Table 5/6 baseline 2-CNN-LSTM", ref["baseline"]
    if cfg.get("weights") == "none":
        changed.append(("Table 4 without pre-training", "no_pretrain"))
    if cfg.get("channels", 3) != 3:
        changed.append((f"Table 1 C={cfg['channels']}", f"c{cfg['channels']}"))
    n_speeds = len(cfg.get("speeds", [1, 2, 3, 4, 5]))
    if n_speeds != 5:
        changed.append((f"Table 2 x{n_speeds}", f"x{n_speeds}"))
    if not cfg.get("attention", True):
        changed.append(("Table 3 without attention", "no_attention"))
    if not changed:
        return "Tables 1-6 proposed", ref["proposed"]
    name, key = changed[0]
    if key not in ref:
        return None
    note = "" if len(changed) == 1 else f" (this run also differs in: {', '.join(c[0] for c in changed[1:])})"
    return name + note, ref[key]


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, title: str,
                   rows: list[str] | None = None) -> None:
    """Row-normalised confusion heat map. ``cm`` [R, K]: R true classes (``rows``, default ``labels``), K predicted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    rows = labels if rows is None else rows
    fig, ax = plt.subplots(figsize=(1.1 * len(labels) + 2.5, 1.0 * len(rows) + 2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(rows)):
        for j in range(len(labels)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.2f}"


def _mean_std(summary: dict, name: str) -> str:
    """``summary[name + "_mean"]`` ± ``summary[name + "_std"]`` in percent; "–" when the mean is absent."""
    if summary.get(f"{name}_mean") is None:
        return "–"
    return f"{100 * summary[f'{name}_mean']:.2f} ± {100 * summary[f'{name}_std']:.2f}"


def _by_corpus_lines(by_corpus: dict | None, labels: list[str]) -> list[str]:
    """A multi-corpus run's figures per corpus of the held-out speakers ([] for a single-corpus run)."""
    if not by_corpus:
        return []
    lines = ["## Per corpus of the held-out speakers", "",
             "Each fold's model is trained on every corpus; its test speakers come from one. What a user of each "
             "corpus's language and style can expect:", "",
             "| corpus | folds | UAR, mean ± std over its folds (%) | pooled UAR (%) | pooled WA (%) | chance (%) |",
             "|---|---|---|---|---|---|"]
    for c, g in by_corpus.items():
        chance = 100 / len(g["labels_present"]) if g["labels_present"] else float("nan")
        lines.append(f"| {c} | {g['n_folds']} | **{_mean_std(g, 'uar')}** | {_pct(g['pooled_uar'])} | "
                     f"{_pct(g['pooled_wa'])} | {chance:.1f} |")
    lines += ["", "Recall per class, pooled over each corpus's folds (%; – where the corpus has no such label):", "",
              "| corpus | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for c, g in by_corpus.items():
        lines.append(f"| {c} | " + " | ".join(_pct(g["recall"].get(lab)) for lab in labels) + " |")
    lines.append("")
    for c in by_corpus:
        lines += [f"![confusion, {c}](confusion-{c}.png)", ""]
    return lines


def render_markdown(results: dict) -> str:
    s = results["summary"]
    cfg = results["config"]
    labels = results["labels"]
    m = results["machine"]
    lines = [f"# {results['corpus']} — {'LOSO' if results['corpus'] != 'iemocap' else 'leave-one-session-out'} "
             f"report ({results['preset']} preset)", ""]
    if results.get("command"):
        lines += ["Command:", "", f"```\n{results['command']}\n```", ""]
    if results.get("parts"):  # ser-offline merge: fold subsets run side by side, records copied unchanged
        lines += [f"Merged from {len(results['parts'])} runs on parts of the folds (`ser-offline merge`; records "
                  "unchanged):", ""]
        lines += [f"- folds {', '.join(p['folds'])}: `{p['command']}`" + _part_time(p) for p in results["parts"]]
        lines += ["", "Each part's time is its own wall time; parts that ran side by side overlap, so the compute "
                  "time below is their sum, not the time the whole run took.", ""]
    failed = results.get("failed") or []
    if failed:  # never a silently missing fold: the figures below are over the fold-runs that finished
        lines += [f"**{len(failed)} fold-run(s) FAILED** and are left out of every figure below "
                  "(rerun the same command to retry them):", ""]
        lines += [f"- fold {f['fold']} run {f['run']} (seed {f['seed']}): {f['error']}" for f in failed] + [""]
    if not s:
        return "\n".join(lines + ["No fold-run finished: there is no result.", ""])
    if results.get("executor"):
        e = results["executor"]
        lines += [f"Fold-runs ran as Ray tasks: {e.get('summary', e)}.", ""]
    lines += [f"Machine: {m.get('cpu')} ({m.get('cores')} cores), device `{m.get('device')}`"
              + (f" ({m['gpu']})" if m.get("gpu") else "") + f", torch {m.get('torch')}, Python {m.get('python')}.",
              f"Compute time: {results['compute_seconds'] / 60:.1f} min over {s['n_fold_runs']} fold-runs "
              f"({s['n_folds']} folds x {cfg['runs']} runs)"
              + (f" + {results['pretrain']['seconds'] / 60:.1f} min pre-training the CNN on "
                 f"{results['pretrain']['corpus']} ({results['pretrain']['utterances']} utterances, once for all "
                 f"folds) = **{(results['compute_seconds'] + results['pretrain']['seconds']) / 60:.1f} min**"
                 if results.get("pretrain") else "") + ".", ""]
    if cfg.get("normalization") == "speaker":
        lines += ["Normalisation: **per speaker** (beyond the paper). Each speaker's statistics (mean and std per "
                  "channel and Mel bin) come from that speaker's own utterances only — the 3 s windows the model "
                  "sees, speech frames only (frame power above about -55 dBFS), never their labels — for the "
                  "training, validation and test speakers alike (a speed-perturbed copy of a training speaker "
                  "gets its own). The test speaker's statistics therefore use all of that speaker's unlabelled "
                  "test audio, as an enrolment recording would; live, the statistics are running ones per stream.",
                  ""]
    if cfg.get("weights") not in ("none", "imagenet", None):
        lines += [f"CNN initialised from `{cfg['weights']}` (pre-trained on another corpus; no speaker of this one).",
                  ""]
    lines += ["## Result", "",
              "| metric | this run | paper |", "|---|---|---|"]
    ref = paper_reference(results["corpus"], cfg)
    ref_txt = f"{ref[1][0]:.2f} ± {ref[1][1]:.2f} ({ref[0]})" if ref else "–"
    lines += [f"| UAR, mean ± std over folds (%) | **{_mean_std(s, 'uar')}** | {ref_txt} |",
              f"| pooled UAR (%) | {100 * s['pooled_uar']:.2f} | – |",
              f"| pooled WA (%) | {100 * s['pooled_wa']:.2f} | – |"]
    if s.get("ensemble_uar_mean") is not None:
        lines.append(f"| UAR of each fold's {cfg['runs']} runs as one ensemble (mean probabilities), mean ± std "
                     f"over folds (%) | {_mean_std(s, 'ensemble_uar')} | – |")
    if s.get("compact_uar_mean") is not None:
        lines.append(f"| UAR of the int8 compact models, mean over fold-runs (%) | {100 * s['compact_uar_mean']:.2f} "
                     f"(full precision: {100 * s['uar_run_mean']:.2f}) | – |")
    if s.get("int8_uar_mean") is not None:
        lines.append(f"| UAR with int8 CPU inference (compact model, {s.get('int8_inference') or 'int8 FC6/FC7'}), "
                     "mean over fold-runs (%) | "
                     f"{100 * s['int8_uar_mean']:.2f} (largest change on one fold: "
                     f"{100 * s['int8_max_abs_diff']:.2f} points) | – |")
    if s.get("int8_conv_uar_mean") is not None:
        lines.append("| UAR with int8 convolutions as well (activation ranges from each fold's training speakers"
                     + (f"; {s['int8_conv_inference']}" if s.get("int8_conv_inference") else "")
                     + f"), mean over fold-runs (%) | {100 * s['int8_conv_uar_mean']:.2f} (largest change on one fold: "
                     f"{100 * s['int8_conv_max_abs_diff']:.2f} points) | – |")
    if s.get("int8_conv2_uar_mean") is not None:
        lines.append("| UAR with the int8 convolutions' activations as two int8 levels (`--precision int8x2`), mean "
                     f"over fold-runs (%) | {100 * s['int8_conv2_uar_mean']:.2f} (largest change on one fold: "
                     f"{100 * s['int8_conv2_max_abs_diff']:.2f} points) | – |")
    if s.get("int8_conv_uar_mean") is None and s.get("int8_conv_fold_runs"):
        lines.append(f"| UAR with int8 convolutions as well | measured on {s['int8_conv_fold_runs']} of "
                     f"{s['n_fold_runs']} fold-runs only (the others ran before it existed): no mean; per fold-run "
                     "in results.json (`int8_conv_uar`) | – |")
    lines.append("")
    lines += _by_corpus_lines(s.get("by_corpus"), labels)
    lines += ["## UAR per fold (%)", "", "| test | validation | " + " | ".join(f"run {r}" for r in range(cfg["runs"]))
              + " | mean |", "|---|---|" + "---|" * (cfg["runs"] + 1)]
    by = {}
    for r in results["fold_runs"]:
        by.setdefault(r["fold"], {})[r["run"]] = r
    for f in results["folds"]:
        runs = by.get(f["name"], {})
        cells = [_pct(runs[r]["uar"]) if r in runs else "–" for r in range(cfg["runs"])]
        mean = s["fold_uar"].get(f["name"])
        lines.append(f"| {', '.join(f['test'])} | {', '.join(f['val'])} | " + " | ".join(cells) + f" | {_pct(mean)} |")
    lines += ["", "## Recall per class (pooled, %)", "", "| " + " | ".join(labels) + " |",
              "|" + "---|" * len(labels), "| " + " | ".join(_pct(s["recall"][lab]) for lab in labels) + " |", ""]
    cm = np.asarray(s["confusion"])
    lines += ["## Confusion matrix (pooled counts; rows true, columns predicted)", "", "![confusion](confusion.png)", "",
              "| true \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for i, lab in enumerate(labels):
        lines.append(f"| {lab} | " + " | ".join(str(int(x)) for x in cm[i]) + " |")
    lines += ["", "## Configuration", "", "| setting | value | paper |", "|---|---|---|"]
    paper_vals = {"channels": 3, "speeds": [0.8, 0.9, 1.0, 1.1, 1.2], "attention": True, "weights": "imagenet",
                  "segment_frames": 64, "normalization": "utterance (waveform)", "arch": "dcnn_blstmwa",
                  "image_size": 227, "stage1_epochs": 20, "stage1_batch": 128, "stage1_lr": 1e-4,
                  "stage2_epochs": 30, "stage2_batch": 16, "stage2_lr": 5e-6, "runs": 3}
    for k, v in cfg.items():
        lines.append(f"| {k} | {v} | {paper_vals.get(k, '')} |")
    if results.get("bad_files"):
        lines += ["", f"## Bad files skipped ({results['n_bad_files']})", ""]
        lines += [f"- `{k}`: {v}" for k, v in results["bad_files"].items() if "/" in k]
    return "\n".join(lines) + "\n"


def resummarize(run_dir: str | Path) -> dict:
    """Recompute ``results.json``'s summary from its fold-run records with this version's
    :func:`offline.metrics.summarize` and write it back; the records, command and timings are kept as they are.
    Returns the new summary."""
    from .metrics import summarize
    from .train import save_json
    path = Path(run_dir) / "results.json"
    results = json.loads(path.read_text())
    results["summary"] = summarize(results["fold_runs"], results["labels"]) if results.get("fold_runs") else {}
    save_json(path, results)
    return results["summary"]


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    s = results["summary"]
    if s:
        title = (f"{results['corpus']} {results['preset']}: UAR {100 * s['uar_mean']:.1f} ± "
                 f"{100 * s['uar_std']:.1f} % (pooled {100 * s['pooled_uar']:.1f} %)")
        plot_confusion(np.asarray(s["confusion"]), results["labels"], run_dir / "confusion.png", title)
        for c, g in (s.get("by_corpus") or {}).items():  # only the labels the corpus carries, as rows
            keep = [i for i, lab in enumerate(results["labels"]) if lab in g["labels_present"]]
            cm = np.asarray(g["confusion"])[keep]
            plot_confusion(cm, results["labels"], run_dir / f"confusion-{c}.png",
                           f"held-out {c} speakers: UAR {100 * g['uar_mean']:.1f} ± {100 * g['uar_std']:.1f} % "
                           f"over {g['n_folds']} folds (pooled {100 * g['pooled_uar']:.1f} %)",
                           rows=[results["labels"][i] for i in keep])
    out = run_dir / "report.md"
    out.write_text(render_markdown(results))
    return out


def compare(run_dirs: list[str | Path]) -> str:
    """One table over several runs (an ablation): what differs, and the UARs."""
    rows = [json.loads((Path(d) / "results.json").read_text()) for d in run_dirs]
    keys = sorted({k for r in rows for k, v in r["config"].items() if any(x["config"].get(k) != v for x in rows)})
    head = ["run"] + keys + ["UAR mean ± std (%)", "ensemble of the runs, UAR (%)", "pooled UAR (%)", "WA (%)",
                             "paper"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, r in zip(run_dirs, rows):
        s = r["summary"]
        ref = paper_reference(r["corpus"], r["config"])
        n_failed = len(r.get("failed") or [])
        figures = ([_mean_std(s, "uar") + (f" ({n_failed} fold-runs FAILED)" if n_failed else ""),
                    _mean_std(s, "ensemble_uar"),
                    f"{100 * s['pooled_uar']:.2f}", f"{100 * s['pooled_wa']:.2f}"] if s
                   else [f"no result ({n_failed} fold-runs FAILED)", "–", "–", "–"])
        out.append("| " + " | ".join([Path(d).name] + [str(r["config"].get(k)) for k in keys] + figures
                                     + [f"{ref[1][0]:.2f} ({ref[0]})" if ref else "–"]) + " |")
    return "\n".join(out) + "\n"
