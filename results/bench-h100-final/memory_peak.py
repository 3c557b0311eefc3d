"""Which allocations are alive at the peak of a 7B LOMO step (allocator trace replayed)."""
import sys, os, collections
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # the repository root
import torch
import model as M
from losses import model_loss
from shard import build_model, init_distributed
from lomo import LOMO

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository root
grid = init_distributed(1, "cuda")
model = build_model(M.model_args("7B"), grid, seed=0, dtype=torch.bfloat16, init=False)
with torch.no_grad():
    for n, p in model.named_parameters():
        p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0, 0.02)
model.activation_checkpointing = True
tok = torch.randint(0, 32000, (4, 513), device="cuda")
x, y = tok[:, :-1], tok[:, 1:]
L = LOMO(model, lr=1e-6)
L.step(model_loss(model, x, y)); torch.cuda.synchronize()
base = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
torch.cuda.memory._record_memory_history(max_entries=200000)
L.step(model_loss(model, x, y)); torch.cuda.synchronize()
snap = torch.cuda.memory._snapshot()
torch.cuda.memory._record_memory_history(enabled=None)
print("base GiB", base / 2**30, "peak GiB", torch.cuda.max_memory_allocated() / 2**30)
live, cur, best, best_live = {}, 0, -1, None
def where(frames):
    ours = [f for f in frames if f["filename"].startswith(REPO)]
    f = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"
for e in snap["device_traces"][0]:
    if e["action"] == "alloc":
        live[e["addr"]] = (e["size"], where(e.get("frames", [])))
        cur += e["size"]
        if cur > best:
            best, best_live = cur, dict(live)
    elif e["action"] in ("free_completed",):
        if e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
print("peak above the step's start, MiB:", best / 2**20)
groups = collections.Counter()
for size, w in best_live.values():
    groups[w] += size
for w, size in groups.most_common(25):
    print(f"{size / 2**20:9.1f} MiB  {w}")
