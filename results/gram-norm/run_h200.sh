#!/usr/bin/env bash
# The device runs behind results/gram-norm/: one H200, torch as installed there. Writes into $OUT.
#   a: the GPU check, the interleaved A/B (clip_ab.py) and one bench process per mode. Run 1 (first build,
#      two input Grams kept) was part a with --steps 10 and without infer; run 2 is part a as it stands.
#   b: bench processes repeated (two per variant, 30 steps), with each step's time (run 3)
#   c: lomo against sgd and hook-sgd the same way, by the median step too (run 4)
#   d: the final build (Gram norms, gc.freeze() in bench.py): every mode once, 30 steps (run 5)
#   e: clip_ab.py alone, after the review's changes to LOMO (run 6)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(a b)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/run.log"
for part in "${parts[@]}"; do
  case $part in
  a) B="python3 bench.py --model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 20"
     python3 results/gram-norm/check_gpu.py >> "$OUT/run.log" 2>&1
     python3 results/gram-norm/clip_ab.py >> "$OUT/run.log" 2>&1
     $B --modes infer,lomo,lomo-clip,sgd --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
     $B --no-gram-norms --modes lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
     $B --offload-checkpoints --modes lomo,lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
     $B --offload-checkpoints --no-gram-norms --modes lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  b) B="python3 bench.py --model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 30"
     for rep in 1 2; do
       for extra in "" "--offload-checkpoints"; do
         $B $extra --modes lomo,lomo-clip --out "$OUT/bench-repeated.jsonl" >> "$OUT/run.log" 2>&1
         $B $extra --no-gram-norms --modes lomo-clip --out "$OUT/bench-repeated.jsonl" >> "$OUT/run.log" 2>&1
       done
     done ;;
  c) B="python3 bench.py --model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 30"
     for rep in 1 2; do
       $B --modes lomo,sgd,hook-sgd --out "$OUT/bench-vs-sgd.jsonl" >> "$OUT/run.log" 2>&1
       $B --offload-checkpoints --modes lomo,sgd --out "$OUT/bench-vs-sgd.jsonl" >> "$OUT/run.log" 2>&1
     done ;;
  d) B="python3 bench.py --model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 30"
     $B --modes infer,lomo,lomo-clip,sgd,hook-sgd --out "$OUT/bench-final.jsonl" >> "$OUT/run.log" 2>&1
     $B --offload-checkpoints --modes lomo,lomo-clip --out "$OUT/bench-final.jsonl" >> "$OUT/run.log" 2>&1
     $B --offload-checkpoints --no-gram-norms --modes lomo-clip --out "$OUT/bench-final.jsonl" >> "$OUT/run.log" 2>&1 ;;
  e) python3 results/gram-norm/clip_ab.py >> "$OUT/run.log" 2>&1 ;;
  esac
done
