#!/bin/bash
# On a GPU machine without network, from the repository root, after `scripts/gpu-pack.sh` here:
# install the carried wheels into /tmp/site and put the carried corpora where the code expects them
# (../shared/data/emodb/wav, ../shared/data/ravdess). Idempotent: a second call on the same machine
# keeps what the first unpacked. Source it to keep PYTHONPATH:  . scripts/gpu-setup.sh
if [ -d .gpu/wheels ] && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu/wheels/*.whl && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD
if [ -d .gpu/emodb_flac ] && [ "$(ls ../shared/data/emodb/wav 2>/dev/null | wc -l)" != 535 ]; then
  mkdir -p ../shared/data/emodb/wav
  python3 - <<'PY'
import pathlib, soundfile as sf
for p in sorted(pathlib.Path(".gpu/emodb_flac").glob("*.flac")):
    x, sr = sf.read(p, dtype="int16")
    sf.write(f"../shared/data/emodb/wav/{p.stem}.wav", x, sr, subtype="PCM_16")
PY
fi
if [ -d .gpu/ravdess ] && [ ! -d ../shared/data/ravdess ]; then
  mkdir -p ../shared/data && cp -r .gpu/ravdess ../shared/data/ravdess
fi
echo "gpu-setup: emodb $(ls ../shared/data/emodb/wav 2>/dev/null | wc -l) wavs," \
     "ravdess $(find ../shared/data/ravdess -name '*.flac' 2>/dev/null | wc -l) flac"
