#!/bin/bash
# Pack what a GPU machine without network needs to run the offline protocol from this checkout:
# the pure-Python / manylinux wheels torch-only images lack (for its Python, default 3.12) and the
# corpora as FLAC (lossless, about 2/3 of the WAV size), into .gpu/ (git-ignored).
#
#   scripts/gpu-pack.sh [emodb] [ravdess]      # default: emodb
#
# Then carry .gpu to the machine and source `scripts/gpu-setup.sh` there first. Sizes: wheels 14 MB,
# EMO-DB 31 MB, RAVDESS 54 MB (already FLAC) -- EMO-DB and RAVDESS together exceed a 64 MiB transfer,
# so send them in two calls to one warm machine (gpu-setup.sh keeps what an earlier call unpacked).
set -eu
cd "$(dirname "$0")/.."
PYV=${PYV:-3.12}
PY=${PY:-.venv/bin/python}
mkdir -p .gpu/wheels
pkgs="soundfile cffi pycparser soxr websockets silero-vad librosa audioread pooch platformdirs decorator sounddevice"
pins=$($PY -m pip freeze 2>/dev/null | grep -i -E "^($(echo $pkgs | tr ' ' '|' | sed 's/-/[-_]/g'))==" || true)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .gpu/wheels ${pins:-$pkgs}
for corpus in "${@:-emodb}"; do
  case $corpus in
    emodb)
      mkdir -p .gpu/emodb_flac
      $PY - <<'PY'
import pathlib, soundfile as sf
src, dst = pathlib.Path("../shared/data/emodb/wav"), pathlib.Path(".gpu/emodb_flac")
for p in sorted(src.glob("*.wav")):
    out = dst / (p.stem + ".flac")
    if not out.exists():
        x, sr = sf.read(p, dtype="int16")
        sf.write(out, x, sr, subtype="PCM_16")
print("emodb:", len(list(dst.glob("*.flac"))), "files")
PY
      ;;
    ravdess) mkdir -p .gpu/ravdess && cp -rn ../shared/data/ravdess/. .gpu/ravdess/ && echo "ravdess copied";;
    *) echo "unknown corpus $corpus (emodb, ravdess)" >&2; exit 2;;
  esac
done
du -sh .gpu/*
