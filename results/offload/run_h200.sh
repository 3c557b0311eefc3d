#!/usr/bin/env bash
# The device run behind results/offload/*-h200.*: one H200, torch as installed there. Writes into $OUT.
# Part "a": checks, the memory peaks, eager modes. Part "b": compiled modes.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
B="python3 bench.py --model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 10"
if [ "${1:-a}" = a ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/a.log"
  python3 results/offload/check_swiglu_down.py >> "$OUT/a.log" 2>&1
  $B --modes infer,infer-logits,lomo,lomo-clip,sgd,hook-sgd --out "$OUT/bench-eager.jsonl" >> "$OUT/a.log" 2>&1
  $B --offload-checkpoints --modes lomo,lomo-clip --out "$OUT/bench-eager.jsonl" >> "$OUT/a.log" 2>&1
  C="python3 bench.py --model 7B --activation-checkpointing --batch-size 16 --seq-len 1024 --steps 5 --memory-cap-gb 24"
  $C --modes infer,lomo --out "$OUT/bench-cap24.jsonl" >> "$OUT/a.log" 2>&1
  $C --offload-checkpoints --modes lomo --out "$OUT/bench-cap24.jsonl" >> "$OUT/a.log" 2>&1
  python3 results/offload/diagnose.py > "$OUT/diagnose.log" 2>&1
else
  $B --compile --modes lomo,sgd,lomo-clip --out "$OUT/bench-compiled.jsonl" > "$OUT/b.log" 2>&1
  $B --compile --offload-checkpoints --modes lomo,lomo-clip --out "$OUT/bench-compiled.jsonl" >> "$OUT/b.log" 2>&1
fi
