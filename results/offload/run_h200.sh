#!/usr/bin/env bash
# The device runs behind results/offload/: one H200, torch as installed there. Writes into $OUT.
# Parts, run in the order given (default: a b c):
#   a: swiglu_down checked on the GPU, the eager modes (checkpointed inputs on the GPU and offloaded),
#      and diagnose.py (interleaved step times, what is alive at each peak, profiles)
#   b: the compiled modes
#   c: 7B at 16 x 1024 under a 24 GB cap
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
B="python3 bench.py --model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 10"
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(a b c)
for part in "${parts[@]}"; do
  case $part in
  a) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/a.log"
     python3 results/offload/check_swiglu_down.py >> "$OUT/a.log" 2>&1
     $B --modes infer,infer-logits,lomo,lomo-clip,sgd,hook-sgd --out "$OUT/bench-eager.jsonl" >> "$OUT/a.log" 2>&1
     $B --offload-checkpoints --modes lomo,lomo-clip --out "$OUT/bench-eager.jsonl" >> "$OUT/a.log" 2>&1
     python3 results/offload/diagnose.py > "$OUT/diagnose.log" 2>&1 ;;
  b) $B --compile --modes lomo,sgd,lomo-clip --out "$OUT/bench-compiled.jsonl" > "$OUT/b.log" 2>&1
     $B --compile --offload-checkpoints --modes lomo,lomo-clip --out "$OUT/bench-compiled.jsonl" >> "$OUT/b.log" 2>&1 ;;
  c) C="python3 bench.py --model 7B --activation-checkpointing --batch-size 16 --seq-len 1024 --steps 5 --memory-cap-gb 24"
     $C --modes infer,lomo --out "$OUT/bench-cap24.jsonl" > "$OUT/c.log" 2>&1
     $C --offload-checkpoints --modes lomo --out "$OUT/bench-cap24.jsonl" >> "$OUT/c.log" 2>&1 ;;
  esac
done
