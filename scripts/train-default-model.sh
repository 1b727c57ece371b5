#!/usr/bin/env bash
# Rebuilds the bundled model (stream_ser/assets/default-emodb.pt) from EMO-DB with the project's own trainer.
# Usage: scripts/train-default-model.sh [EMODB_DIR] [extra ser-offline train flags]   (see docs/default-model.md)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/emodb}
shift || true
bash scripts/setup.sh
mkdir -p runs/default-model
.venv/bin/ser-offline train --corpus emodb --data "$data" --preset quick --out runs/default-model/model.pt --compact "$@"
cp runs/default-model/model-int8.pt stream_ser/assets/default-emodb.pt
ls -l stream_ser/assets/default-emodb.pt
