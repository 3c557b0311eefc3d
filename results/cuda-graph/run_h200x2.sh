#!/usr/bin/env bash
# The 2-GPU measurement of the step as CUDA graphs (session 14: runs 6, 8 and 9, README.md).
#   part bench (= plain, then compiled): 7B bf16 with checkpointing at 4 x 512, lomo at tp = 1 and tp = 2, eager, --cuda-graph and
#               --compile --cuda-graph, each in its own process(es); the target is tp = 2 at 80% or more of tp = 1's
#               tokens per GPU per second (session 13's emulation predicted 85-87% graphed, 88-93% compiled and graphed;
#               measured 84.0-84.3% and 86.8%: PERF_NOTES.md, "Session 14")
#   part plain: eager and --cuda-graph only; part compiled: --compile --cuda-graph only; part graphs: both graphed;
#               part repeat: --cuda-graph again, tp = 2 first
#   part teardown: the fix for run 6's hang (release_graphs before destroy_process_group): its tests, then the
#               same 2-block bench run on the build before it (before-release/, carried), which must still be
#               running after 90 s (then killed: rc 137)
#   part tests: the 2-GPU test (tp = 2 and dp = 2 through train.py, graphs against eager) and the rest of
#               tests/test_cuda_graph.py
# Writes into $OUT. Usage: OUT=... bash results/cuda-graph/run_h200x2.sh PART
set -uo pipefail
part=${1:?usage: run_h200x2.sh bench|plain|compiled|graphs|repeat|teardown|tests}
out=${OUT:?set OUT}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
if [ "$part" = tests ]; then
    timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py > "$out/tests.log" 2>&1
    echo "tests rc=$?" >> "$out/tests.log"
fi
if [ "$part" = teardown ]; then
    timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py \
        -k "released_graphs or bench_s_graphed or error_after_the_capture" > "$out/teardown-tests.log" 2>&1
    echo "tests rc=$?" >> "$out/teardown-tests.log"
    (cd results/cuda-graph/before-release && timeout -s KILL 90 python3 -m torch.distributed.run --standalone \
        --nproc_per_node 2 bench.py --model 7B --n-layers 2 --activation-checkpointing --tp 2 --modes lomo \
        --cuda-graph --steps 3 --worker lomo) > "$out/teardown-before.log" 2>&1
    echo "before the fix: rc=$? (137: killed after 90 s)" >> "$out/teardown-before.log"
    pkill -9 -f -- "--worker lomo"
fi
case "$part" in
    bench) flag_sets=("" "--cuda-graph" "--compile --cuda-graph") ;;
    plain) flag_sets=("" "--cuda-graph") ;;
    compiled) flag_sets=("--compile --cuda-graph") ;;
    graphs) flag_sets=("--cuda-graph" "--compile --cuda-graph") ;;
    repeat) flag_sets=("--cuda-graph") ; tps="2 1" ;;
    *) flag_sets=() ;;
esac
if [ ${#flag_sets[@]} -gt 0 ]; then
    for flags in "${flag_sets[@]}"; do
        for tp in ${tps:-1 2}; do
            timeout 200 python3 bench.py --model 7B --dtype bf16 --activation-checkpointing --batch-size 4 --seq-len 512 \
                --steps 30 --tp $tp --modes lomo $flags --out "$out/bench.jsonl" >> "$out/bench.log" 2>&1 \
                || echo "FAILED: tp $tp $flags" >> "$out/bench.log"
        done
    done
    python3 -c "
import json
for line in open('$out/bench.jsonl'):
    r = json.loads(line)
    print('tp', r['tp'], 'compile', r['compile'], 'graph', r['cuda_graph'], 'tok/s/gpu', round(r['tokens_per_gpu_per_s']),
          'median step ms', round(r['median_step_ms'], 1), 'peak', round(r['peak_allocated_gib'], 2))
"
fi
