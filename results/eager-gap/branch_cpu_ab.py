"""Change 28's CPU cost, on the CPU: a 16-block tiny bf16 model at 1 x 8 tokens, where a step is nearly all
the CPU work of issuing it (Python, autograd, hooks), lomo-clip with the saved branch gradients against both
passes in full, alternating rounds of 15 steps (median step per round). No CUDA stream or event call runs
here, so the GPU-only part of the path (side-stream copies, events, the bounded waits) is not in it.
Run: python results/eager-gap/branch_cpu_ab.py"""
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import torch  # noqa: E402

from conftest import loss_of, tiny_model  # noqa: E402
from lomo import LOMO  # noqa: E402

torch.set_num_threads(1)
tokens = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(0))
batch = tokens[:, :-1], tokens[:, 1:]
res = {True: [], False: []}
models = {}
for reuse in (True, False):
    m = tiny_model(dtype=torch.bfloat16, n_layers=16); m.activation_checkpointing = True
    models[reuse] = (m, LOMO(m, lr=1e-6, clip_grad_norm=1.0, saved_branch_grads=reuse))
for rnd in range(6):
    for reuse in (True, False):
        m, lomo = models[reuse]
        for _ in range(3): lomo.step(loss_of(m, batch))
        ts = []
        for _ in range(15):
            t = time.perf_counter(); lomo.step(loss_of(m, batch)); ts.append(time.perf_counter() - t)
        res[reuse].append(statistics.median(ts) * 1e3)
for reuse in (True, False):
    print("saved" if reuse else "full ", [round(x, 1) for x in res[reuse]], "median", round(statistics.median(res[reuse]), 1), "ms")
