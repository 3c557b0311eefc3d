"""7B LOMO step at tp=2 (torchrun): timing, then rank 0's profiler table."""
import sys, time, json, os
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # the repository root
import torch
import torch.distributed as dist
import model as M
from losses import model_loss
from shard import build_model, init_distributed
from lomo import LOMO

grid = init_distributed(int(os.environ.get("WORLD_SIZE", 1)), "cuda")
model = build_model(M.model_args("7B"), grid, seed=0, dtype=torch.bfloat16, init=False)
with torch.no_grad():
    for n, p in model.named_parameters():
        p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0, 0.02)
model.activation_checkpointing = True
g = torch.Generator().manual_seed(0)
tok = torch.randint(0, 32000, (4, 513), generator=g).cuda()
x, y = tok[:, :-1], tok[:, 1:]
COMPILE = "--compile" in sys.argv
if COMPILE:
    M.compile_blocks(model)
L = LOMO(model, lr=1e-6, tp_group=grid.tp_group)

def timed(name, step, n=6, warm=2):
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    if grid.tp > 1: dist.barrier()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    s = (time.perf_counter() - t) / n
    if grid.is_main:
        print(json.dumps(dict(variant=name, tp=grid.tp, ms=round(s * 1e3, 1), tok_per_gpu_s=round(2048 / s / grid.tp))), flush=True)

timed(f"LOMO{' compiled' if COMPILE else ''} {os.environ.get('NCCL_PROTO', '')}", lambda: L.step(model_loss(model, x, y)))
with torch.no_grad():
    timed("forward (no_grad)", lambda: model_loss(model, x, y))
if "--profile" not in sys.argv:
    sys.exit(0)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    L.step(model_loss(model, x, y)); torch.cuda.synchronize()
if grid.is_main:
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
if grid.tp > 1: dist.destroy_process_group()
