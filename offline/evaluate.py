"""Speaker-independent evaluation: EMO-DB leave-one-speaker-out, IEMOCAP leave-one-session-out.

EMO-DB (paper section 3.2): for each test speaker, the next speaker (in sorted
order, wrapping) validates and the other 8 train. Corpora whose fold is a
session (IEMOCAP): the session's speakers are the test set, one speaker of the
next session validates, the rest of the other sessions train. N runs per fold
with different seeds. Finished fold-runs are saved one file each and never
recomputed, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stream_ser.model import CONV_INT8_KEY, compact_copy, quantize_for_cpu

from .corpora import Corpus
from .metrics import summarize
from .train import LOG_FLOOR, FeatureBank, TrainConfig, evaluate_model, save_json, train_model


@dataclass(frozen=True)
class Fold:
    name: str
    test: tuple[str, ...]
    val: tuple[str, ...]
    train: tuple[str, ...]


def make_folds(corpus: Corpus) -> list[Fold]:
    """One fold per test speaker (LOSO) when folds are speakers, else one per session."""
    speakers = corpus.speakers
    fold_names = corpus.folds
    spk_fold = {u.speaker: u.fold for u in corpus.utterances}
    folds = []
    for i, f in enumerate(fold_names):
        test = tuple(s for s in speakers if spk_fold[s] == f)
        nxt = fold_names[(i + 1) % len(fold_names)]
        val = (next(s for s in speakers if spk_fold[s] == nxt),)
        train = tuple(s for s in speakers if s not in test and s not in val)
        folds.append(Fold(f, test, val, train))
    return folds


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA device")
    device = torch.device(name)
    if device.type == "cuda":  # fixed input shapes: let cuDNN pick the fastest convolution once per shape
        torch.backends.cudnn.benchmark = True
    return device


FOLD_RUN_KEYS = ("fold", "run", "seed", "uar", "wa", "confusion", "predictions", "seconds")


# TrainConfig fields added after runs were committed, with the value that means "off": left out of the
# fingerprint when off, so that those runs can still be resumed and extended (--runs)
ADDED_LATER = {"silence_floor": 0.0, "onset_below_peak_db": 0.0, "log_floor": LOG_FLOOR}


def config_fingerprint(cfg: TrainConfig) -> str:
    """A short hash of everything in the training configuration (a resumed run must not mix configs).

    ``runs`` is left out (hashed as 1): a fold-run's training depends on its seed, not on how many runs
    there are, so re-running a finished folder with a larger ``--runs`` adds runs and reuses the ones
    made. A folder made before this rule keeps its fingerprint when it had one run."""
    d = dataclasses.replace(cfg, runs=1).to_dict()
    for key, off in ADDED_LATER.items():  # folders made before a lever existed keep their fingerprint
        if d.get(key) == off:
            d.pop(key)
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_fold_run(path: Path, fold: str, run: int, seed: int, fingerprint: str, log=print) -> dict | None:
    """A finished fold-run's record, or None when the file cannot be trusted (it is then set aside as
    ``*.damaged`` and the fold-run recomputed). A record made with another configuration is an error:
    resuming must not mix two recipes in one result."""
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in FOLD_RUN_KEYS if k not in rec]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if (rec["fold"], rec["run"]) != (fold, run):
            raise ValueError(f"it holds fold {rec['fold']!r} run {rec['run']} seed {rec['seed']}")
        if not (isinstance(rec["uar"], (int, float)) and 0 <= rec["uar"] <= 1):
            raise ValueError(f"UAR {rec['uar']!r} is not in [0, 1]")
        n_pred = len(rec["predictions"].get("pred", []))
        if n_pred != int(np.asarray(rec["confusion"]).sum()):
            raise ValueError(f"{n_pred} predictions but a confusion matrix of {int(np.asarray(rec['confusion']).sum())}")
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:  # JSONDecodeError is a ValueError
        damaged = path.with_suffix(".damaged")
        path.replace(damaged)
        log(f"warning: {path} is damaged ({str(e)[:120]}); set aside as {damaged.name}, recomputing that fold-run")
        return None
    if rec.get("config_fingerprint", fingerprint) != fingerprint:
        raise ValueError(f"{path} was made with another training configuration (fingerprint "
                         f"{rec['config_fingerprint']} vs {fingerprint} now); resume with the same flags, "
                         f"or use a new --out folder")
    if rec["seed"] != seed:  # same recipe, another seed: e.g. a `--folds` subset made before seeds were
        # tied to the fold's position among all folds. A valid record, but not this plan's fold-run.
        aside = path.with_suffix(f".seed{rec['seed']}")
        path.replace(aside)
        log(f"warning: {path} holds fold {fold} run {run} trained with seed {rec['seed']}, but this plan trains "
            f"it with seed {seed}; kept as {aside.name}, recomputing that fold-run")
        return None
    return rec


@dataclass(frozen=True)
class FoldRun:
    """One training of one fold: what a worker needs besides the corpus and the recipe."""
    fold: Fold
    run: int
    seed: int
    index: int  # position in the protocol's order (results are sorted by it, whatever order they finish in)

    @property
    def name(self) -> str:
        return f"{self.fold.name}_run{self.run}"


def plan_fold_runs(folds: list[Fold], cfg: TrainConfig, only: Sequence[str] | None = None,
                   only_runs: Sequence[int] | None = None) -> list[FoldRun]:
    """Every fold x run of ``folds`` (all the corpus's folds; ``only``: the names of a subset; ``only_runs``:
    a subset of the run indices 0 .. runs-1) with its seed.

    The seed is seed + 1000 * run + the fold's position among *all* the corpus's folds, so a fold-run
    gets the same seed wherever it runs and whichever subset of folds (``--folds``) was asked for:
    ``--folds 08`` trains exactly the fold-run that the full protocol trains for fold 08."""
    jobs: list[FoldRun] = []
    for fi, fold in enumerate(folds):
        if only is None or fold.name in only:
            for run in range(cfg.runs):
                if only_runs is not None and run not in only_runs:
                    continue
                jobs.append(FoldRun(fold, run, cfg.seed + 1000 * run + fi, len(jobs)))
    return jobs


def fold_run_record(corpus: Corpus, cfg: TrainConfig, bank: FeatureBank, job: FoldRun, device: torch.device,
                    fingerprint: str, log=print, progress=None) -> dict:
    """Train on the fold's training speakers, select on its validation speaker, test on its test speakers:
    the fold-run's record (metrics, predictions, timings). Runs in-process or as a Ray task alike."""
    fold = job.fold
    by_spk: dict[str, list] = {}
    for u in corpus.utterances:
        by_spk.setdefault(u.speaker, []).append(u)
    t0 = time.time()
    train_u = [u for s in fold.train for u in by_spk[s]]
    val_u = [u for s in fold.val for u in by_spk[s]]
    test_u = [u for s in fold.test for u in by_spk[s]]
    if not bank.log_mels([u.uid for u in test_u], 1.0)[0]:
        raise ValueError(f"fold {fold.name}: none of the test speakers' {len(test_u)} files has readable audio")
    readable_val = set(bank.log_mels([u.uid for u in val_u], 1.0)[0])
    if val_u and not readable_val:
        log(f"warning: fold {fold.name}: the validation speaker(s) {', '.join(fold.val)} have no readable audio; "
            "this fold-run trains without model selection (last epoch)")
    val_u = [u for u in val_u if u.uid in readable_val]
    model, info = train_model(bank, train_u, val_u, cfg, device, job.seed, log, progress)
    res = evaluate_model(model, bank, test_u, device, cfg.amp)
    small = compact_copy(model)
    compact = evaluate_model(small, bank, test_u, device, cfg.amp)
    # what `stream-ser live` runs on a CPU: the same compact model with int8 FC6/FC7 (and LSTM input projection)
    # inference (a checkpoint without activation ranges), and with int8 convolutions as well (one with them, as
    # `train` writes it)
    deployed = conv8 = conv8x2 = None
    int8_paths = {}  # what each int8 column ran (``meta["inference"]``): the fast path has grown over time
    if device.type == "cpu" and cfg.arch == "dcnn_blstmwa":
        fast = quantize_for_cpu(copy.deepcopy(small))
        int8_paths["int8_inference"] = fast.meta.get("inference")
        deployed = evaluate_model(fast, bank, test_u, device, False)
        if cfg.normalization != "utterance":  # ... and with int8 convolutions too, their activation ranges
            # measured on the fold's training speakers (as `ser-offline train` does), never on its test speakers
            from .int8_ranges import conv_int8_meta
            small.meta = dict(small.meta) | {CONV_INT8_KEY: conv_int8_meta(small, train_u, corpus.name, job.seed,
                                                                            log=lambda m: None)}
            two = quantize_for_cpu(copy.deepcopy(small), conv_levels=2)  # (the activations as two int8 levels)
            fast = quantize_for_cpu(small)
            int8_paths["int8_conv_inference"] = fast.meta.get("inference")
            conv8 = evaluate_model(fast, bank, test_u, device, False)
            if two.embedder.int8_convolutions:
                int8_paths["int8_conv2_inference"] = two.meta.get("inference")
                conv8x2 = evaluate_model(two, bank, test_u, device, False)
    rec = {"fold": fold.name, "run": job.run, "seed": job.seed, "test": list(fold.test), "val": list(fold.val),
           "train": list(fold.train), "uar": res["uar"], "wa": res["wa"], "confusion": res["confusion"],
           "compact_uar": compact["uar"], "compact_wa": compact["wa"],
           "int8_uar": deployed["uar"] if deployed else None,
           "int8_conv_uar": conv8["uar"] if conv8 else None,
           "int8_conv2_uar": conv8x2["uar"] if conv8x2 else None, **int8_paths,
           "predictions": {"uids": res["uids"], "true": res["true"], "pred": res["pred"], "probs": res["probs"]},
           "train_info": info, "seconds": time.time() - t0, "config_fingerprint": fingerprint}
    log(f"fold {fold.name} run {job.run}: test UAR {res['uar']:.4f} WA {res['wa']:.4f} "
        f"(int8 compact: UAR {compact['uar']:.4f}"
        + (f"; int8 inference: UAR {deployed['uar']:.4f}" if deployed else "")
        + (f"; with int8 convolutions: UAR {conv8['uar']:.4f}" if conv8 else "")
        + (f"; two-level: UAR {conv8x2['uar']:.4f}" if conv8x2 else "") + f") ({rec['seconds']:.0f} s)")
    return rec


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:500]


def run_protocol(corpus: Corpus, cfg: TrainConfig, out_dir: Path, device: torch.device, cache_dir: Path | None,
                 command: str = "", only_folds: list[str] | None = None, log=print, progress=None,
                 executor=None, only_runs: list[int] | None = None) -> dict:
    """Train and test every fold x run; write ``results.json`` (and one file per fold-run as it finishes).

    Resumable: a fold-run whose file exists is not recomputed. ``executor`` (an
    :class:`offline.cluster.RayExecutor`) runs the missing fold-runs as Ray tasks instead of one after
    another here; the records are the same. A fold-run that fails (after the executor's retry) is
    reported in ``results.json["failed"]`` with its error and left out of the summary, never silently.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = corpus.first_per_speaker(cfg.max_per_speaker)
    folds = make_folds(corpus)
    if only_folds:
        unknown = set(only_folds) - {f.name for f in folds}
        if unknown:
            raise SystemExit(f"error: unknown folds {sorted(unknown)}; this corpus has {[f.name for f in folds]}")
    if only_runs:
        bad = sorted(set(only_runs) - set(range(cfg.runs)))
        if bad:
            raise SystemExit(f"error: --only-runs {bad} outside the recipe's runs 0..{cfg.runs - 1} (raise --runs)")
    fingerprint = config_fingerprint(cfg)
    bank = FeatureBank(corpus, cfg.frontend_config(), cache_dir, device, log, progress)
    t_start = time.time()
    jobs = plan_fold_runs(folds, cfg, only_folds, only_runs)
    if only_folds:
        folds = [f for f in folds if f.name in only_folds]
    done: dict[int, dict] = {}
    failed: list[dict] = []
    outer = progress.add_task("folds x runs", total=len(jobs)) if progress else None
    todo = []
    for job in jobs:
        path = out_dir / "folds" / f"{job.name}.json"
        prev = load_fold_run(path, job.fold.name, job.run, job.seed, fingerprint, log) if path.is_file() else None
        if prev is not None:
            done[job.index] = prev
            log(f"fold {job.fold.name} run {job.run}: done before (UAR {prev['uar']:.4f}), not recomputed")
            if outer is not None:
                progress.advance(outer)
        else:
            todo.append(job)

    def finished(job: FoldRun, rec: dict | None, error: str | None) -> None:
        if rec is not None:
            save_json(out_dir / "folds" / f"{job.name}.json", rec)  # what a resumed run picks up
            done[job.index] = rec
        else:
            failed.append({"fold": job.fold.name, "run": job.run, "seed": job.seed, "error": error})
            log(f"fold {job.fold.name} run {job.run}: FAILED: {error}")
        if outer is not None:
            progress.advance(outer)

    if executor is not None and todo:
        for speed in cfg.speeds:  # fill the shared feature cache once, before the workers read it
            bank.log_mels([u.uid for u in corpus.utterances], speed)
        for job, rec, error in executor.run(corpus, cfg, cache_dir, fingerprint, todo, log):
            finished(job, rec, error)
    else:
        for job in todo:
            log(f"fold {job.fold.name} run {job.run} (seed {job.seed}): test {list(job.fold.test)} "
                f"val {list(job.fold.val)} train {list(job.fold.train)}")
            try:
                rec = fold_run_record(corpus, cfg, bank, job, device, fingerprint, log, progress)
            except (ValueError, RuntimeError) as e:  # one broken fold-run is reported, the others still run
                import traceback
                log(traceback.format_exc())
                finished(job, None, _error_line(e))
            else:
                finished(job, rec, None)
    fold_runs = [done[i] for i in sorted(done)]
    results = {
        "corpus": corpus.name, "labels": list(corpus.labels), "command": command, "preset": cfg.preset,
        "config": cfg.to_dict(), "frontend": cfg.frontend_config().to_dict(), "machine": machine_info(device),
        "folds": [dict(f.__dict__) for f in folds], "fold_runs": fold_runs,
        "failed": sorted(failed, key=lambda f: (f["fold"], f["run"])),
        "bad_files": dict(bank.bad), "n_bad_files": len({k for k in bank.bad if "/" in k}),
        "wall_seconds_this_session": time.time() - t_start,
        "compute_seconds": sum(r["seconds"] for r in fold_runs),
        "summary": summarize(fold_runs, corpus.labels) if fold_runs else {},
    }
    if executor is not None:
        results["executor"] = executor.describe()
    if (out_dir / "pretrain.json").is_file():  # the CNN pre-training this run started from (ser-offline --pretrain)
        results["pretrain"] = json.loads((out_dir / "pretrain.json").read_text())
    save_json(out_dir / "results.json", results)
    return results
