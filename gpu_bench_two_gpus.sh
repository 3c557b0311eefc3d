#!/usr/bin/env bash
# GPU measurements on a 2-GPU machine (the recorded run got 2 x H200): the LOMO update path on CUDA, 7B modes, 7B and 13B at tp = 2,
# and shape studies that predict the 4- and 8-GPU runs (30B and 65B shapes with fewer layers at tp = 2,
# under a 24 GB cap per GPU). Usage: bash gpu_bench_two_gpus.sh OUTDIR
set -uo pipefail
out=${1:?usage: bash gpu_bench_two_gpus.sh OUTDIR}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pytest -q tests/test_lomo.py -k rounded > "$out/cuda_update_test.log" 2>&1; tail -1 "$out/cuda_update_test.log"
b="python3 bench.py --activation-checkpointing --seq-len 512"
timeout 150 $b --model 7B --batch-size 4 --modes lomo,hook-sgd,sgd --out "$out/bench.jsonl" > "$out/a.log" 2>&1
timeout 90 $b --model 7B --batch-size 4 --tp 2 --modes lomo --out "$out/bench.jsonl" > "$out/b.log" 2>&1
timeout 90 $b --model 13B --batch-size 4 --tp 2 --memory-cap-gb 24 --modes lomo --out "$out/bench.jsonl" > "$out/c.log" 2>&1
for layers in 4 8; do
  timeout 60 $b --model 30B --n-layers $layers --batch-size 2 --tp 2 --memory-cap-gb 24 --modes lomo --out "$out/bench.jsonl" >> "$out/d.log" 2>&1
  timeout 60 $b --model 65B --n-layers $layers --batch-size 1 --tp 2 --memory-cap-gb 24 --modes lomo --out "$out/bench.jsonl" >> "$out/d.log" 2>&1
done
python3 -c "
import json
for line in open('$out/bench.jsonl'):
    r = json.loads(line)
    print(r['mode'], r['model'], r['n_layers'], 'tp', r['tp'], 'batch', r['batch_size'], 'tok/s/gpu', round(r['tokens_per_gpu_per_s']),
          'peak', round(r['peak_allocated_gib'], 2), 'reserved', round(r['peak_reserved_gib'], 2), 'mfu', round(r['mfu'], 3))
"
