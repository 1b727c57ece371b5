#!/usr/bin/env bash
# Rebuilds the bundled model (stream_ser/assets/default-emodb.pt) with the project's own trainer:
# the `cpu` recipe, its CNN pre-trained on RAVDESS, then trained on all of EMO-DB (see docs/default-model.md).
# Usage: scripts/train-default-model.sh [EMODB_DIR] [RAVDESS_DIR] [extra ser-offline train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
emodb=${1:-../shared/data/emodb}
ravdess=${2:-../shared/data/ravdess}
shift 2 || shift $# || true
bash scripts/setup.sh
mkdir -p runs/default-model
.venv/bin/ser-offline train --corpus emodb --data "$emodb" --preset cpu --pretrain ravdess --pretrain-data "$ravdess" \
    --pretrain-epochs 10 --out runs/default-model/model.pt --compact "$@"
cp runs/default-model/model-int8.pt stream_ser/assets/default-emodb.pt
ls -l stream_ser/assets/default-emodb.pt
