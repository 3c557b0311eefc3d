"""How much CPU does launching fused_update.py's kernel take, through Triton's JIT (`kernel[grid](...)`) and
through the compiled kernel's own launcher (change 26), against the PyTorch ops it replaces? Each variant is
called 3000 times on a small bf16 matrix (the GPU keeps up, so the time is the CPU's) and timed on the host
clock. Also checks the direct launch is bit-identical to the JIT launch and to `add_` on a 7B MLP matrix.
Run: python3 results/eager-gap/launch_probe.py"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fused_update  # noqa: E402

print("triton", fused_update.triton.__version__, "torch", torch.__version__, torch.cuda.get_device_name())
launcher = fused_update._direct_launcher(0, torch.bfloat16)
print("direct launch checked and used:", launcher is not None)

# Bit-equality on a 7B MLP matrix: direct launch, JIT launch, add_.
p = torch.randn(11008, 4096, device="cuda").to(torch.bfloat16)
g = (torch.randn(11008, 4096, device="cuda") * 1e-2).to(torch.bfloat16)
apply = torch.ones((), dtype=torch.uint8, device="cuda")
reference = p.clone().add_(g, alpha=-0.37)
direct, jit = p.clone(), p.clone()
slots_direct, slots_jit = fused_update.new_slots("cuda"), fused_update.new_slots("cuda")
fused_update.update_and_sum_squares(direct, g, -0.37, slots_direct, apply)
numel = p.numel()
blocks = -(-numel // fused_update.BLOCK)
programs = min(fused_update.NUM_SLOTS, blocks)
fused_update._update_and_sum_squares[(programs,)](jit, g, slots_jit, apply, numel // 16, -0.37,
                                                  -(-blocks // programs), num_warps=fused_update.NUM_WARPS)
print("direct == add_:", torch.equal(direct, reference), " jit == add_:", torch.equal(jit, reference),
      " slots equal:", torch.equal(slots_direct, slots_jit),
      " norm", slots_direct.sum().sqrt().item(), "float64", g.double().square().sum().sqrt().item())

# CPU cost per call, small matrix.
p = torch.randn(64, 2048, device="cuda").to(torch.bfloat16)
g = torch.randn_like(p) * 1e-3
slots = fused_update.new_slots("cuda")
numel = p.numel()
blocks = -(-numel // fused_update.BLOCK)
programs = min(fused_update.NUM_SLOTS, blocks)
iterations = -(-blocks // programs)


def jit_launch():
    fused_update._update_and_sum_squares[(programs,)](p, g, slots, apply, numel // 16, -1e-6, iterations,
                                                      num_warps=fused_update.NUM_WARPS)


variants = {
    "triton JIT launch": jit_launch,
    "update_and_sum_squares (direct launch, with its checks)": lambda: fused_update.update_and_sum_squares(
        p, g, -1e-6, slots, apply),
    "the compiled kernel's launcher alone": lambda: launcher((programs, 1, 1))(p, g, slots, apply, numel // 16,
                                                                               -1e-6, iterations),
    "fused_update.available()": lambda: fused_update.available(p, g),
    "add_": lambda: p.add_(g, alpha=-1e-6),
    "vector_norm + add_": lambda: (torch.linalg.vector_norm(g, dtype=torch.float32), p.add_(g, alpha=-1e-6)),
}
for rnd in range(3):
    for name, call in variants.items():
        for _ in range(200):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3000):
            call()
        cpu = (time.perf_counter() - start) / 3000 * 1e6
        torch.cuda.synchronize()
        print(f"round {rnd}: {name:58s} {cpu:6.1f} us of CPU per call")
