#!/bin/bash
# Run LOSO recipes (EMO-DB's 10 folds by default) on one GPU as one `ser-offline loso --folds F` process per fold and
# recipe (one per fold-run, `--only-runs R`, where a recipe has `--runs N`), all side by side, then merge
# each recipe's parts into one results.json (`ser-offline merge`).
#
#   scripts/gpu-folds.sh OUT_DIR DEADLINE_S NAME='FLAGS' [NAME='FLAGS' ...]
#   scripts/gpu-folds.sh runs/gpu 480 \
#       cpu227='--preset cpu --speeds 5 --image-size 227' \
#       paper='--preset paper --weights none --runs 3'
#
# Why processes and not `--workers` (Ray): where Ray is not installed (a GPU machine reached without a
# network, say). Each process is one fold-run, the unit of work of a Ray task; the seeds are the full
# plan's (`--folds F --only-runs R` trains exactly the fold-run a single run trains), so the merged result equals one
# run's. Processes still running at DEADLINE_S seconds are stopped; what finished is kept, and a rerun of
# the same command resumes (finished fold-runs are not recomputed). Every 20 s the finished fold-run
# records are packed into OUT_DIR/records.tgz, so a caller killed at its own time limit loses no record.
# Environment: CORPUS (default emodb; e.g. emodb+ravdess), DATA (its folder(s), default
# ../shared/data/emodb; comma-separated for several), CACHE (log-Mel cache, default .cache/features),
# SER (the ser-offline command, default `python3 -m offline.cli`), FOLDS (default: all the corpus's folds),
# JOBS (fold-runs at a time, default: the CPU cores), MIN_LEFT (no fold-run starts with less time to the
# deadline, default 120 s).
# Measured on an H200 (16 cores): 30 fold-runs of the 227 px cpu recipe at once all took 390-450 s and ended
# together, so a deadline 15 s short lost 27 of them; at most JOBS at a time makes them finish in waves.
set -u
[ $# -ge 3 ] || { sed -n 2,22p "$0"; exit 2; }
OUT=$1; DEADLINE=$2; shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # many processes share the cores: a thread pool each would spin
CORPUS=${CORPUS:-emodb}; DATA=${DATA:-../shared/data/emodb}; CACHE=${CACHE:-.cache/features}
SER=${SER:-python3 -m offline.cli}
FOLDS=${FOLDS:-$(${PY:-python3} -c "import sys; from offline.corpora import load_corpus; from offline.evaluate import \
make_folds; print(' '.join(f.name for f in make_folds(load_corpus(sys.argv[1], sys.argv[2]))))" "$CORPUS" "$DATA")} \
    || { echo "error: cannot list the folds of $CORPUS in $DATA" >&2; exit 1; }
[ -n "$FOLDS" ] || { echo "error: no folds" >&2; exit 1; }
JOBS=${JOBS:-$(nproc)}; MIN_LEFT=${MIN_LEFT:-120}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
mkdir -p "$OUT"
case "$*" in *--pretrain*) echo "error: --pretrain recipes would pre-train once per fold process here;" \
    "pre-train once and pass the file with --weights PATH" >&2; exit 2;; esac
# fill the log-Mel cache once per recipe, before the processes read it (else all of them compute it)
for spec in "$@"; do
  ${PY:-python3} - "$CORPUS" "$DATA" "$CACHE" ${spec#*=} <<'PY' || exit 1
import sys
import torch
from offline.cli import OVERRIDE_KEYS, build_parser
from offline.corpora import load_corpus
from offline.train import FeatureBank, config_from_args
name, data, cache, flags = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
args = build_parser().parse_args(["loso", "--corpus", name, "--data", data, *flags, "--out", "unused"])
cfg = config_from_args(args.preset, {k: getattr(args, k, None) for k in OVERRIDE_KEYS})
corpus = load_corpus(name, data)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
bank = FeatureBank(corpus, cfg.frontend_config(), cache, dev, log=lambda m: print(m, file=sys.stderr))
for speed in cfg.speeds:
    bank.log_mels([u.uid for u in corpus.utterances], speed)
PY
done
echo "t=$(el) s: log-Mel cache ready"
pack() { (cd "$OUT" && tar czf records.tgz.tmp --exclude='*.png' */parts/*/folds */parts/*/run.log \
    */parts/*/results.json 2>/dev/null; mv -f records.tgz.tmp records.tgz); }
(while sleep 20; do pack; done) & PACKER=$!
start=$(el); skipped=0
for spec in "$@"; do
  name=${spec%%=*}; flags=${spec#*=}
  runs=$(echo " $flags " | sed -n 's/.* --runs \([0-9]*\) .*/\1/p'); runs=${runs:-1}
  case " $flags " in *" --only-runs "*) runs=1;; esac  # the caller chose the runs: one process per fold
  for f in $FOLDS; do
    for r in $(seq 0 $(( runs - 1 ))); do  # one process per fold-run: --only-runs keeps the full plan's seeds
      part=$f; sel=""; [ "$runs" -gt 1 ] && { part=$f-run$r; sel="--only-runs $r"; }
      while [ "$(jobs -pr | wc -l)" -gt "$JOBS" ]; do wait -n; done  # JOBS fold-runs (+ the packer) at a time
      left=$(( DEADLINE - $(el) ))
      [ "$left" -ge "$MIN_LEFT" ] || { skipped=$((skipped + 1)); continue; }
      mkdir -p "$OUT/$name/parts/$part"
      timeout "$left" $SER loso --corpus "$CORPUS" --data "$DATA" $flags $sel --cache-dir "$CACHE" --folds "$f" \
          --out "$OUT/$name/parts/$part" > "$OUT/$name/parts/$part/stdout.txt" 2>&1 &
    done
  done
done
while [ "$(jobs -pr | wc -l)" -gt 1 ]; do wait -n; done
kill $PACKER 2>/dev/null
[ "$skipped" = 0 ] || echo "$skipped fold-runs not started: under MIN_LEFT=$MIN_LEFT s to the deadline"
echo "t=$(el) s: all fold processes ended after $(( $(el) - start )) s side by side" | tee "$OUT/wall.txt"
for spec in "$@"; do
  name=${spec%%=*}
  parts=$(ls -d "$OUT/$name"/parts/*/ 2>/dev/null | while read -r p; do [ -f "$p/results.json" ] && echo "$p"; done)
  n=$(echo "$parts" | grep -c .); want=$(ls -d "$OUT/$name"/parts/*/ 2>/dev/null | wc -l)
  echo "$name: $n of $want fold processes finished"
  [ "$n" -gt 0 ] && [ "$n" = "$want" ] && $SER merge $parts --out "$OUT/$name"
done
pack
