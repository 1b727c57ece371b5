#!/bin/bash
# Issue 12's GPU figures in one device call (about 4 min on an H100), from a checkout carrying .gpu
# (`bash scripts/gpu-pack.sh emodb`, carried as .gpu):
#   1. the CUDA tests (CPU equals CUDA, fp16 on the GPU against fp32 on the CPU);
#   2. what fp16 and bf16 change on the bundled model, on the GPU's kernels (EMO-DB, its training data);
#   3. bench.run at 227 px in fp16 (the fp32 figures are the committed nvidia-*.json);
#   4. the bundled model as `stream-ser live --device cuda` runs it (64 px, speaker normalisation), where
#      its engine hop goes at 1024 streams (bench.profile_engine), the kernel launches of one hop at 128
#      and 512 streams (--ops: they must not grow with the streams), and its hop's median at 1024 and 2048
#      streams fed as fast as possible (--timing: under 320 ms is what 2000 real-time streams need), and
#      at 1024 fresh streams, all in partial windows (a burst of new streams);
#   5. the producers one `stream-ser live` server on the GPU carries end to end (bench.server_capacity).
# Writes under $OUT (the device's, else runs/gpu-bench): bench/<machine>[-fp16].json, agree-*.json, *.log.
# Merge bench/*.json into bench/results/ here (the bundled model's section joins <machine>.json).
set -u
cd "$(dirname "$0")/.."
. scripts/gpu-setup.sh
DEST=${OUT:-runs/gpu-bench}; mkdir -p "$DEST/bench"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$DEST/gpu.txt"
python3 -m pytest -q -m cuda -p no:cacheprovider tests > "$DEST/cuda-tests.log" 2>&1; tail -3 "$DEST/cuda-tests.log"
for p in fp16 bf16; do
  python3 -m bench.int8_agreement --device cuda --precision $p --ravdess '' > "$DEST/agree-$p.json" 2> "$DEST/agree-$p.err"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['answers_differ'], 'of', d['utterances'], 'differ; max prob diff', round(d['max_abs_prob_diff'], 4))" "$DEST/agree-$p.json" $p
done
python3 -m bench.run --device cuda --precision fp16 --image-sizes 227 --repeats 1 --ladder 1 64 128 256 512 \
    --out "$DEST/bench" --docs "$DEST/benchmarks.md" > "$DEST/bench.log" 2>&1; tail -5 "$DEST/bench.log"
python3 -m bench.run --device cuda --checkpoint bundled --repeats 1 --ladder 1 256 512 1024 2048 \
    --out "$DEST/bench" --docs "$DEST/benchmarks.md" > "$DEST/bench-bundled.log" 2>&1; tail -8 "$DEST/bench-bundled.log"
python3 -m bench.profile_engine --device cuda --checkpoint bundled --streams 1024 --hops 5 --top 30 \
    > "$DEST/profile-bundled-1024.log" 2>&1; head -8 "$DEST/profile-bundled-1024.log"
python3 -m bench.profile_engine --device cuda --checkpoint bundled --streams 512 --ops \
    > "$DEST/ops-bundled-512.log" 2>&1; head -4 "$DEST/ops-bundled-512.log"
for n in 1024 2048; do
  python3 -m bench.profile_engine --device cuda --checkpoint bundled --streams $n --hops 10 --timing
done 2>&1 | tee "$DEST/timing-bundled.log"
python3 -m bench.profile_engine --device cuda --checkpoint bundled --streams 1024 --timing --partial-windows \
    2>&1 | tee -a "$DEST/timing-bundled.log"
# the whole server end to end: real websocket producers and a subscriber (about 30 s a rung)
timeout 150 python3 -m bench.server_capacity --ladder 512 1024 2048 --seconds 8 --out "$DEST/server-capacity.json" \
    2>&1 | tee "$DEST/server-capacity.log" | tail -4
