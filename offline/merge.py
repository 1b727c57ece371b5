"""One ``results.json`` from runs of one recipe on parts of the folds (``ser-offline merge``).

Without Ray, the way to use a GPU (or several machines) for the whole protocol is
to start one ``ser-offline loso ... --folds F --out DIR_F`` per fold side by side;
each writes its own run folder. This gathers their fold-run records into one run
folder with the ``results.json`` a single run over all those folds would have
written, and refuses to mix what must not be mixed: other corpora, other
recipes (configuration fingerprints), other pre-trainings, or two different
records of one fold-run. The records are copied unchanged (seeds included), so
the merged figures are exactly the parts' figures; nothing is retrained.
"""

from __future__ import annotations

import json
from pathlib import Path

from .evaluate import FOLD_RUN_KEYS
from .metrics import summarize
from .train import save_json


class MergeError(ValueError):
    """The parts cannot be one result (the message says which part and why)."""


def _load(part: Path) -> dict:
    path = part / "results.json"
    try:
        r = json.loads(path.read_text())
    except FileNotFoundError:
        raise MergeError(f"{path} not found (a part is a finished `ser-offline loso ... --out {part}` folder)")
    except (OSError, ValueError) as e:
        raise MergeError(f"{path} is unreadable ({e})") from None
    if not isinstance(r, dict) or not isinstance(r.get("fold_runs"), list):
        raise MergeError(f"{path} is not a loso results.json (no fold_runs)")
    for rec in r["fold_runs"]:
        missing = [k for k in FOLD_RUN_KEYS if k not in rec]
        if missing:
            raise MergeError(f"{path}: a fold-run record lacks {', '.join(missing)}")
    return r


def _fingerprints(r: dict) -> set:
    return {rec.get("config_fingerprint") for rec in r["fold_runs"]}


def merge_runs(parts: list[Path], out: Path, command: str = "") -> dict:
    """Write ``out/results.json`` (and ``out/folds/*.json``) from the parts' results; return it.

    Every part must be the same corpus, the same recipe (``config`` equal but for ``runs``, one
    configuration fingerprint) and the same pre-training. A fold-run present in two parts must be the
    same record (same seed and predictions); it is then kept once. Fold-runs that failed in one part and
    finished in another count as finished."""
    if not parts:
        raise MergeError("no parts given")
    results = [_load(p) for p in parts]
    base, base_path = results[0], parts[0]
    prints = set().union(*(_fingerprints(r) for r in results)) - {None}
    for p, r in zip(parts[1:], results[1:]):
        for key, what in (("corpus", "corpus"), ("labels", "label set"), ("frontend", "front-end")):
            if r.get(key) != base.get(key):
                raise MergeError(f"{p} is another {what} than {base_path}: {r.get(key)!r} vs {base.get(key)!r}")
        diff = sorted(k for k in set(r["config"]) | set(base["config"])  # runs may differ by part
                      if k != "runs" and r["config"].get(k) != base["config"].get(k))
        if diff:
            raise MergeError(f"{p} was trained with another recipe than {base_path} (differs in {', '.join(diff)})")
        if r.get("pretrain") != base.get("pretrain"):
            raise MergeError(f"{p} started from another CNN pre-training than {base_path}")
    if len(prints) > 1:
        raise MergeError(f"the parts' fold-runs carry {len(prints)} configuration fingerprints ({sorted(prints)}); "
                         "one result must be one recipe")
    runs: dict[tuple[str, int], tuple[dict, Path]] = {}
    for p, r in zip(parts, results):
        for rec in r["fold_runs"]:
            key = (rec["fold"], rec["run"])
            if key in runs:
                prev, where = runs[key]
                if (prev["seed"], prev["predictions"]) != (rec["seed"], rec["predictions"]):
                    raise MergeError(f"fold {key[0]} run {key[1]} is in {where} and in {p} with different results "
                                     f"(seeds {prev['seed']} and {rec['seed']}); keep one of them")
                continue
            runs[key] = (rec, p)
    folds: dict[str, dict] = {}
    for r in results:
        for f in r["folds"]:
            folds.setdefault(f["name"], f)
    names = sorted(folds)
    order = {name: i for i, name in enumerate(names)}
    fold_runs = [rec for rec, _ in sorted(runs.values(), key=lambda x: (order[x[0]["fold"]], x[0]["run"]))]
    failed = sorted({(f["fold"], f["run"]): f for r in results for f in (r.get("failed") or [])
                     if (f["fold"], f["run"]) not in runs}.values(), key=lambda f: (f["fold"], f["run"]))
    bad = {k: v for r in results for k, v in (r.get("bad_files") or {}).items()}
    runs_per_fold = max((rec["run"] for rec in fold_runs), default=0) + 1
    merged = {k: v for k, v in base.items() if k not in ("executor", "wall_seconds_this_session")}
    merged |= {
        "command": command,
        "config": dict(base["config"], runs=runs_per_fold),
        "folds": [folds[n] for n in names],
        "fold_runs": fold_runs,
        "failed": failed,
        "bad_files": bad, "n_bad_files": len({k for k in bad if "/" in k}),
        "compute_seconds": sum(rec["seconds"] for rec in fold_runs),
        "summary": summarize(fold_runs, base["labels"]) if fold_runs else {},
        "parts": [{"path": str(p), "command": r.get("command", ""), "machine": r.get("machine"),
                   "folds": sorted({rec["fold"] for rec in r["fold_runs"]}),
                   "wall_seconds": r.get("wall_seconds_this_session"),
                   "compute_seconds": sum(rec["seconds"] for rec in r["fold_runs"])} for p, r in zip(parts, results)],
    }
    out.mkdir(parents=True, exist_ok=True)
    for rec in fold_runs:
        save_json(out / "folds" / f"{rec['fold']}_run{rec['run']}.json", rec)
    save_json(out / "results.json", merged)
    return merged
