#!/usr/bin/env bash
# The 2-GPU agreement run: a ~1B LLaMA in bf16 with NCCL at tp = 1, tp = 2 and dp = 2, 50 steps from the
# same initial weights and the same global batch; compare_runs.py prints the loss differences and the
# tokens per GPU per second of each. Usage: bash gpu_parallel_check.sh OUTDIR
set -euo pipefail
out=${1:?usage: bash gpu_parallel_check.sh OUTDIR}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
flags="--model 1B --dtype bf16 --activation-checkpointing --steps 50 --seq-len 512 --lr 0.05 --clip-grad-norm 1.0
       --vocab-size 8000 --eval-every 25 --eval-batches 4 --sample-tokens 16"
python3 train.py $flags --batch-size 8 --out "$out/tp1" > "$out/tp1.log" 2>&1
torchrun --standalone --nproc_per_node 2 train.py $flags --tp 2 --batch-size 8 --out "$out/tp2" > "$out/tp2.log" 2>&1
torchrun --standalone --nproc_per_node 2 train.py $flags --batch-size 4 --out "$out/dp2" > "$out/dp2.log" 2>&1
python3 compare_runs.py "$out/tp1" "$out/tp2" "$out/dp2" | tee "$out/summary.jsonl"
