#!/bin/bash
# The 16-fold protocol of the bundled model's recipe (issue 11; docs/default-model.md) on a lent GPU,
# resuming the committed partial run (docs/results/partial/multicorpus-level-cpu-speeds3: its finished
# folds are not recomputed). EMO-DB and RAVDESS together exceed one 64 MiB transfer, so it takes two
# device calls to one warm machine (gpu-setup.sh keeps what the first unpacked):
#
#   here:    echo /stream_ser/assets/default.pt >> .git/info/exclude          # the tree must stay small:
#            git rm -q --cached stream_ser/assets/default.pt                  # (undo: git reset -q HEAD ...)
#            rm -rf .gpu && bash scripts/gpu-pack.sh emodb                    # wheels 14 MB + EMO-DB 31 MB
#   call 1:  bash scripts/gpu-multicorpus.sh setup                            # carry .gpu
#   here:    rm -rf .gpu && bash scripts/gpu-pack.sh ravdess && rm -rf .gpu/wheels   # RAVDESS 54 MB alone
#   call 2:  bash scripts/gpu-multicorpus.sh run 540                          # carry .gpu; deadline in s
#
# `run` writes $OUT/gpu-multi (the device's $OUT, else runs/): level/parts/<fold>/ per fold, level/results.json
# once all 16 are done (`ser-offline merge`), and records.tgz every 20 s. A rerun resumes.
set -eu
cd "$(dirname "$0")/.."
. scripts/gpu-setup.sh
case ${1:-} in
  setup) exit 0;;
  run) DEADLINE=${2:-540};;
  *) sed -n 2,17p "$0"; exit 2;;
esac
[ "$(ls ../shared/data/emodb/wav 2>/dev/null | wc -l)" = 535 ] || { echo "error: EMO-DB not unpacked (call 1)" >&2; exit 1; }
[ -d ../shared/data/ravdess ] || { echo "error: RAVDESS not unpacked (carry it in this call)" >&2; exit 1; }
DEST=${OUT:-runs}/gpu-multi
for f in docs/results/partial/multicorpus-level-cpu-speeds3/folds/*.json; do
  fold=$(basename "$f" _run0.json)
  mkdir -p "$DEST/level/parts/$fold/folds" && cp "$f" "$DEST/level/parts/$fold/folds/"
done
CORPUS=emodb+ravdess DATA=../shared/data/emodb,../shared/data/ravdess bash scripts/gpu-folds.sh "$DEST" "$DEADLINE" \
    level='--preset cpu --speeds 3 --stage1-epochs 5 --silence-floor 2 --onset-below-peak-db 40 --log-floor 1e-14'
