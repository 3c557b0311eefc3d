#!/usr/bin/env bash
# The device run behind results/gram-norm/: one H200, torch as installed there. Writes into $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/run.log"
python3 results/gram-norm/check_gpu.py >> "$OUT/run.log" 2>&1
python3 results/gram-norm/clip_ab.py >> "$OUT/run.log" 2>&1
B="python3 bench.py --model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 10"
for extra in "" "--offload-checkpoints"; do
  $B $extra --modes lomo,lomo-clip,sgd --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
  $B $extra --no-gram-norms --modes lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
done
