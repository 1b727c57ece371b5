#!/bin/bash
# Run 10-fold EMO-DB LOSO recipes on one GPU as one `ser-offline loso --folds F` process per fold and
# recipe, all side by side, then merge each recipe's folds into one results.json (`ser-offline merge`).
#
#   scripts/gpu-folds.sh OUT_DIR DEADLINE_S NAME='FLAGS' [NAME='FLAGS' ...]
#   scripts/gpu-folds.sh runs/gpu 480 \
#       cpu227='--preset cpu --speeds 5 --image-size 227' \
#       paper='--preset paper --weights none --runs 3'
#
# Why processes and not `--workers` (Ray): where Ray is not installed (a GPU machine reached without a
# network, say). Each process is one fold's runs, the unit of work of a Ray task; the seeds are the full
# plan's (`--folds F` trains exactly the fold-runs a single run trains), so the merged result equals one
# run's. Processes still running at DEADLINE_S seconds are stopped; what finished is kept, and a rerun of
# the same command resumes (finished fold-runs are not recomputed). Every 20 s the finished fold-run
# records are packed into OUT_DIR/records.tgz, so a caller killed at its own time limit loses no record.
# Environment: DATA (EMO-DB folder, default ../shared/data/emodb), CACHE (log-Mel cache, default
# .cache/features), SER (the ser-offline command, default `python3 -m offline.cli`).
set -u
[ $# -ge 3 ] || { sed -n 2,17p "$0"; exit 2; }
OUT=$1; DEADLINE=$2; shift 2
DATA=${DATA:-../shared/data/emodb}; CACHE=${CACHE:-.cache/features}; SER=${SER:-python3 -m offline.cli}
FOLDS="03 08 09 10 11 12 13 14 15 16"
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
mkdir -p "$OUT"
case "$*" in *--pretrain*) echo "error: --pretrain recipes would pre-train once per fold process here;" \
    "pre-train once and pass the file with --weights PATH" >&2; exit 2;; esac
# fill the log-Mel cache once per recipe, before the processes read it (else all of them compute it)
for spec in "$@"; do
  ${PY:-python3} - "$DATA" "$CACHE" ${spec#*=} <<'PY' || exit 1
import sys
import torch
from offline.cli import OVERRIDE_KEYS, build_parser
from offline.corpora import load_corpus
from offline.train import FeatureBank, config_from_args
data, cache, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
args = build_parser().parse_args(["loso", "--corpus", "emodb", "--data", data, *flags, "--out", "unused"])
cfg = config_from_args(args.preset, {k: getattr(args, k, None) for k in OVERRIDE_KEYS})
corpus = load_corpus("emodb", data)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
bank = FeatureBank(corpus, cfg.frontend_config(), cache, dev, log=lambda m: print(m, file=sys.stderr))
for speed in cfg.speeds:
    bank.log_mels([u.uid for u in corpus.utterances], speed)
PY
done
echo "t=$(el) s: log-Mel cache ready"
pids=()
for spec in "$@"; do
  name=${spec%%=*}; flags=${spec#*=}
  for f in $FOLDS; do
    mkdir -p "$OUT/$name/parts/$f"
    left=$(( DEADLINE - $(el) ))
    timeout "$left" $SER loso --corpus emodb --data "$DATA" $flags --cache-dir "$CACHE" --folds "$f" \
        --out "$OUT/$name/parts/$f" > "$OUT/$name/parts/$f/stdout.txt" 2>&1 &
    pids+=($!)
  done
done
start=$(el)
pack() { (cd "$OUT" && tar czf records.tgz.tmp --exclude='*.png' */parts/*/folds */parts/*/run.log \
    */parts/*/results.json 2>/dev/null; mv -f records.tgz.tmp records.tgz); }
while [ -n "$(jobs -pr)" ]; do sleep 20; pack; done
wait "${pids[@]}"
echo "t=$(el) s: all fold processes ended after $(( $(el) - start )) s side by side" | tee "$OUT/wall.txt"
for spec in "$@"; do
  name=${spec%%=*}
  parts=$(ls -d "$OUT/$name"/parts/*/ 2>/dev/null | while read -r p; do [ -f "$p/results.json" ] && echo "$p"; done)
  n=$(echo "$parts" | grep -c .)
  echo "$name: $n of 10 folds finished"
  [ "$n" = 10 ] && $SER merge $parts --out "$OUT/$name"
done
pack
