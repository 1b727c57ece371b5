"""``ser-offline``: train a deployable model, run the speaker-independent protocol, write reports."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from stream_ser import allocator

from .augment import SPEED_SETS
from .corpora import CorpusError, load_corpus
from .train import PRESETS, config_from_args

EPILOG = r"""examples:
  ser-offline loso  --corpus emodb --data ../shared/data/emodb --preset quick --out runs/emodb-quick
  ser-offline loso  --corpus emodb --data ../shared/data/emodb --preset paper --weights none --out runs/paper
  ser-offline loso  --corpus emodb --data ../shared/data/emodb --preset paper --weights none --out runs/paper \
                    --workers 8 --gpus-per-run 0.125      (8 fold-runs at a time on one GPU, local Ray)
  ser-offline loso  ... --ray-address 10.0.0.1:6379       (an existing Ray cluster)
  ser-offline loso  ... --folds 08 --out runs/x/08        (one fold; start one per fold side by side, then:)
  ser-offline loso  ... --runs 3 --only-runs 1 --folds 08 --out runs/x/08-run1   (one fold-run; the same seed)
  ser-offline merge runs/x/?? --out runs/x                (one results.json from the per-fold folders)
  ser-offline train --corpus emodb --data ../shared/data/emodb --preset quick --out model.pt
  ser-offline cross --train emodb --train-data ../shared/data/emodb --test ravdess \
                    --test-data ../shared/data/ravdess --out runs/emodb-to-ravdess
  ser-offline int8-calibrate --checkpoint model.pt --corpus emodb --data ../shared/data/emodb --out model.pt
                                                   (int8 convolutions on a CPU; `train` does this itself)
  ser-offline report runs/emodb-quick              (rewrite report.md and confusion.png)
  ser-offline report runs/a runs/b --compare       (one ablation table)
"""


def _run_indices(text: str) -> list[int]:
    try:
        runs = sorted({int(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of run indices (e.g. 0,2)")
    if not runs or runs[0] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: run indices are 0, 1, ... (< --runs)")
    return runs


def _speeds(text: str) -> tuple[float, ...]:
    if text in ("1", "3", "5"):
        return SPEED_SETS[int(text)]
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("--speeds takes 1, 3, 5 or a list like 0.9,1.0,1.1") from None


CORPORA = ["emodb", "ravdess", "iemocap", "csv"]
# terms a model trained on each corpus inherits (shown in the model's meta, hello message and README)
LICENCES = {"emodb": "EMO-DB: free for research (Burkhardt et al. 2005)",
            "ravdess": "CC BY-NC-SA 4.0 (RAVDESS, Livingstone & Russo 2018): non-commercial, share-alike",
            "iemocap": "IEMOCAP licence (USC SAIL): research only"}
# what a corpus's speech is, for the model description users see
SPEECH = {"emodb": "German acted speech", "ravdess": "North American English acted speech",
          "iemocap": "English acted and improvised dialogue"}


def _corpus_kind(text: str) -> str:
    for part in text.split("+"):
        if part not in CORPORA:
            raise argparse.ArgumentTypeError(f"unknown corpus {part!r} (choose from {', '.join(CORPORA)}, "
                                             "or several joined by +)")
    return text


def _add_training_flags(p: argparse.ArgumentParser, corpus: bool = True) -> None:
    if corpus:
        p.add_argument("--corpus", type=_corpus_kind, required=True,
                       help=f"corpus kind: {', '.join(CORPORA)}; csv: --data is a manifest with "
                            "path,label,speaker[,fold]; several joined by + (emodb+ravdess, with --data DIR1,DIR2)")
        p.add_argument("--data", required=True, help="corpus folder (EMO-DB: the folder with wav/; RAVDESS: with "
                       "Actor_01..24; IEMOCAP: with Session1..5)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="paper: the paper's full settings; quick: CPU-feasible (default: quick)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--cache-dir", default=".cache/features", help="log-Mel cache, keyed by front-end config")
    g = p.add_argument_group("overrides (default: the preset's value)")
    g.add_argument("--stage1-epochs", type=int)
    g.add_argument("--stage1-batch", type=int)
    g.add_argument("--stage1-lr", type=float)
    g.add_argument("--stage2-epochs", type=int)
    g.add_argument("--stage2-batch", type=int)
    g.add_argument("--stage2-lr", type=float)
    g.add_argument("--speeds", type=_speeds, help="speed perturbation of training speakers: 1, 3, 5 or a list")
    g.add_argument("--runs", type=int, help="runs per fold (paper: 3); a larger value on a finished --out folder "
                   "adds runs and reuses those made")
    g.add_argument("--weights", help="AlexNet init: imagenet, none, or a .pth path")
    g.add_argument("--seed", type=int)
    g.add_argument("--image-size", type=int, help="CNN input size (paper: 227)")
    g.add_argument("--channels", type=int, choices=[1, 2, 3], help="log-Mel channels: static, +delta, +delta-delta")
    g.add_argument("--segment-frames", type=int, help="segment length in frames, 16-128 (shift is half)")
    g.add_argument("--normalization", choices=["segment", "corpus", "speaker", "utterance", "none"],
                   help="segment: each segment alone; corpus: training-set statistics; speaker: each speaker's own "
                        "statistics (unlabelled audio; live: running per stream); utterance: the paper's (offline only)")
    g.add_argument("--lr-schedule", choices=["constant", "onecycle"], help="learning-rate schedule of both stages")
    g.add_argument("--label-smoothing", type=float, help="label smoothing of both stages' loss (0: off)")
    g.add_argument("--mask-frames", type=int, help="stage 1 SpecAugment: one time mask of up to N frames (0: off)")
    g.add_argument("--mask-bins", type=int, help="stage 1 SpecAugment: one frequency mask of up to N Mel bins (0: off)")
    g.add_argument("--mixup", type=float, help="stage 1 mixup alpha (0: off)")
    g.add_argument("--silence-floor", type=float,
                   help="normalised log-Mel floor in per-bin standard deviations: lower values become -F and "
                        "their deltas 0, so silence looks alike at any level (speaker/corpus normalisation; 0: off)")
    g.add_argument("--onset-below-peak-db", type=float,
                   help="with --start-at-speech: the window starts at the first 10 ms frame within this many dB "
                        "of the utterance's loudest, whatever the recording level (0: frames above -45 dBFS)")
    g.add_argument("--log-floor", type=float,
                   help="Mel power floor before the log (default 1e-10). Lower (1e-14) keeps a quiet microphone's "
                        "pauses and high bands off the floor, so they move with the gain as speech does; use it "
                        "with --silence-floor, which keeps digital silence (zero padding) from extreme values")
    g.add_argument("--stage1-min-speech", type=float,
                   help="stage 1 learns only from segments with at least this fraction of speech frames (0: all)")
    g.add_argument("--start-at-speech", dest="start_at_speech", action="store_const", const=True,
                   help="each utterance's 3 s window starts 100 ms before its speech onset, not at sample 0")
    g.add_argument("--start-at-zero", dest="start_at_speech", action="store_const", const=False,
                   help="each utterance's 3 s window starts at sample 0 (the paper)")
    g.add_argument("--no-attention", dest="attention", action="store_const", const=False,
                   help="mean of the BLSTM outputs instead of attention (Table 3)")
    g.add_argument("--arch", choices=["dcnn_blstmwa", "cnn_lstm"], help="cnn_lstm: the paper's 2-CNN-LSTM baseline")
    g.add_argument("--no-class-weights", dest="class_weights", action="store_const", const=False)
    g.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="no mixed precision on CUDA")
    g.add_argument("--max-per-speaker", type=int, help="use at most N utterances per speaker (smoke runs)")


def _add_pretrain_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrain", type=_corpus_kind, default=None,
                   help="first pre-train the CNN on this other corpus (no speaker of the evaluated corpus), once, "
                        "into the output folder, and start from it (replaces --weights)")
    p.add_argument("--pretrain-data", default=None, help="folder of the --pretrain corpus")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="stage-1 epochs of the pre-training "
                   "(default: the preset's stage-1 epochs)")
    p.add_argument("--pretrain-speeds", type=_speeds, default=None,
                   help="speed perturbation of the pre-training corpus: 1, 3, 5 or a list (default: --speeds)")


OVERRIDE_KEYS = ["stage1_epochs", "stage1_batch", "stage1_lr", "stage2_epochs", "stage2_batch", "stage2_lr", "speeds",
                 "runs", "weights", "seed", "image_size", "channels", "segment_frames", "normalization", "attention",
                 "arch", "class_weights", "amp", "max_per_speaker", "lr_schedule", "label_smoothing",
                 "mask_frames", "mask_bins", "mixup", "start_at_speech", "stage1_min_speech",
                 "silence_floor", "onset_below_peak_db", "log_floor"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ser-offline", description="Train and evaluate the DCNN-BLSTMwA speech "
                                 "emotion model speaker-independently (Zhang et al. 2021).",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one deployable model on all speakers and write a checkpoint")
    _add_training_flags(t)
    t.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    t.add_argument("--val-speaker", action="append", default=[],
                   help="hold this speaker out for model selection (repeatable); default: train on all, last epoch")
    t.add_argument("--compact", action=argparse.BooleanOptionalAction, default=True,
                   help="also write the int8 compact copy (about a quarter of the size) next to --out")
    _add_pretrain_flags(t)
    lo = sub.add_parser("loso", help="leave-one-speaker-out (EMO-DB) / leave-one-session-out (IEMOCAP) evaluation")
    _add_training_flags(lo)
    lo.add_argument("--out", required=True, help="run folder for results.json, report.md, confusion.png, run.log")
    lo.add_argument("--folds", help="comma-separated subset of folds (test speakers or sessions)")
    lo.add_argument("--only-runs", type=_run_indices, default=None, metavar="R[,R]",
                    help="train only these run indices (0-based, < --runs), with the seeds the full plan gives "
                         "them: e.g. one process per fold and run side by side on a GPU, then `merge`")
    _add_pretrain_flags(lo)
    r = lo.add_argument_group("distributed fold-runs (Ray; pip install 'stream_ser[cluster]')",
                              "Without these flags fold-runs run one after another in this process and Ray is not "
                              "imported. Records are the same either way (same seeds, same metrics).")
    r.add_argument("--workers", type=int, default=None, metavar="N",
                   help="run N fold-runs at a time as tasks of a local Ray (with --ray-address: at most N at a time)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="run the fold-runs on an existing Ray cluster (e.g. 10.0.0.1:6379, or 'auto'); the corpus, "
                        "--cache-dir and any --weights/--pretrain file must be at the same paths on every node")
    r.add_argument("--cpus-per-run", type=int, default=None, metavar="C",
                   help="CPUs (and torch threads) per fold-run (default: cores / N locally, 1 on a cluster)")
    r.add_argument("--gpus-per-run", type=float, default=0.0, metavar="G",
                   help="GPUs per fold-run; fractions share one GPU (0.25: four fold-runs per GPU); > 0 trains on "
                        "CUDA in the tasks (default: 0, CPU)")
    x = sub.add_parser("cross", help="train on one corpus, test on another (on the labels they share)")
    x.add_argument("--train", choices=CORPORA, required=True, help="training corpus kind")
    x.add_argument("--train-data", required=True, help="training corpus folder (or CSV manifest)")
    x.add_argument("--test", choices=CORPORA, required=True, help="test corpus kind")
    x.add_argument("--test-data", required=True, help="test corpus folder (or CSV manifest)")
    x.add_argument("--val-speaker", default=None, help="training speaker held out for model selection "
                   "(default: the last one in sorted order)")
    x.add_argument("--out", required=True, help="run folder for results.json, report.md, run.log")
    _add_training_flags(x, corpus=False)
    m = sub.add_parser("merge", help="one results.json from loso runs of one recipe on parts of the folds "
                       "(e.g. one `--folds F` process per fold, side by side on a GPU)")
    m.add_argument("parts", nargs="+", help="finished loso run folders (each with results.json)")
    m.add_argument("--out", required=True, help="run folder for the merged results.json, report.md, confusion.png")
    c = sub.add_parser("calibrate", help="fit a softmax temperature on held-out loso predictions of a checkpoint's "
                       "recipe and write it into a copy of the checkpoint (labels never change, only confidences)")
    c.add_argument("runs", nargs="+", help="finished loso run folders of the checkpoint's recipe (their fold-runs' "
                   "test predictions are the held-out data)")
    c.add_argument("--checkpoint", required=True, help="checkpoint to calibrate (.pt, compact or not)")
    c.add_argument("--out", required=True, help="calibrated checkpoint to write (may be --checkpoint itself)")
    q = sub.add_parser("int8-calibrate", help="measure the activation ranges that let a checkpoint's convolutions "
                       "run in int8 on a CPU (2-3x faster), on its training speakers' speech, and write them into "
                       "a copy of the checkpoint (`ser-offline train` does this itself)")
    q.add_argument("--checkpoint", required=True, help="checkpoint (.pt, compact or not)")
    q.add_argument("--corpus", default="emodb", help="corpus kind of its training data (e.g. emodb+ravdess)")
    q.add_argument("--data", required=True, help="corpus folder(s), comma-separated for several")
    q.add_argument("--out", required=True, help="checkpoint to write (may be --checkpoint itself)")
    q.add_argument("--seed", type=int, default=0, help="which files of each speaker are heard")
    r = sub.add_parser("report", help="rewrite report.md and confusion.png from results.json")
    r.add_argument("runs", nargs="+", help="run folders")
    r.add_argument("--compare", action="store_true", help="print one comparison table over the runs")
    r.add_argument("--summarize", action="store_true",
                   help="first recompute results.json's summary from its fold-run records with this version's "
                        "metrics (e.g. the per-corpus figures of a multi-corpus run made before they existed); "
                        "the records themselves are not touched")
    return ap


@contextmanager
def _progress_and_log(log_path: Path | None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    fh = open(log_path, "a") if log_path else None

    def log(msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        console.log(msg)
        if fh:
            fh.write(f"{stamp} {msg}\n")
            fh.flush()

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=console, transient=False, disable=not console.is_terminal) as progress:
        try:
            yield log, progress
        finally:
            if fh:
                fh.close()


def pretrain_cnn(args, cfg, corpus, out: Path, device, log, progress):
    """Train the CNN on ``--pretrain`` once (resumable: kept as ``pretrain-<corpus>.pt`` in the run folder);
    return ``cfg`` with ``weights`` pointing at it. Refuses a pre-training corpus that shares a speaker."""
    import dataclasses
    import json as _json
    import time as _time

    from stream_ser.model import save_checkpoint

    from .train import FeatureBank, train_model

    if not args.pretrain_data:
        raise ValueError("--pretrain needs --pretrain-data (the folder of that corpus)")
    other = load_corpus(args.pretrain, args.pretrain_data)
    if other.name == corpus.name:
        raise ValueError("--pretrain must be another corpus than the one evaluated")
    path = out / f"pretrain-{other.name}.pt"
    pcfg = dataclasses.replace(cfg, weights="none", stage1_epochs=args.pretrain_epochs or cfg.stage1_epochs,
                               stage2_epochs=1, runs=1, max_per_speaker=cfg.max_per_speaker,
                               speeds=args.pretrain_speeds or cfg.speeds)
    if path.is_file():
        # resuming: the pre-training on disk must be the one these flags ask for, not another recipe's
        try:
            made = _json.loads((out / "pretrain.json").read_text())["config"]
        except (OSError, ValueError, KeyError):
            made = None
        if made != pcfg.to_dict():
            raise ValueError(f"{path} exists but was not made by this pre-training recipe (see {out / 'pretrain.json'}); "
                             "use the same --pretrain-* flags and preset, or a new --out folder")
        log(f"pre-trained CNN {path} exists (same recipe): not recomputed")
    else:
        other = other.first_per_speaker(cfg.max_per_speaker)
        log(f"pre-training the CNN on {other.name} ({len(other.utterances)} utterances, {len(other.speakers)} "
            f"speakers, {pcfg.stage1_epochs} epochs); every fold starts from it")
        t0 = _time.time()
        bank = FeatureBank(other, pcfg.frontend_config(), Path(args.cache_dir), device, log, progress)
        model, info = train_model(bank, other.utterances, [], pcfg, device, pcfg.seed, log, progress)
        model.meta = {"trained_on": f"{other.name} (pre-training)", "corpus": other.name,
                      "train_config": pcfg.to_dict(), "train_seconds": info["train_seconds"]}
        save_checkpoint(model.cpu(), path)
        (out / "pretrain.json").write_text(_json.dumps({"corpus": other.name, "data": str(args.pretrain_data),
                                                        "utterances": len(other.utterances),
                                                        "config": pcfg.to_dict(),
                                                        "seconds": _time.time() - t0}, indent=1))
        log(f"pre-training done in {(_time.time() - t0) / 60:.1f} min: {path}")
    return dataclasses.replace(cfg, weights=str(path))


def main(argv: list[str] | None = None) -> int:
    allocator.keep_freed_memory()  # a training step's activations reused, not faulted in anew (stream_ser.allocator)
    args = build_parser().parse_args(argv)
    if args.cmd == "report":
        from .report import compare, write_report
        for d in args.runs:
            if not (Path(d) / "results.json").is_file():
                print(f"error: {d}/results.json not found (run `ser-offline loso ... --out {d}` first)", file=sys.stderr)
                return 2
            if args.summarize:
                from .report import resummarize
                resummarize(d)
            print(f"wrote {write_report(d)}")
        if args.compare:
            print(compare(args.runs))
        return 0

    if args.cmd == "merge":
        from .merge import MergeError, merge_runs
        from .report import write_report
        command = "ser-offline " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        try:
            merged = merge_runs([Path(p) for p in args.parts], Path(args.out), command)
        except MergeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        s = merged["summary"]
        print(f"merged {len(args.parts)} parts: {s.get('n_fold_runs', 0)} fold-runs over {s.get('n_folds', 0)} folds"
              + (f", UAR {100 * s['uar_mean']:.2f} ± {100 * s['uar_std']:.2f} %" if s else "")
              + (f"; {len(merged['failed'])} fold-run(s) failed" if merged["failed"] else "")
              + f"; report: {write_report(args.out)}")
        return 0

    if args.cmd == "int8-calibrate":
        from stream_ser.model import CheckpointError, read_checkpoint

        from .int8_ranges import calibrate_int8_checkpoint
        try:
            corpus = load_corpus(args.corpus, args.data)
            payload = read_checkpoint(args.checkpoint)
            speakers = set((payload.get("meta") or {}).get("speakers") or corpus.speakers)
            utts = [u for u in corpus.utterances if u.speaker in speakers]
            if not utts:
                raise ValueError(f"none of the checkpoint's training speakers ({sorted(speakers)[:6]} ...) is in "
                                 f"{args.data}: give the corpus it was trained on")
            cal = calibrate_int8_checkpoint(Path(args.checkpoint), utts, corpus.name, Path(args.out), args.seed,
                                            payload=payload)
        except (CheckpointError, CorpusError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"int8 convolutions: {len(cal['points'])} activation ranges from {cal['images']} live CNN images of "
              f"{cal['files']} files ({cal['speakers']} speakers); FC7 features within "
              f"{100 * cal['features_rel_l2']:.2f} % of float32; wrote {args.out}")
        return 0

    if args.cmd == "calibrate":
        from stream_ser.model import CheckpointError

        from .calibrate import calibrate_checkpoint
        try:
            info = calibrate_checkpoint(Path(args.checkpoint), [Path(d) for d in args.runs], Path(args.out))
        except (CheckpointError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"temperature {info['temperature']:g} from {info['n_predictions']} held-out predictions: "
              f"NLL {info['nll_before']:.3f} -> {info['nll_after']:.3f}, ECE {info['ece_before']:.3f} -> "
              f"{info['ece_after']:.3f}, mean confidence {info['mean_confidence_before']:.3f} -> "
              f"{info['mean_confidence_after']:.3f} (accuracy {info['accuracy']:.3f}); wrote {args.out}")
        return 0

    from .evaluate import pick_device, run_protocol  # torch-heavy imports only when needed

    try:
        cfg = config_from_args(args.preset, {k: getattr(args, k, None) for k in OVERRIDE_KEYS})
        if args.cmd == "cross":
            corpus = load_corpus(args.train, args.train_data)
            test_corpus = load_corpus(args.test, args.test_data)
            from .cross_corpus import shared_labels
            shared_labels(corpus, test_corpus)
        else:
            corpus = load_corpus(args.corpus, args.data)
    except (CorpusError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    from stream_ser.model import WeightsError, alexnet_state_dict
    try:
        alexnet_state_dict(cfg.weights)  # fail now, with one clear line, not in the first fold
    except WeightsError as e:
        print(f"error: --weights: {e}", file=sys.stderr)
        return 2
    command = "ser-offline " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    if args.cmd == "cross":
        from .cross_corpus import render_cross_report, run_cross_corpus
        out.mkdir(parents=True, exist_ok=True)
        with _progress_and_log(out / "run.log") as (log, progress):
            log(f"{command}\npreset {cfg.preset}: {cfg.to_dict()} on {device}")
            try:
                results = run_cross_corpus(corpus, test_corpus, cfg, out, device, Path(args.cache_dir), command,
                                           args.val_speaker, log, progress)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        (out / "report.md").write_text(render_cross_report(results))
        for mode, s in results["summary"].items():
            print(f"{corpus.name} -> {test_corpus.name} ({mode}): UAR {100 * s['uar_mean']:.2f} % over "
                  f"{len(results['shared_labels'])} shared labels; report: {out / 'report.md'}")
        return 0
    if args.cmd == "loso":
        executor = None
        if args.workers is not None or args.ray_address:
            import os

            from .cluster import RayExecutor
            cpus = args.cpus_per_run or (1 if args.ray_address else max(1, (os.cpu_count() or 1) // (args.workers or 1)))
            try:
                executor = RayExecutor(args.workers, args.ray_address, cpus, args.gpus_per_run)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        elif args.gpus_per_run or args.cpus_per_run:
            print("error: --gpus-per-run/--cpus-per-run need --workers N or --ray-address ADDR", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        with _progress_and_log(out / "run.log") as (log, progress):
            if args.pretrain:
                try:
                    cfg = pretrain_cnn(args, cfg, corpus, out, device, log, progress)
                except (CorpusError, ValueError) as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
            log(f"{command}\npreset {cfg.preset}: {cfg.to_dict()} on {device}; {len(corpus.utterances)} utterances")
            try:
                results = run_protocol(corpus, cfg, out, device, Path(args.cache_dir), command,
                                       args.folds.split(",") if args.folds else None, log, progress,
                                       executor=executor, only_runs=args.only_runs)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            except RuntimeError as e:  # Ray missing or unreachable
                if executor is None:
                    raise
                print(f"error: {e}", file=sys.stderr)
                return 2
        from .report import write_report
        report = write_report(out)
        s = results["summary"]
        if s:
            print(f"UAR {100 * s['uar_mean']:.2f} ± {100 * s['uar_std']:.2f} % over {s['n_folds']} folds "
                  f"(pooled {100 * s['pooled_uar']:.2f} %, WA {100 * s['pooled_wa']:.2f} %); report: {report}")
        if results["failed"]:
            print(f"error: {len(results['failed'])} fold-run(s) failed (listed in {out / 'results.json'} and the "
                  f"report; rerun the same command to retry them): "
                  + "; ".join(f"{f['fold']} run {f['run']}: {f['error']}" for f in results["failed"]), file=sys.stderr)
            return 1
        return 0

    # train: one deployable model
    from .train import FeatureBank, train_model
    from stream_ser.model import save_checkpoint

    corpus = corpus.first_per_speaker(cfg.max_per_speaker)
    val_spk = set(args.val_speaker)
    unknown = val_spk - set(corpus.speakers)
    if unknown:
        print(f"error: --val-speaker {sorted(unknown)} not in the corpus ({corpus.speakers})", file=sys.stderr)
        return 2
    train_u = [u for u in corpus.utterances if u.speaker not in val_spk]
    val_u = [u for u in corpus.utterances if u.speaker in val_spk]
    log_path = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _progress_and_log(log_path) as (log, progress):
        if args.pretrain:
            try:
                cfg = pretrain_cnn(args, cfg, corpus, out.parent, device, log, progress)
            except (CorpusError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        log(f"{command}\npreset {cfg.preset}: {cfg.to_dict()} on {device}")
        bank = FeatureBank(corpus, cfg.frontend_config(), Path(args.cache_dir), device, log, progress)
        model, info = train_model(bank, train_u, val_u, cfg, device, cfg.seed, log, progress)
    pre = ""
    if args.pretrain:
        pre = f"; CNN pre-trained on {args.pretrain}"
    kinds = [SPEECH[n] for n in corpus.name.split("+") if n in SPEECH]
    speech = f"; {' and '.join(kinds)}" if kinds else ""
    licence = LICENCES.get(corpus.name.split("+")[0], "")
    for name in corpus.name.split("+")[1:] + ([args.pretrain] if args.pretrain else []):
        if LICENCES.get(name, "").startswith("CC BY-NC"):
            licence = LICENCES[name]
    model.meta = {
        "trained_on": f"{corpus.name} ({', '.join(corpus.speakers) if len(corpus.speakers) <= 12 else str(len(corpus.speakers)) + ' speakers'};"
                      f" {len(train_u)} utterances{speech}{pre})",
        "licence": licence, "pretrained_on": args.pretrain,
        "corpus": corpus.name, "speakers": sorted({u.speaker for u in train_u}), "val_speakers": sorted(val_spk),
        "train_config": cfg.to_dict(), "command": command, "train_seconds": info["train_seconds"],
        "bad_files": len([k for k in bank.bad if "/" in k]), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    model = model.cpu().eval()
    if cfg.arch == "dcnn_blstmwa" and cfg.normalization != "utterance":  # (live models with the AlexNet only)
        from .int8_ranges import conv_int8_meta
        from stream_ser.model import CONV_INT8_KEY
        model.meta[CONV_INT8_KEY] = conv_int8_meta(model, train_u, corpus.name, cfg.seed)
    save_checkpoint(model, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {info['train_seconds'] / 60:.1f} min; log {log_path}")
    if args.compact:
        small = out.with_name(out.stem + "-int8" + out.suffix)
        save_checkpoint(model, small, compact=True)
        print(f"wrote {small} ({small.stat().st_size / 1e6:.1f} MB, int8 + per-row scales)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
