"""A/B in one process: LOMO's gradient norms on the main stream vs a side stream; bare hook for reference."""
import sys, time, json, os
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # the repository root
import torch
import model as M
from losses import model_loss
from shard import build_model, init_distributed
from lomo import LOMO

grid = init_distributed(1, "cuda")
model = build_model(M.model_args("7B"), grid, seed=0, dtype=torch.bfloat16, init=False)
with torch.no_grad():
    for n, p in model.named_parameters():
        p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0, 0.02)
model.activation_checkpointing = True
tok = torch.randint(0, 32000, (4, 513), device="cuda")
x, y = tok[:, :-1], tok[:, 1:]
params = list(model.parameters())

def timed(name, step, n=10, warm=2):
    for _ in range(warm):
        step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    s = (time.perf_counter() - t) / n
    print(json.dumps(dict(variant=name, ms=round(s * 1e3, 1), tok_s=round(2048 / s),
                          peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3))), flush=True)

def hook_add(p):
    p.add_(p.grad, alpha=-1e-6); p.grad = None

opt = torch.optim.SGD(params, lr=1e-6)
def sgd_step():
    model_loss(model, x, y).backward(); opt.step(); opt.zero_grad(set_to_none=True)

for rep in range(3):
    hs = [p.register_post_accumulate_grad_hook(hook_add) for p in params]
    timed("hook add_", lambda: model_loss(model, x, y).backward())
    [h.remove() for h in hs]
    timed("torch SGD", sgd_step)
    for side in (False, True):
        LOMO.norm_on_side_stream = side
        for clip in (None, 1.0):
            L = LOMO(model, lr=1e-6, clip_grad_norm=clip)
            r = None
            def step():
                global r
                r = L.step(model_loss(model, x, y))
            timed(f"LOMO{' clip' if clip else ''} side_stream={side}", step)
            print("   grad_norm", r.grad_norm)
            L.remove_hooks()
