#!/usr/bin/env bash
# LOMO, LOMO with clipping, AdaLomo and AdamW (the usual full backward) on the CPU word-order task (tasks.py),
# the tiny LLaMA from random weights, three seeds each, the same schedule for all: 600 steps of 16 examples,
# 60 warmup steps, linear decay. Each optimizer's learning rate is the best of a small sweep on seed 1 (in the
# README). Prints the table and writes curves.svg (seed 1 of each). About 5 minutes on 2 cores.
set -euo pipefail
out=${1:-out/optimizers}
python tasks.py word-order data/word_order
common=(--data data/word_order/train.jsonl --val-data data/word_order/validation.jsonl --seq-len 64 --steps 600
        --warmup-steps 60 --schedule linear --eval-every 200 --sample-tokens 0 --overwrite)
for seed in 1 2 3; do
  for run in "lomo --lr 1.0" "lomo-clip --lr 1.0 --clip-grad-norm 1.0" "adalomo --lr 1e-2" "adamw --lr 1e-3"; do
    set -- $run
    name=$1; shift
    python -u train.py "${common[@]}" --optimizer "${name%-clip}" "$@" --seed "$seed" --out "$out/$name-$seed" \
      2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -E "^(validation loss|AdaLomo|LOMO|AdamW|train.py)" \
      || true  # a run that diverges stops with its message; the table says so
  done
done
python plot.py "$out"/{lomo,lomo-clip,adalomo,adamw}-1 --label lomo --label lomo-clip --label adalomo \
  --label adamw --svg "$out/curves.svg"
python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
print("| optimizer | held-out accuracy, 3 seeds: before -> after 600 steps | final val loss | s per run |")
print("| --- | --- | --- | --- |")
for name in ("lomo", "lomo-clip", "adalomo", "adamw"):
    runs = [[json.loads(line) for line in (Path(sys.argv[1]) / f"{name}-{seed}" / "metrics.jsonl").open()]
            for seed in (1, 2, 3)]
    first = [next(r for r in rows if "acc" in r)["acc"] for rows in runs]
    last = [rows[-1] if rows[-1].get("summary") else None for rows in runs]
    stopped = [f"stopped at step {rows[-1]['step'] + 1}" for rows, end in zip(runs, last) if end is None]
    accuracy = " / ".join(f"{r['acc']:.3f}" if r else "-" for r in last)
    loss = " / ".join(f"{r['val_loss']:.3f}" if r else "-" for r in last)
    seconds = statistics.mean(r["time_s"] for r in last if r)
    print(f"| {name} | {statistics.mean(first):.3f} -> {accuracy} | {loss}{'; ' if stopped else ''}"
          f"{', '.join(stopped)} | {seconds:.0f} |")
PY
