#!/usr/bin/env bash
# The device run behind results/eager-gap/ (one H200). Writes into $OUT.
#   run 1: python3 results/eager-gap/gap_ab.py 3, before lomo_before.py and the LOMO variants existed
#   run 2: the CUDA update tests, gap_ab.py (change 19 against before), bench.py eager and compiled (part a)
#   run 3: gap_ab.py 4 "sgd (foreach);hook: add_;hook: norm + add_, no sync;hook: norm + add_ + syncs;LOMO before;LOMO" --compile
#   run 4: part b: LOMO(check_finite=False) (change 20) interleaved, then bench.py eager and compiled
#   run 5: gap_ab.py 4 "sgd (foreach);hook: norm + add_, no sync;hook: norm + add_, sync before backward;
#          hook: norm + add_, sync after backward;hook: norm + add_ + syncs;LOMO, check_finite=False" --compile
#   run 6: part c: the final build, every eager mode once (the README's table)
#   run 7: part d, with lomo_before.py from 59f240d: the loss read at the first update instead of before backward
#   run 9: part e, with lomo_before.py from 5e503e9 (change 22: the norm read at the next step, not after backward);
#          run 10: part f, every lomo/sgd bench mode of that build, eager and compiled
#   run 11: part g: a compiled kernel that applies the update and sums the gradient's square in one read
#   run 12: parts h and i: the final build, every mode, eager (h) and compiled (i) (the README's table)
#   run 13: part j: fused_update.py's kernel (change 24): its tests, the probe, LOMO with and without it, eager;
#           run 14: part k, the same interleaved, eager and compiled; then kernel_tune.py (tune.log)
#   run 15: part h, with the tuned kernel and lomo --no-fused-kernel added (it showed checked steps stalling)
#   run 16: parts t and h: change 25 (the kernel reads the loss's finiteness on the device: no host wait in a
#           checked step); run 17: part i (compiled) (the README's table; its part m failed: lomo_before.py
#           was not carried); run 18: part m, interleaved, compiled then eager
#   run 21: part n: change 26 (the kernel launched through its compiled launcher, not Triton's JIT): tests,
#           launch_probe.py, eager bench.py sgd/lomo twice each, unfused, unchecked; then gap_ab.py eager
#   run 22: part p: the same build, sgd and lomo alternating in separate processes, 5 pairs eager and 2 compiled
#   run 23: part q: the CPU each mode needs to issue a 7B step: 1 x 16 tokens, so that the GPU waits for the CPU
#           and a step's time is the CPU's
#   run 24: part r: change 27 (the blocks checkpointed by offload.py's Function, not torch.utils.checkpoint):
#           tests; ckpt_ab.py now/before alternating, 1 x 16 tokens (the CPU's time) and 4 x 512; lomo-clip, offloaded
#   run 25: part s: change 27 compiled (sgd, lomo now; lomo before), lomo-clip before/now eager, lomo-clip
#           compiled, one more eager sgd/lomo pair
#   run 26: part u: hook_time.py (where the CPU of an eager LOMO step goes, 1 x 16 tokens)
#   run 27: part v: two more eager sgd/lomo pairs, each mode its own bench.py call; lomo-clip offloaded
#   run 28: part w: the review fixes of session 9 on a GPU (the kernel's new check, which launch each
#           kernel test takes, checkpointing on CUDA), then every eager mode of that build (fa462da) once
#   run 29: part x: change 28 (lomo-clip's update pass takes the blocks' input gradients from its norm pass):
#           its GPU tests, then lomo-clip with and without it, alternating, each in its own process; offloaded;
#           7B at 16 x 1024 under the 24 GB cap (run 29: stopped at a tp test that asked for 2 GPUs; run 30)
#   run 31: part y: branch_ab.py: when the saved branch gradients move (the prefetch, the norm pass's copies)
#   run 32: part z: the norm pass's copies in flight bounded (offload.COPIES_IN_FLIGHT) against unbounded
#   run 33: after the review fixes of change 28: tests/test_saved_branch_grads.py and test_offload.py on the
#           GPU, one lomo-clip (20 steps); run 34: branch_ab.py norecord / now (record_stream on the prefetch)
#           and lomo, 20 steps each (the command given to the device tool directly)
#   run 35: part aa (session 11): branch_ab.py with the per-pass timeline (CPU and GPU time of each backward
#           call): lomo-clip now / device (saved gradients kept on the GPU) / inflight16, without saved
#           gradients, and lomo, twice, alternating
#   run 36: part ab: PROFILE=1 branch_ab.py (torch.profiler over 4 timed steps): lomo-clip now / device / without
#           saved gradients: the CUDA runtime calls' CPU, each pass's main-stream busy time and its copies
#   run 37: part ac: change 29 (the first GiB of saved branch gradients kept on the GPU): its GPU tests; lomo-clip
#           with the default (1 GiB: all of them at 4 x 512), 0.5 GiB, 0 (all in host memory), without saved
#           gradients, and lomo, twice, alternating; lomo-clip at 16 x 1024 under the 24 GB cap
#   run 38: part ad: change 30 (a clipped step decided on the device: no host sync between the passes) and the
#           review fixes of change 29: their GPU tests; lomo-clip with it and with --no-fused-kernel (which
#           waits for the norm, as before), lomo, twice, alternating; lomo-clip at 16 x 1024 under 24 GB
#   run 39: part ae: the session's final build (change 29 with its review fixes; change 30 reverted): the whole
#           test suite on the GPU machine, then bench.py lomo and lomo-clip (the README's command)
#   run 40: part af: 8 of run 39's failed multi-process tests, after the harness hid the GPUs from the ranks
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(a)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/run.log"
B="python3 bench.py --model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 30"
for part in "${parts[@]}"; do
  case $part in
  a)
python3 -m pytest -q tests/test_lomo.py -k "rounded or error_inside or alive" >> "$OUT/run.log" 2>&1
python3 results/eager-gap/gap_ab.py 4 "sgd (foreach);hook: add_;LOMO before;LOMO;sgd, offloaded;LOMO before, offloaded;LOMO, offloaded" 2>&1 \
  | grep -v -i warn >> "$OUT/run.log"
$B --modes lomo,sgd --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --offload-checkpoints --modes lomo,sgd --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --compile --modes lomo,sgd,lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  b)
V="sgd (foreach);hook: add_;LOMO;LOMO, check_finite=False"
python3 -m pytest -q tests/test_lomo.py -k "rounded or without_checks" >> "$OUT/run.log" 2>&1
python3 results/eager-gap/gap_ab.py 4 "$V" 2>&1 | grep -v -i warn >> "$OUT/run.log"
python3 results/eager-gap/gap_ab.py 4 "$V" --compile 2>&1 | grep -v -i warn >> "$OUT/run.log"
for extra in "" "--compile"; do
  $B $extra --no-finite-checks --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
  $B $extra --modes sgd,lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
done ;;
  c)
$B --modes infer,lomo,lomo-clip,sgd,hook-sgd --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --no-finite-checks --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --offload-checkpoints --modes lomo,lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --offload-checkpoints --no-finite-checks --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  d)
V="sgd (foreach);hook: norm + add_, sync after backward;LOMO before;LOMO;LOMO, check_finite=False"
python3 -m pytest -q tests/test_lomo.py -k "rounded or nan_loss or without_checks" >> "$OUT/run.log" 2>&1
python3 results/eager-gap/gap_ab.py 4 "$V" --compile 2>&1 | grep -v -i warn >> "$OUT/run.log"
python3 results/eager-gap/gap_ab.py 4 "$V" 2>&1 | grep -v -i warn >> "$OUT/run.log" ;;
  e)
V="sgd (foreach);LOMO before;LOMO;LOMO, check_finite=False"
python3 -m pytest -q tests/test_lomo.py >> "$OUT/run.log" 2>&1
python3 results/eager-gap/gap_ab.py 4 "$V" --compile 2>&1 | grep -v -i warn >> "$OUT/run.log"
python3 results/eager-gap/gap_ab.py 4 "$V" 2>&1 | grep -v -i warn >> "$OUT/run.log" ;;
  f)
for extra in "" "--compile"; do
  $B $extra --modes sgd,lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
  $B $extra --no-finite-checks --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
done ;;
  g)
V="sgd (foreach);hook: add_;hook: norm + add_, no sync;hook: compiled add+norm, no sync;LOMO"
python3 results/eager-gap/fused_probe.py 2>&1 | grep -v -i warn >> "$OUT/run.log"
python3 results/eager-gap/gap_ab.py 4 "$V" --compile 2>&1 | grep -v -i warn >> "$OUT/run.log"
python3 results/eager-gap/gap_ab.py 3 "$V" 2>&1 | grep -v -i warn >> "$OUT/run.log" ;;
  h)
python3 -m pytest -q tests/test_fused_update.py >> "$OUT/run.log" 2>&1 || { echo "tests failed" >> "$OUT/run.log"; exit 1; }
$B --modes infer,lomo,lomo-clip,sgd,hook-sgd --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --no-finite-checks --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --no-fused-kernel --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --offload-checkpoints --modes lomo,lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --offload-checkpoints --no-finite-checks --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  i)
$B --compile --modes sgd,lomo,lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --compile --no-finite-checks --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --compile --no-fused-kernel --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  j)
V="sgd (foreach);hook: add_;hook: triton kernel, no sync;LOMO;LOMO, fused_kernel=False;LOMO, check_finite=False"
python3 -m pytest -q tests/test_fused_update.py tests/test_lomo.py >> "$OUT/run.log" 2>&1 \
  || { echo "tests failed: no benchmark" >> "$OUT/run.log"; exit 1; }
python3 -m pytest -q tests/test_train.py -k "finite or gradient_norm or resume" >> "$OUT/run.log" 2>&1
python3 train.py --model 7B --dtype bf16 --activation-checkpointing --batch-size 4 --seq-len 512 --steps 20 \
  --eval-every 1000 --eval-batches 1 --sample-tokens 1 --lr 1e-6 --device cuda --data data/botchan.txt \
  --out /tmp/runs/train-7b > "$OUT/train-7b.log" 2>&1; tail -4 "$OUT/train-7b.log" >> "$OUT/run.log"
python3 results/eager-gap/fused_probe.py 2>&1 | grep -v -i warn >> "$OUT/run.log"
python3 results/eager-gap/gap_ab.py 3 "$V" 2>&1 | grep -v -i warn >> "$OUT/run.log"
$B --modes sgd,lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --no-fused-kernel --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --no-finite-checks --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  k)
V="sgd (foreach);hook: add_;hook: triton kernel, no sync;LOMO;LOMO, fused_kernel=False;LOMO, check_finite=False"
python3 results/eager-gap/gap_ab.py 3 "$V" 2>&1 | grep -v -i warn >> "$OUT/run.log"
python3 results/eager-gap/gap_ab.py 3 "$V" --compile 2>&1 | grep -v -i warn >> "$OUT/run.log"
$B --compile --no-fused-kernel --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  t)
python3 -m pytest -q tests/test_fused_update.py tests/test_lomo.py >> "$OUT/run.log" 2>&1 \
  || { echo "tests failed: no benchmark" >> "$OUT/run.log"; exit 1; }
python3 -m pytest -q tests/test_train.py -k "finite or gradient_norm or resume" >> "$OUT/run.log" 2>&1 ;;
  m)
V="sgd (foreach);hook: add_;LOMO;LOMO, fused_kernel=False;LOMO, check_finite=False"
python3 results/eager-gap/gap_ab.py 3 "$V" --compile 2>&1 | grep -v -i warn >> "$OUT/run.log"
python3 results/eager-gap/gap_ab.py 3 "$V" 2>&1 | grep -v -i warn >> "$OUT/run.log" ;;
  n)
python3 -m pytest -q tests/test_fused_update.py tests/test_lomo.py >> "$OUT/run.log" 2>&1 \
  || { echo "tests failed: no benchmark" >> "$OUT/run.log"; exit 1; }
python3 results/eager-gap/launch_probe.py 2>&1 | grep -v -i warn >> "$OUT/run.log"
$B --modes sgd,lomo,sgd,lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --no-fused-kernel --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --no-finite-checks --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  o)
V="sgd (foreach);LOMO;LOMO, Triton JIT launch;LOMO, fused_kernel=False;LOMO, check_finite=False"
python3 results/eager-gap/gap_ab.py 3 "$V" 2>&1 | grep -v -i warn >> "$OUT/run.log" ;;
  p)
for i in 1 2 3 4 5; do $B --modes sgd,lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1; done
for i in 1 2; do $B --compile --modes sgd,lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1; done ;;
  q)
C="python3 bench.py --model 7B --activation-checkpointing --batch-size 1 --seq-len 16 --steps 30"
for i in 1 2; do
  $C --modes sgd,lomo,hook-sgd --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
  $C --no-fused-kernel --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
  $C --no-finite-checks --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
done ;;
  r)
python3 -m pytest -q tests/test_offload.py tests/test_fused_update.py tests/test_lomo.py >> "$OUT/run.log" 2>&1 \
  || { echo "tests failed: no benchmark" >> "$OUT/run.log"; exit 1; }
A="python3 results/eager-gap/ckpt_ab.py"
S="--model 7B --activation-checkpointing --steps 30"
for i in 1 2; do for mode in sgd lomo; do for v in before now; do
  $A $v $S --batch-size 1 --seq-len 16 --worker $mode >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"; done; done; done
for mode in sgd lomo; do for v in before now; do
  $A $v $S --batch-size 4 --seq-len 512 --worker $mode >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"; done; done
$B --modes lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --offload-checkpoints --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  s)
A="python3 results/eager-gap/ckpt_ab.py"
S="--model 7B --activation-checkpointing --steps 30 --batch-size 4 --seq-len 512"
for run in "now sgd" "now lomo" "before lomo"; do $A ${run% *} $S --compile --worker ${run#* } >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"; done
for v in before now; do $A $v $S --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"; done
$A now $S --compile --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"
for mode in sgd lomo; do $A now $S --worker $mode >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"; done ;;
  u)
python3 results/eager-gap/hook_time.py 7B cuda 2>&1 | grep -v -i warn > "$OUT/hook_time.log" ;;
  v)
for i in 1 2; do for m in sgd lomo; do $B --modes $m --out "$OUT/bench.jsonl" > /dev/null 2>> "$OUT/run.log"; done; done
$B --offload-checkpoints --modes lomo-clip --out "$OUT/bench.jsonl" > /dev/null 2>> "$OUT/run.log" ;;
  af)
timeout 230 python3 -m pytest -q tests/test_launch.py tests/test_losses.py tests/test_shard.py \
  -k "primitives or torn or dp2 or two_node or tensor_parallel or 2-2-None or all_reduces" >> "$OUT/run.log" 2>&1 ;;
  ae)
timeout 420 python3 -m pytest -q tests/ >> "$OUT/run.log" 2>&1 || echo "tests: rc $?" >> "$OUT/run.log"
$B --modes lomo,lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  ad)
python3 -m pytest -q tests/test_fused_update.py tests/test_saved_branch_grads.py tests/test_lomo.py >> "$OUT/run.log" 2>&1 \
  || { echo "tests failed: no benchmark" >> "$OUT/run.log"; exit 1; }
A="python3 results/eager-gap/branch_ab.py now"
S="--model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 30"
for i in 1 2; do
  $A $S --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"
  $A $S --no-fused-kernel --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"
  $A $S --worker lomo >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"
done
L="--model 7B --activation-checkpointing --batch-size 16 --seq-len 1024 --steps 5 --memory-cap-gb 24"
$A $L --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log" ;;
  ac)
python3 -m pytest -q tests/test_saved_branch_grads.py >> "$OUT/run.log" 2>&1 \
  || { echo "tests failed: no benchmark" >> "$OUT/run.log"; exit 1; }
A="python3 results/eager-gap/branch_ab.py now"
S="--model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 30"
for i in 1 2; do
  for g in 1 0.5 0; do $A $S --branch-grads-gpu-gib $g --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"; done
  $A $S --no-saved-branch-grads --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"
  $A $S --worker lomo >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"
done
L="--model 7B --activation-checkpointing --batch-size 16 --seq-len 1024 --steps 5 --memory-cap-gb 24"
$A $L --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log" ;;
  ab)
A="python3 results/eager-gap/branch_ab.py"
S="--model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 4 --warmup 3"
for v in now device; do PROFILE=1 $A $v $S --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"; done
PROFILE=1 $A now $S --no-saved-branch-grads --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"
gzip "$OUT"/trace-*.json ;;
  aa)
A="python3 results/eager-gap/branch_ab.py"
S="--model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 30"
for i in 1 2; do
  for v in now device inflight16; do $A $v $S --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"; done
  $A now $S --no-saved-branch-grads --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"
  $A now $S --worker lomo >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"
done ;;
  z)
python3 -m pytest -q tests/test_saved_branch_grads.py >> "$OUT/run.log" 2>&1 \
  || { echo "tests failed: no benchmark" >> "$OUT/run.log"; exit 1; }
A="python3 results/eager-gap/branch_ab.py"
S="--model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 30"
for i in 1 2; do for v in now unbounded; do
  $A $v $S --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"; done; done
$A now $S --worker lomo >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"
L="--model 7B --activation-checkpointing --batch-size 16 --seq-len 1024 --steps 5 --memory-cap-gb 24"
for v in now unbounded; do $A $v $L --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"; done ;;
  y)
A="python3 results/eager-gap/branch_ab.py"
S="--model 7B --activation-checkpointing --batch-size 4 --seq-len 512 --steps 30"
for i in 1 2; do for v in now early wait early+wait; do
  $A $v $S --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"; done; done
$A now $S --no-saved-branch-grads --worker lomo-clip >> "$OUT/ab.jsonl" 2>> "$OUT/run.log"
$A now $S --worker lomo >> "$OUT/ab.jsonl" 2>> "$OUT/run.log" ;;
  x)
python3 -m pytest -q tests/test_saved_branch_grads.py tests/test_offload.py tests/test_gram_norm.py >> "$OUT/run.log" 2>&1 \
  || { echo "tests failed: no benchmark" >> "$OUT/run.log"; exit 1; }
$B --modes lomo,lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
for i in 1 2; do
  $B --no-saved-branch-grads --modes lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
  $B --modes lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
done
$B --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --offload-checkpoints --modes lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --offload-checkpoints --no-saved-branch-grads --modes lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
python3 bench.py --model 7B --activation-checkpointing --batch-size 16 --seq-len 1024 --steps 5 --memory-cap-gb 24 \
  --modes lomo,lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  w)
python3 -m pytest -q tests/test_fused_update.py tests/test_lomo.py tests/test_offload.py >> "$OUT/run.log" 2>&1 \
  || { echo "tests failed: no benchmark" >> "$OUT/run.log"; exit 1; }
$B --modes infer,sgd,lomo,lomo-clip,hook-sgd --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --no-finite-checks --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --no-fused-kernel --modes lomo --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1
$B --offload-checkpoints --modes lomo,lomo-clip --out "$OUT/bench.jsonl" >> "$OUT/run.log" 2>&1 ;;
  esac
done
