#!/usr/bin/env bash
# Why 7B at tp = 2 with --cuda-graph did not finish in 200 s (session 14, run 6), while tp = 1 took ~40 s and
# the 2-GPU test (tiny model, train.py --tp 2 --cuda-graph) passed on the same machine. Each probe runs bench.py's
# worker under torchrun directly, so that its output is not held back; one that is still running after its time
# gets SIGABRT, on which Python's faulthandler prints every thread's stack.
#   stuck:     the same run as run 6, stacks after 90 s: where it waits
#   noreg:     NCCL_GRAPH_REGISTER=0: NCCL does not register the captured all-reduces' buffers
#   layers2:   two blocks instead of 32, same message sizes: a matter of size, or of count?
#   compiled:  if noreg finished, --compile --cuda-graph at tp = 2 with the same setting, and at tp = 1
# Usage: OUT=... bash results/cuda-graph/probe_tp2_graph.sh
set -uo pipefail
out=${OUT:?set OUT}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
export PYTHONFAULTHANDLER=1 NCCL_DEBUG=WARN
shape="--model 7B --dtype bf16 --activation-checkpointing --batch-size 4 --seq-len 512 --modes lomo --cuda-graph"

probe() {  # name seconds [VAR=value ...] -- more bench.py flags
    local name=$1 secs=$2; shift 2
    local envs=(PROBE=1)
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
    env "${envs[@]}" python3 -m torch.distributed.run --standalone --nproc_per_node 2 bench.py $shape --tp 2 "$@" \
        --worker lomo > "$out/$name.log" 2>&1 &
    local pid=$! start=$SECONDS
    while kill -0 $pid 2>/dev/null && [ $((SECONDS - start)) -lt "$secs" ]; do sleep 1; done
    if kill -0 $pid 2>/dev/null; then
        echo "PROBE: still running after $secs s, SIGABRT for the stacks" >> "$out/$name.log"
        pkill -ABRT -f -- "--worker lomo"; sleep 8; pkill -9 -f -- "--worker lomo"
    fi
    wait $pid
    echo "PROBE $name: rc=$? after $((SECONDS - start)) s" | tee -a "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
probe stuck 90 -- --steps 30
probe noreg 120 NCCL_GRAPH_REGISTER=0 -- --steps 30
probe layers2 60 -- --n-layers 2 --steps 10
if grep -q '^{' "$out/noreg.log"; then
    probe compiled-noreg 200 NCCL_GRAPH_REGISTER=0 -- --compile --steps 30
    if [ $SECONDS -lt 420 ]; then
        timeout 150 python3 bench.py $shape --tp 1 --compile --steps 30 --out "$out/compiled-tp1.jsonl" \
            > "$out/compiled-tp1.log" 2>&1
        echo "compiled tp1 rc=$?"
    fi
fi
grep -h '^{' "$out"/*.log | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print('tp', r['tp'], 'compile', r['compile'], 'graph', r['cuda_graph'], 'tok/s/gpu', round(r['tokens_per_gpu_per_s']),
          'median step ms', round(r['median_step_ms'], 1), 'peak', round(r['peak_allocated_gib'], 2))
"
