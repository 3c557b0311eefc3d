#!/usr/bin/env bash
# The 4-GPU runs: 30B at tp = 4 under a 24 GB cap per GPU, and the tp = 4 and dp 2 x tp 2 agreement on NCCL.
# Usage: bash gpu_four_gpus.sh OUTDIR   (on a machine with 4 GPUs)
set -uo pipefail
out=${1:?usage: bash gpu_four_gpus.sh OUTDIR}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi -L
# ~1B LLaMA, bf16, 50 steps from the same initial weights and global batch: tp = 1, tp = 4, dp 2 x tp 2
flags="--model 1B --dtype bf16 --activation-checkpointing --steps 50 --seq-len 512 --lr 0.05 --clip-grad-norm 1.0
       --vocab-size 8000 --eval-every 25 --eval-batches 4 --sample-tokens 16"
python3 train.py $flags --batch-size 8 --out "$out/tp1" > "$out/tp1.log" 2>&1
torchrun --standalone --nproc_per_node 4 train.py $flags --tp 4 --batch-size 8 --out "$out/tp4" > "$out/tp4.log" 2>&1
torchrun --standalone --nproc_per_node 4 train.py $flags --tp 2 --batch-size 4 --out "$out/dp2tp2" > "$out/dp2tp2.log" 2>&1
python3 compare_runs.py "$out/tp1" "$out/tp4" "$out/dp2tp2" | tee "$out/agreement.jsonl"
# 30B LLaMA shape at tp = 4 under a 24 GB cap per GPU: one measured batch, then the largest batch that fits
b="python3 bench.py --model 30B --activation-checkpointing --seq-len 512 --tp 4 --memory-cap-gb 24"
timeout 90 $b --batch-size 2 --modes lomo --out "$out/bench30b.jsonl" > "$out/bench30b.log" 2>&1
timeout 320 $b --batch-size 8 --find-max-batch --out "$out/bench30b.jsonl" > "$out/maxbatch30b.log" 2>&1
cat "$out/bench30b.jsonl"; grep -h "batch" "$out/maxbatch30b.log" | cut -c1-200
