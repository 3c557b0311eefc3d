#!/usr/bin/env bash
# train.py's loop before and after it stopped waiting for the GPU after every step (one H200). Writes into $OUT.
# train_before.py (not in git) is train.py before that change: git show 9f6be18:train.py > results/train-loop/train_before.py
#   run 1: the CUDA cases of tests/test_train.py; 7B, bf16, checkpointing, 4 x 512, 40 steps, before and
#          after, twice eager and once compiled, alternating (after: the summary failed, run_started was shadowed by
#          the loop's clock mark, fixed in the next commit; the step rows and logs stand)
#   run 2: part 2, the fixed build: the CUDA cases of tests/test_train.py, before and after twice eager, alternating
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/run.log"
if [ "${1:-1}" = 2 ]; then
  python3 -m pytest -q tests/test_train.py -k "finite or gradient_norm or resume" >> "$OUT/run.log" 2>&1
  T="--model 7B --dtype bf16 --activation-checkpointing --batch-size 4 --seq-len 512 --steps 40 --eval-every 1000
     --eval-batches 1 --sample-tokens 1 --lr 1e-6 --device cuda --data data/botchan.txt"
  for run in 1 2; do
    PYTHONPATH=. python3 results/train-loop/train_before.py $T --out "/tmp/runs/before-$run" > "$OUT/before-$run.log" 2>&1
    python3 train.py $T --out "/tmp/runs/after-$run" > "$OUT/after-$run.log" 2>&1
  done
  python3 results/train-loop/summarize.py /tmp/runs >> "$OUT/run.log" 2>&1
  exit
fi
python3 -m pytest -q tests/test_train.py -k "finite or gradient_norm or resume" >> "$OUT/run.log" 2>&1
T="--model 7B --dtype bf16 --activation-checkpointing --batch-size 4 --seq-len 512 --steps 40 --eval-every 1000
   --eval-batches 1 --sample-tokens 1 --lr 1e-6 --device cuda --data data/botchan.txt"
for run in 1 2 compiled; do
  extra=""; [ $run = compiled ] && extra="--compile"
  PYTHONPATH=. python3 results/train-loop/train_before.py $T $extra --out "$OUT/before-$run" > "$OUT/before-$run.log" 2>&1
  python3 train.py $T $extra --out "$OUT/after-$run" > "$OUT/after-$run.log" 2>&1
done
python3 results/train-loop/summarize.py "$OUT" >> "$OUT/run.log" 2>&1
