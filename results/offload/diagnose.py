"""7B LOMO step at 4 x 512 on one GPU, checkpointed inputs on the GPU vs in host memory (offload.py):
step times interleaved in one process, what is alive at each peak (allocator trace replayed), and a
profiler table of each. Run from anywhere: python3 results/offload/diagnose.py"""
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from step7b import REPO, loss, lomo, model  # noqa: E402


def step():
    lomo.step(loss())


def infer():
    with torch.no_grad():
        loss()


def where(frames):
    ours = [f for f in frames if f["filename"].startswith(REPO) and not f["filename"].endswith(("diagnose.py", "step7b.py"))]
    f = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"


def peak_contents(fn, label):
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=300000)
    # Without early stop: with it, torch.utils.checkpoint ends a block's recomputation by raising from a
    # saved-tensor hook, which inside an autograd Function (model.swiglu_down) while the allocator records
    # Python stacks ends in "SystemError: ... returned NULL without setting an exception" (torch 2.11).
    # The recomputation then also runs the block's last residual add (16 MiB, freed at once).
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        fn()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, cur, best, best_live = {}, 0, -1, None
    for e in snap["device_traces"][0]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], where(e.get("frames", [])))
            cur += e["size"]
            if cur > best:
                best, best_live = cur, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
    print(f"\n== {label}: allocated before {base / 2**30:.3f} GiB, peak {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB, "
          f"{best / 2**20:.1f} MiB above the start")
    groups = collections.Counter()
    for size, w in best_live.values():
        groups[w] += size
    for w, size in groups.most_common(20):
        print(f"{size / 2**20:9.1f} MiB  {w}")


def timed(n=5):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


for offload in (False, True):
    model.offload_checkpoints = offload
    step()
print("ms per LOMO step, interleaved:")
for rep in range(3):
    for offload in (False, True):
        model.offload_checkpoints = offload
        print(f"  offload={offload}: {timed():.1f}")
peak_contents(infer, "infer (no_grad, fused loss)")
for offload in (False, True):
    model.offload_checkpoints = offload
    peak_contents(step, f"LOMO step, offload={offload}")
from torch.profiler import ProfilerActivity, profile  # noqa: E402
for offload in (False, True):
    model.offload_checkpoints = offload
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"\n== profile, offload={offload}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))
