#!/usr/bin/env bash
# The CPU demonstration: the tiny LLaMA, from random weights, fine-tuned with LOMO on the word-order task
# made from the bundled book (tasks.py), over three seeds. Held-out accuracy starts at chance (1 in 4).
# Each evaluation's line is printed as it comes. STEPS, EVAL_EVERY and SEEDS shorten it (the tests do).
set -euo pipefail
out=${1:-out}
steps=${STEPS:-600}
python tasks.py word-order data/word_order
for seed in ${SEEDS:-1 2 3}; do
  python -u train.py --data data/word_order/train.jsonl --val-data data/word_order/validation.jsonl --seq-len 64 \
    --steps "$steps" --lr 1.0 --clip-grad-norm 1.0 --warmup-steps $((steps / 10)) --schedule linear \
    --eval-every "${EVAL_EVERY:-200}" --seed "$seed" --out "$out/word-order-$seed" --overwrite \
    | stdbuf -oL tr '\r' '\n' | grep --line-buffered -E "^(step|validation loss)"  # lines as they come
done
