"""Does inductor make one kernel of `p += alpha * g` and `sum(g**2)` (one read of g), and how long do the
separate eager kernels take against it? One 11008 x 4096 bf16 matrix (a 7B MLP weight), on one GPU.
Run 13 adds fused_update.py's Triton kernel (one kernel, one read of g) and the update alone (add_).
Run: python3 results/eager-gap/fused_probe.py"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile


@torch.compile(fullgraph=True)
def add_and_square_sum(p, g, alpha):
    g32 = g.float()
    p.copy_((p.float() + alpha * g32).to(p.dtype))
    return g32.square().sum()


def eager(p, g, alpha):
    norm = torch.linalg.vector_norm(g, dtype=torch.float32)
    p.add_(g, alpha=alpha)
    return norm


p = torch.randn(11008, 4096, device="cuda", dtype=torch.bfloat16)
g = torch.randn_like(p)
alpha = torch.full((), -1e-3, device="cuda")
reference = p.clone()
reference.add_(g, alpha=-1e-3)
fused = p.clone()
square_sum = add_and_square_sum(fused, g, alpha)
print("fused update equal to eager add_:", torch.equal(fused, reference),
      "max abs diff", (fused.float() - reference.float()).abs().max().item(),
      "norm", square_sum.sqrt().item(), "vs", torch.linalg.vector_norm(g, dtype=torch.float32).item())
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fused_update  # noqa: E402

slots = fused_update.new_slots("cuda")
apply = torch.ones((), dtype=torch.uint8, device="cuda")
triton_updated = p.clone()
fused_update.update_and_sum_squares(triton_updated, g, -1e-3, slots, apply)
print("triton update equal to eager add_:", torch.equal(triton_updated, reference),
      "norm", slots.sum().sqrt().item(), "vs float64", g.double().square().sum().sqrt().item())


def triton_kernel(p, g, a):
    fused_update.update_and_sum_squares(p, g, a, slots, apply)


def add_only(p, g, a):
    p.add_(g, alpha=a)


for name, fn, a in (("eager norm + add_", eager, -1e-3), ("compiled add+norm", add_and_square_sum, alpha),
                    ("triton kernel", triton_kernel, -1e-3), ("add_ alone", add_only, -1e-3)):
    for _ in range(3):
        fn(p, g, a)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn(p, g, a)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names = sorted({e.name[:60] for e in kernels})
    print(f"{name:20s} {sum(e.device_time for e in kernels) / 20:8.1f} us per call, "
          f"{len(kernels) / 20:.0f} kernels: {names}")
