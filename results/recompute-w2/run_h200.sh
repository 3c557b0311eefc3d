#!/usr/bin/env bash
# Change 33 on one H200: a checkpointed block's recomputation skips w2's matmul (and, under tp, its all-reduce),
# whose output nothing reads. A/B in one call: "before" is the build before the change (its root *.py files in
# results/recompute-w2/before/, ignored by git, carried to the device); "after" is the working tree. 7B bf16 with
# checkpointing at 4 x 512, 30 timed steps, each in its own process, the two builds alternating.
# Writes into $OUT. Usage: OUT=... bash results/recompute-w2/run_h200.sh PART
#   run 1: part a: eager blocks (the change as first made: compiled blocks still computed the matmul)
#   run 3: part b: compiled blocks, which now skip it too ("before" is then the build of run 1's "after")
#   run 5: part c: after the change only: lomo and sgd (eager), then lomo --cuda-graph
set -uo pipefail
part=${1:?usage: run_h200.sh a|b|c}
out=${OUT:?set OUT}
root=$(pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
shape=(--model 7B --dtype bf16 --activation-checkpointing --steps 30 --batch-size 4 --seq-len 512)
one() {  # one() BUILD SCRIPT ARGS...: a run of BUILD (before/after) from its own folder; EMULATE stands for
# that build's copy of emulate_tp.py, which imports the modules two folders above it
    local build=$1; shift
    local dir=$root; [ "$build" = before ] && dir=$root/results/recompute-w2/before
    (cd "$dir" && timeout 170 python3 "${@/EMULATE/$dir/results/tp-emulated/emulate_tp.py}" "${shape[@]}" \
        --out "$out/$build.jsonl") >> "$out/bench.log" 2>&1 \
        || echo "FAILED: $build $*" >> "$out/bench.log"
}
if [ "$part" = a ]; then
    for build in before after before after; do one $build bench.py --modes lomo --cuda-graph; done
    for build in before after; do one $build bench.py --modes lomo-clip --cuda-graph; done
    for build in before after; do one $build bench.py --modes lomo; done
    for build in before after; do one $build EMULATE --tp 2 --modes lomo --cuda-graph; done
fi
if [ "$part" = c ]; then  # run 5: lomo against sgd after the change, each in its own process, and graphed lomo
    (timeout 200 python3 bench.py "${shape[@]}" --modes lomo,sgd --out "$out/after.jsonl") >> "$out/bench.log" 2>&1
    (timeout 120 python3 bench.py "${shape[@]}" --modes lomo --cuda-graph --out "$out/after.jsonl") >> "$out/bench.log" 2>&1
    touch "$out/before.jsonl"
fi
if [ "$part" = b ]; then
    for build in before after before after; do one $build bench.py --modes lomo --compile --cuda-graph; done
    for build in before after; do one $build EMULATE --tp 2 --modes lomo --compile --cuda-graph; done
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_offload.py tests/test_model.py -k "compile" \
        > "$out/tests.log" 2>&1
    echo "tests rc=$?" >> "$out/tests.log"
fi
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys
for build in ("before", "after"):
    for line in open(f"{sys.argv[1]}/{build}.jsonl"):
        r = json.loads(line)
        print(f"{build:6} {r['mode']:9} tp {r['tp']} emulated {r.get('emulated_tp', False)!s:5} graph {r['cuda_graph']}: "
              f"{r['tokens_per_gpu_per_s']:.0f} tokens/GPU/s, median step {r['median_step_ms']:.1f} ms, "
              f"peak {r['peak_allocated_gib']:.3f} GiB")
PY
