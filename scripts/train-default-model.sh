#!/usr/bin/env bash
# Rebuilds the bundled model (stream_ser/assets/default.pt) with the project's own trainer:
# the `cpu` recipe with speed perturbation x3 (0.9, 1.0, 1.1), 5 stage-1 epochs and the level-robust
# front-end (log floor 1e-14, silence floor 2, onset 40 dB below the peak), on EMO-DB and RAVDESS
# together, every speaker (see docs/default-model.md).
# Usage: scripts/train-default-model.sh [EMODB_DIR] [RAVDESS_DIR] [extra ser-offline train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
emodb=${1:-../shared/data/emodb}
ravdess=${2:-../shared/data/ravdess}
shift 2 || shift $# || true
bash scripts/setup.sh
mkdir -p runs/default-level
.venv/bin/ser-offline train --corpus emodb+ravdess --data "$emodb,$ravdess" --preset cpu \
    --speeds 3 --stage1-epochs 5 --silence-floor 2 --onset-below-peak-db 40 --log-floor 1e-14 \
    --out runs/default-level/model.pt --compact "$@"
# (train also measures the int8 convolutions' activation ranges on the training speakers: meta["conv_int8"])
# the softmax temperature from held-out predictions of this recipe (docs/default-model.md); labels unchanged
.venv/bin/ser-offline calibrate docs/results/pilots/multicorpus-level-cpu-speeds3-folds-emodb03-ravdess21-24 \
    --checkpoint runs/default-level/model-int8.pt --out stream_ser/assets/default.pt
ls -l stream_ser/assets/default.pt
