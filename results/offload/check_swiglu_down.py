"""On a GPU: model.swiglu_down against autograd's F.linear(F.silu(gate) * up, w2) at 7B's feed-forward shape
(4 x 512 tokens, bf16): outputs and gradients bit for bit, and the memory each backward allocates above
what existed before it (the saved tensors, the incoming gradient). Run from anywhere:
python3 results/offload/check_swiglu_down.py"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import swiglu_down  # noqa: E402

tokens, dim, hidden = 4 * 512, 4096, 11008
gen = torch.Generator(device="cuda").manual_seed(0)
gate0, up0 = (torch.randn(4, 512, hidden, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
weight0 = (torch.randn(dim, hidden, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02)
grad = torch.randn(4, 512, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
variants = {
    "autograd": lambda g, u, w: F.linear(F.silu(g) * u, w),
    "swiglu_down": lambda g, u, w: swiglu_down(g, u, w, False),
    "swiglu_down checkpointed": lambda g, u, w: swiglu_down(g, u, w, True),
}
results = {}
for name, fn in variants.items():
    a, b = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
    w = weight0.clone().requires_grad_()
    out = fn(a * 1, b * 1, w)  # through one op, as w1/w3's outputs are
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward(grad)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - before) / 2**20
    results[name] = (out, a.grad, b.grad, w.grad)
    print(f"{name:26s} backward peak {extra:7.1f} MiB above its start (w2's gradient alone: {dim * hidden * 2 / 2**20:.0f})")
    del out, a, b, w
reference = results["autograd"]
for name in ("swiglu_down", "swiglu_down checkpointed"):
    same = [torch.equal(x, y) for x, y in zip(results[name], reference)]
    print(f"{name:26s} equal to autograd (output, grad gate, grad up, grad w2): {same}")
print(torch.cuda.get_device_name(), torch.__version__)
