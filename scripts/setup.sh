#!/usr/bin/env bash
# Idempotent set-up: Debian packages (as root), a virtual environment in .venv, the package.
# Usage: scripts/setup.sh [--test]   (--test adds pytest and librosa)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

need_apt=()
if ! ldconfig -p 2>/dev/null | grep -q libportaudio.so.2; then need_apt+=(libportaudio2); fi
if ! ldconfig -p 2>/dev/null | grep -q libasound.so.2; then need_apt+=(libasound2); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${need_apt[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: warning: ${need_apt[*]} missing; install them (sudo apt-get install ${need_apt[*]}) for microphone input" >&2
  fi
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$py" -m venv .venv
fi
stamp=".venv/.installed${extras:+-test}"
fresh() { [ -f "$1" ] && [ ! pyproject.toml -nt "$1" ]; }
if fresh "$stamp" || { [ -z "$extras" ] && fresh .venv/.installed-test; }; then
  :  # installed and up to date (the test install includes the plain one)
else
  echo "setup: installing stream_ser$extras into .venv (torch 2.11 wheels are large; first run takes minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  # Pinned matching set first: the CPU-only torch wheel some machines carry locally must not win.
  .venv/bin/python -m pip install -q --disable-pip-version-check \
      "torch==2.11.*" "torchvision==0.26.*" "torchaudio==2.11.*" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import torch, torchvision, torchaudio, stream_ser" 
  touch "$stamp"
fi
