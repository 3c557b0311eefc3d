"""Are eager LOMO's slow steps Python's garbage collector? 7B at 4 x 512 on one GPU, bf16, checkpointing
(inputs kept on the GPU), LOMO and SGD steps interleaved in one process, with the collector as it is and
after gc.freeze() (every object alive after set-up moves to a generation that collections never scan).
Each collection's generation and duration are recorded through gc.callbacks.
Run from anywhere: python3 results/gc/gc_ab.py"""
import gc
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "offload"))
import torch  # noqa: E402

from step7b import LR, loss, lomo, model  # noqa: E402

sgd = torch.optim.SGD(model.parameters(), lr=LR, foreach=True)
pauses = []  # (generation, seconds) of each collection
_started = {}


def on_gc(phase, info):
    if phase == "start":
        _started["t"] = time.perf_counter()
    else:
        pauses.append((info["generation"], time.perf_counter() - _started["t"]))


gc.callbacks.append(on_gc)


def lomo_step():
    lomo.step(loss())


def sgd_step():
    loss().backward()
    sgd.step()
    sgd.zero_grad(set_to_none=True)


print(sys.version.split()[0], "gc thresholds", gc.get_threshold(), "tracked objects", len(gc.get_objects()))
results = {}
for rep in range(3):
    for frozen in (False, True):
        if frozen:
            gc.freeze()
        for name, fn in (("lomo", lomo_step), ("sgd", sgd_step)):
            fn()
            torch.cuda.synchronize()
            del pauses[:]
            times = []
            for _ in range(10):
                t = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1e3)
            key = f"{name}{', gc frozen' if frozen else ''}"
            results.setdefault(key, []).extend(times)
            full = [s for g, s in pauses if g == 2]
            print(f"rep {rep} {key:18s} ms/step {' '.join(f'{t:5.0f}' for t in times)}   collections "
                  f"{len(pauses)} (gen 2: {len(full)}, longest {max(full, default=0) * 1e3:.0f} ms; all: "
                  f"{sum(s for _, s in pauses) * 1e3:.0f} ms)")
        if frozen:
            gc.unfreeze()
for key, times in results.items():
    times = sorted(times)
    print(f"{key:18s} median {times[len(times) // 2]:6.1f} ms  mean {sum(times) / len(times):6.1f}  "
          f"min {times[0]:6.1f}  max {times[-1]:6.1f}")
print(torch.cuda.get_device_name(), torch.__version__)
