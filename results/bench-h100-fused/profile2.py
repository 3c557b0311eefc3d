"""LOMO variants on one GPU: norm kernel change, rotary real vs complex, eager vs compiled."""
import sys, time, json, os
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # the repository root
import torch
import model as M
from losses import model_loss
from shard import build_model, init_distributed
from lomo import LOMO

def apply_rotary_real(x, cos, sin):
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)

grid = init_distributed(1, "cuda")
margs = M.model_args("7B")
model = build_model(margs, grid, seed=0, dtype=torch.bfloat16, init=False)
with torch.no_grad():
    for n, p in model.named_parameters():
        p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0, 0.02)
model.activation_checkpointing = True
tok = torch.randint(0, 32000, (4, 513), device="cuda")
x, y = tok[:, :-1], tok[:, 1:]
params = list(model.parameters())

def timed(name, step, n=6, warm=2):
    for _ in range(warm):
        step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    s = (time.perf_counter() - t) / n
    print(json.dumps(dict(variant=name, ms=round(s * 1e3, 1), tok_s=round(2048 / s),
                          peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))), flush=True)

def drop(p):
    p.add_(p.grad, alpha=-1e-6); p.grad = None

opt = torch.optim.SGD(params, lr=1e-6)
def sgd_step():
    model_loss(model, x, y).backward(); opt.step(); opt.zero_grad(set_to_none=True)

for rotary in ("complex", "real"):
    if rotary == "real":
        M.apply_rotary = apply_rotary_real
    hs = [p.register_post_accumulate_grad_hook(drop) for p in params]
    timed(f"{rotary}: hook p.add_", lambda: model_loss(model, x, y).backward())
    [h.remove() for h in hs]
    timed(f"{rotary}: torch SGD", sgd_step)
    L = LOMO(model, lr=1e-6)
    timed(f"{rotary}: LOMO", lambda: L.step(model_loss(model, x, y)))
    L.remove_hooks()
    L = LOMO(model, lr=1e-6, clip_grad_norm=1.0)
    timed(f"{rotary}: LOMO clip", lambda: L.step(model_loss(model, x, y)))
    L.remove_hooks()
# compiled, real rotary (inductor cannot generate complex kernels)
M.compile_blocks(model)
L = LOMO(model, lr=1e-6)
timed("real+compile: LOMO", lambda: L.step(model_loss(model, x, y)), warm=3)
L.remove_hooks()
timed("real+compile: torch SGD", sgd_step, warm=2)
L = LOMO(model, lr=1e-6, clip_grad_norm=1.0)
timed("real+compile: LOMO clip", lambda: L.step(model_loss(model, x, y)), warm=2)
