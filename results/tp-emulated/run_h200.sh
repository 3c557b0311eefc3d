#!/usr/bin/env bash
# Session 13 on one H200 (no 2-GPU machine lent): tp = 2's compute without its all-reduces (emulate_tp.py), beside
# real tp = 1 in the same call; 7B bf16 with checkpointing at 4 x 512, lomo, each in its own process. Writes into
# $OUT. Usage: bash results/tp-emulated/run_h200.sh PART
#   run 1: part a: eager, --cuda-graph, --compile --cuda-graph, each at tp = 1 and emulated tp = 2; then the GPU
#          tests that had not run on a GPU (the emulated eager runs stopped on a NaN gradient norm: the fake
#          all-reduce left the embeddings of tokens outside rank 0's shard at zero; fixed)
#   run 2: part b: nan_probe.py, then part a's bench runs again with the fix
#   runs 3-5 were single commands (not in this script): 3: `python3 results/tp-emulated/nan_probe_lomo.py cuda`, then
#          `python3 -m pytest -q tests/test_shard.py`; 4: `python3 results/tp-emulated/nan_probe_origin.py cuda`;
#          5: `python3 results/tp-emulated/nan_probe_compiled.py cuda`
set -uo pipefail
part=${1:?usage: run_h200.sh PART}
out=${OUT:?set OUT}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$out/gpu.txt" 2>&1
shape=(--model 7B --dtype bf16 --activation-checkpointing --steps 30 --batch-size 4 --seq-len 512 --modes lomo)
run() {  # a command's output to bench.log; a failure noted, not fatal
    timeout 170 "$@" >> "$out/bench.log" 2>&1 || echo "FAILED: $*" >> "$out/bench.log"
}
if [ "$part" = b ]; then
    timeout 200 python3 results/tp-emulated/nan_probe.py cuda > "$out/nan_probe.log" 2>&1
    echo "probe rc=$?" >> "$out/nan_probe.log"
fi
for flags in "" "--cuda-graph" "--compile --cuda-graph"; do
    run python3 bench.py "${shape[@]}" $flags --out "$out/bench.jsonl"
    run python3 results/tp-emulated/emulate_tp.py --tp 2 "${shape[@]}" $flags --out "$out/bench.jsonl"
done
if [ "$part" = a ]; then
    timeout 230 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_train.py \
        tests/test_tutorials.py > "$out/tests.log" 2>&1
    echo "tests rc=$?" >> "$out/tests.log"
fi
python3 - "$out/bench.jsonl" <<'PY' | tee "$out/summary.txt"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"tp {r['tp']} emulated {r.get('emulated_tp', False)} compile {r['compile']} graph {r['cuda_graph']}: "
          f"{r['tokens_per_gpu_per_s']:.0f} tokens/GPU/s, median step {r['median_step_ms']:.1f} ms, "
          f"peak {r['peak_allocated_gib']:.2f} GiB")
PY
