"""Where a 7B step's time goes: variants timed in one process on one GPU, then a profiler table.

It compares with the LOMO of before this change, `lomo_old.py` beside this file: make it with
`git show 51f676f:lomo.py > results/bench-h100-fused/lomo_old.py`. Run: python3 results/bench-h100-fused/profile_step.py 32 --compile
"""
import sys, time, json, os
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from losses import model_loss
from model import model_args, compile_blocks, cross_entropy_loss
from shard import build_model, init_distributed
import lomo as lomo_new
import lomo_old

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
grid = init_distributed(1, "cuda")
margs = model_args("7B", n_layers=layers)
model = build_model(margs, grid, seed=0, dtype=torch.bfloat16, init=False)
with torch.no_grad():
    for n, p in model.named_parameters():
        p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0, 0.02)
model.activation_checkpointing = True
tok = torch.randint(0, 32000, (4, 513), device="cuda")
x, y = tok[:, :-1], tok[:, 1:]
params = list(model.parameters())
lr = 1e-6


def timed(name, step, n=5, warm=2):
    for _ in range(warm):
        step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    s = (time.perf_counter() - t) / n
    print(json.dumps(dict(variant=name, layers=layers, ms=round(s * 1e3, 1), tok_s=round(2048 / s),
                          peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))), flush=True)


def with_hooks(fn):
    hs = [p.register_post_accumulate_grad_hook(fn) for p in params]
    return hs


def drop(p):
    p.grad = None


def sgd_hook(p):
    p.add_(p.grad, alpha=-lr); p.grad = None


with torch.no_grad():
    timed("forward fused loss (no_grad)", lambda: model_loss(model, x, y))
    timed("forward logits + CE (no_grad)", lambda: cross_entropy_loss(model(x), y))
hs = with_hooks(drop)
timed("backward, grads dropped (fused loss)", lambda: model_loss(model, x, y).backward())
timed("backward, grads dropped (logits loss)", lambda: cross_entropy_loss(model(x), y).backward())
[h.remove() for h in hs]
hs = with_hooks(sgd_hook)
timed("hook: p.add_(g) (fused loss)", lambda: model_loss(model, x, y).backward())
[h.remove() for h in hs]
opt = torch.optim.SGD(params, lr=lr)
def sgd_step():
    model_loss(model, x, y).backward(); opt.step(); opt.zero_grad(set_to_none=True)
timed("torch SGD (fused loss)", sgd_step)
del opt
L = lomo_new.LOMO(model, lr=lr)
timed("LOMO new (norm in hook)", lambda: L.step(model_loss(model, x, y)))
L.remove_hooks()
L = lomo_old.LOMO(model, lr=lr)
timed("LOMO old (isfinite+masked_fill)", lambda: L.step(model_loss(model, x, y)))
L.remove_hooks()
L = lomo_new.LOMO(model, lr=lr, clip_grad_norm=1.0)
timed("LOMO new clip", lambda: L.step(model_loss(model, x, y)))
L.remove_hooks()
L = lomo_new.LOMO(model, lr=lr)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(2):
        L.step(model_loss(model, x, y))
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
L.remove_hooks()
if "--compile" in sys.argv:
    compile_blocks(model)
    L = lomo_new.LOMO(model, lr=lr)
    timed("LOMO new + compiled blocks", lambda: L.step(model_loss(model, x, y)), warm=3)
    with torch.no_grad():
        timed("forward fused loss, compiled (no_grad)", lambda: model_loss(model, x, y))
