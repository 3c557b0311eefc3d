#!/usr/bin/env bash
# 13B at tp = 2 under a 24 GB cap per GPU with session 14's build (2 x H200): eager, then --cuda-graph.
# The last measurement of this target was session 2's build on 2 x H100 (results/tp-h100x2-final/).
# Usage: OUT=... bash results/13b-tp2-h200x2/run.sh
set -uo pipefail
out=${OUT:?set OUT}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
for flags in "" "--cuda-graph"; do
    timeout 85 python3 bench.py --model 13B --dtype bf16 --activation-checkpointing --batch-size 4 --seq-len 512 \
        --tp 2 --memory-cap-gb 24 --steps 10 --modes lomo $flags --out "$out/bench.jsonl" >> "$out/bench.log" 2>&1 \
        || echo "FAILED: $flags" >> "$out/bench.log"
done
python3 -c "
import json
for line in open('$out/bench.jsonl'):
    r = json.loads(line)
    print('tp', r['tp'], 'graph', r['cuda_graph'], 'tok/s/gpu', round(r['tokens_per_gpu_per_s']),
          'median step ms', round(r['median_step_ms'], 1), 'peak', round(r['peak_allocated_gib'], 2), r['device'])
"
