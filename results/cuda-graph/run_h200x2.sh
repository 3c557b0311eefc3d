#!/usr/bin/env bash
# The 2-GPU measurement of the step as CUDA graphs (not yet run: only one H200 was lent in session 12).
# The 2-GPU test (tp = 2 and dp = 2 through train.py, graphs against eager), then 7B bf16 with checkpointing
# at 4 x 512: lomo at tp = 1 and tp = 2, eager and --cuda-graph, each in its own process(es); the target is
# tp = 2 at 80% or more of tp = 1's tokens per GPU per second. Writes into $OUT.
set -uo pipefail
out=${OUT:?set OUT}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py > "$out/tests.log" 2>&1
echo "tests rc=$?" >> "$out/tests.log"
for tp in 1 2; do
    for graph in "" --cuda-graph; do
        timeout 200 python3 bench.py --model 7B --dtype bf16 --activation-checkpointing --batch-size 4 --seq-len 512 \
            --steps 30 --tp $tp --modes lomo $graph --out "$out/bench.jsonl" >> "$out/bench.log" 2>&1 \
            || echo "FAILED: tp $tp $graph" >> "$out/bench.log"
    done
done
python3 -c "
import json
for line in open('$out/bench.jsonl'):
    r = json.loads(line)
    print('tp', r['tp'], 'graph', r['cuda_graph'], 'tok/s/gpu', round(r['tokens_per_gpu_per_s']), 'median', round(r['median_tokens_per_s'] / r['tp']),
          'peak', round(r['peak_allocated_gib'], 2))
"
