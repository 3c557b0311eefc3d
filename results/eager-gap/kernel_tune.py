"""fused_update.py's kernel against `add_` alone (the update with no norm) on the 7B shapes, for each
block size, warps per program and number of programs (slots), timed by CUDA events; and the CPU time of
one launch of each (the hooks run ~220 times a step, and a compiled step is nearly CPU-bound).
Run: python3 results/eager-gap/kernel_tune.py"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fused_update  # noqa: E402

SHAPES = {"wq 4096x4096": (4096, 4096), "w1 11008x4096": (11008, 4096), "embedding 32000x4096": (32000, 4096)}
COUNTS = {"wq 4096x4096": 128, "w1 11008x4096": 96, "embedding 32000x4096": 2}  # per 7B step


def gpu_us(fn, reps=50):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def cpu_us(fn, reps=2000):
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - started
    torch.cuda.synchronize()
    return elapsed * 1e6 / reps


slots = torch.zeros(65536, device="cuda")
apply = torch.ones((), dtype=torch.uint8, device="cuda")
tensors = {name: (torch.randn(shape, device="cuda", dtype=torch.bfloat16),
                  torch.randn(shape, device="cuda", dtype=torch.bfloat16)) for name, shape in SHAPES.items()}
configs = [(block, warps, programs) for block in (1024, 2048, 4096, 8192) for warps in (4, 8)
           for programs in (528, 1024, 2048, None)]
totals = {}
baseline = 0.0
for name, (p, g) in tensors.items():
    add_time = gpu_us(lambda: p.add_(g, alpha=-1e-6))
    baseline += add_time * COUNTS[name]
    print(f"{name:22s} add_ alone {add_time:7.1f} us")
    for block, warps, programs in configs:
        fused_update.BLOCK, fused_update.NUM_WARPS = block, warps
        fused_update.NUM_SLOTS = programs or 65536
        t = gpu_us(lambda: fused_update.update_and_sum_squares(p, g, -1e-6, slots, apply))
        totals[(block, warps, programs)] = totals.get((block, warps, programs), 0.0) + t * COUNTS[name]
print(f"per 7B step: add_ alone {baseline / 1000:.2f} ms")
for config, total in sorted(totals.items(), key=lambda kv: kv[1])[:8]:
    print(f"per 7B step: kernel block {config[0]}, warps {config[1]}, programs {config[2] or 'all blocks'}: "
          f"{total / 1000:.2f} ms (+{(total - baseline) / 1000:.2f})")
fused_update.BLOCK, fused_update.NUM_WARPS, fused_update.NUM_SLOTS = 4096, 8, 1024
p, g = torch.randn(4096, device="cuda", dtype=torch.bfloat16), torch.randn(4096, device="cuda", dtype=torch.bfloat16)
n = torch.zeros((), device="cuda")
print(f"CPU per launch: add_ {cpu_us(lambda: p.add_(g, alpha=-1e-6)):.1f} us, "
      f"vector_norm {cpu_us(lambda: torch.linalg.vector_norm(g, dtype=torch.float32)):.1f} us, "
      f"kernel {cpu_us(lambda: fused_update.update_and_sum_squares(p, g, -1e-6, slots, apply)):.1f} us")
