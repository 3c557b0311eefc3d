"""A/B of LOMO's per-gradient norm recording, interleaved and repeated; profiler on the new code."""
import sys, time, json, os
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # the repository root
import torch
import model as M
from losses import model_loss
from shard import build_model, init_distributed
import lomo as LM

grid = init_distributed(1, "cuda")
model = build_model(M.model_args("7B"), grid, seed=0, dtype=torch.bfloat16, init=False)
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
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    s = (time.perf_counter() - t) / n
    print(json.dumps(dict(variant=name, ms=round(s * 1e3, 1), tok_s=round(2048 / s))), flush=True)

def record_assign(self, param, grad):
    self._norms[self._slot[param]] = torch.linalg.vector_norm(grad, dtype=torch.float32)

def record_none(self, param, grad):
    pass

original = LM.LOMO._record_norm
def hook_add(p):
    p.add_(p.grad, alpha=-1e-6); p.grad = None
for rep in range(2):
    hs = [p.register_post_accumulate_grad_hook(hook_add) for p in params]
    timed("hook p.add_", lambda: model_loss(model, x, y).backward())
    [h.remove() for h in hs]
    for name, fn in (("out=slot", original), ("assign", record_assign), ("no norm", record_none)):
        LM.LOMO._record_norm = fn
        L = LM.LOMO(model, lr=1e-6)
        timed(f"LOMO norm {name}", lambda: L.step(model_loss(model, x, y)))
        L.remove_hooks()
LM.LOMO._record_norm = original
L = LM.LOMO(model, lr=1e-6)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    L.step(model_loss(model, x, y)); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=50))
