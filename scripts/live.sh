#!/usr/bin/env bash
# The main job: installs what it needs, then starts the live recognizer. Extra arguments go to `stream-ser live`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/stream-ser live "$@"
