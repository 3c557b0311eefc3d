"""lomo-clip with and without Gram norms (gram_norm.py), against one-pass LOMO: 7B at 4 x 512 on one GPU,
bf16, checkpointing, step times interleaved in one process (one model), checkpointed inputs on the GPU and
offloaded. Also the global norm each way reports on the same weights (lr 1e-6: they barely move).
Run from anywhere: python3 results/gram-norm/clip_ab.py"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "offload"))
import torch  # noqa: E402

from step7b import loss, lomo, model  # noqa: E402


def configure(clip, grams, offload):
    lomo.clip_grad_norm = 1.0 if clip else None
    lomo._gram_norms = clip and grams
    for layer in lomo._gram_layers:
        layer.gram_norm = lomo._gram_norms
    lomo._gram_weights = {id(layer.weight) for layer in lomo._gram_layers if layer.gram_norm}
    model.offload_checkpoints = offload


variants = {f"{name}{' offloaded' if offload else ''}": (clip, grams, offload)
            for offload in (False, True)
            for name, clip, grams in (("lomo", False, False), ("lomo-clip grams", True, True),
                                      ("lomo-clip direct", True, False))}
norms = {}
for name, setting in variants.items():
    configure(*setting)
    norms[name] = lomo.step(loss()).grad_norm
    torch.cuda.reset_peak_memory_stats()
    lomo.step(loss())
    print(f"{name:28s} reported norm {norms[name]:.6g}   peak {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB")
times = {name: [] for name in variants}
for rep in range(4):
    for name, setting in variants.items():
        configure(*setting)
        lomo.step(loss())
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            lomo.step(loss())
        torch.cuda.synchronize()
        times[name].append((time.perf_counter() - t) / 5 * 1e3)
best = {name: min(ts) for name, ts in times.items()}
for name, ts in times.items():
    base = "lomo offloaded" if "offloaded" in name else "lomo"
    print(f"{name:28s} ms/step {' '.join(f'{t:6.1f}' for t in ts)}   best {best[name]:6.1f}  "
          f"tokens/s {2048e3 / best[name]:7.0f}  x lomo {best[base] / best[name]:.3f}")
print(torch.cuda.get_device_name(), torch.__version__)
