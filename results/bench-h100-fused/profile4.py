"""Where LOMO's eager overhead over a bare hook goes: syncs vs norm; plus checks of the new model code on CUDA."""
import sys, time, json, os
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # the repository root
import torch, torch.nn.functional as F
import model as M
from losses import model_loss
from shard import build_model, init_distributed
from lomo import LOMO

x16 = (torch.randn(2048, 4096, device="cuda") * 3).bfloat16()
print("rms_norm bf16 == fp32-then-round on CUDA:", torch.equal(F.rms_norm(x16, (4096,), eps=1e-5),
      F.rms_norm(x16.float(), (4096,), eps=1e-5).bfloat16()))
grid = init_distributed(1, "cuda")
model = build_model(M.model_args("7B"), grid, seed=0, dtype=torch.bfloat16, init=False)
with torch.no_grad():
    for n, p in model.named_parameters():
        p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0, 0.02)
model.activation_checkpointing = True
tok = torch.randint(0, 32000, (4, 513), device="cuda")
x, y = tok[:, :-1], tok[:, 1:]
params = list(model.parameters())

def timed(name, step, n=8, warm=2):
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

def pre_sync():
    loss = model_loss(model, x, y); float(loss); loss.backward()

def post_sync():
    loss = model_loss(model, x, y); loss.backward(); loss.detach().tolist()

def both_sync():
    loss = model_loss(model, x, y); float(loss); loss.backward(); loss.detach().tolist()

with torch.no_grad():
    timed("infer fused", lambda: model_loss(model, x, y))
for rep in range(2):
    hs = [p.register_post_accumulate_grad_hook(hook_add) for p in params]
    timed("hook add_", lambda: model_loss(model, x, y).backward())
    timed("hook add_ + sync before backward", pre_sync)
    timed("hook add_ + sync after backward", post_sync)
    timed("hook add_ + both syncs", both_sync)
    [h.remove() for h in hs]
    L = LOMO(model, lr=1e-6)
    timed("LOMO", lambda: L.step(model_loss(model, x, y)))
    L.remove_hooks()
