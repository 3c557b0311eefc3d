#!/usr/bin/env bash
# The device runs behind results/gram-norm/: one H200, torch as installed there. Writes into $OUT.
# Run 1 (first build: two input Grams kept) was this script with --steps 10 and without infer;
# run 2 (one input Gram kept, dropped at each w2) is this script as it stands.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/run.log"
python3 results/gram-norm/check_gpu.py >> "$OUT/run.log" 2>&1
python3 results/gram-norm/clip_ab.py >> "$OUT/run.log" 2>&1
B="python3 bench.py --model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 20"
$B --modes infer,lomo,lomo-clip,sgd --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --no-gram-norms --modes lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --offload-checkpoints --modes lomo,lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --offload-checkpoints --no-gram-norms --modes lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
