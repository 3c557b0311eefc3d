"""Where the CPU of an eager LOMO step goes, against SGD's: 7B, bf16, checkpointing, 1 x 16 tokens on one GPU
(so the GPU keeps up and the times are the CPU's). Each step starts after a sync and is timed on the host
clock, split into: time inside LOMO's hooks (and inside fused_update's launch, a part of it), the rest of
LOMO's step; for SGD, backward and optimizer.step; and a bare forward + backward with no optimizer at all.
Run: python3 results/eager-gap/hook_time.py [model name, default 7B] [device, default cuda]"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402

import fused_update  # noqa: E402
import model as M  # noqa: E402
from bench import random_model  # noqa: E402
from lomo import LOMO  # noqa: E402
from losses import model_loss  # noqa: E402
from shard import init_distributed  # noqa: E402

name = sys.argv[1] if len(sys.argv) > 1 else "7B"
device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
args = M.model_args(name, **({"vocab_size": 512} if name == "tiny" else {}))
model = random_model(args, init_distributed(1, device), torch.bfloat16)
model.activation_checkpointing = True
tokens = torch.randint(0, args.vocab_size, (1, 17), device=device)
x, y = tokens[:, :-1], tokens[:, 1:]
spent = dict(hooks=0.0, launch=0.0, calls=0)

lomo = LOMO(model, lr=1e-6)
lomo.remove_hooks()
launch = fused_update.update_and_sum_squares


def timed_launch(*a):
    t = time.perf_counter()
    launch(*a)
    spent["launch"] += time.perf_counter() - t


def timed_hook(param):
    t = time.perf_counter()
    lomo._hook(param)
    spent["hooks"] += time.perf_counter() - t
    spent["calls"] += 1


fused_update.update_and_sum_squares = timed_launch
handles = [p.register_post_accumulate_grad_hook(timed_hook) for p in model.parameters() if p.dim() > 1]


def lomo_step():
    lomo.step(model_loss(model, x, y))


def bare_step():  # forward and backward, no hook: what every mode pays
    model_loss(model, x, y).backward()
    model.zero_grad(set_to_none=True)


optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, foreach=True)
split = {}


def sgd_step():
    t = time.perf_counter()
    model_loss(model, x, y).backward()
    split["backward"] = time.perf_counter() - t
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(step, n=12):
    rows = []
    for i in range(n + 3):
        sync()
        spent.update(hooks=0.0, launch=0.0, calls=0)
        split.clear()
        t = time.perf_counter()
        step()
        total = time.perf_counter() - t
        if i >= 3:
            rows.append((total * 1e3, spent["hooks"] * 1e3, spent["launch"] * 1e3, spent["calls"],
                         split.get("backward", 0.0) * 1e3))
    sync()
    return [statistics.median(column) for column in zip(*rows)]


for rnd in range(2):
    for label, step in (("bare fwd+bwd", bare_step), ("lomo", lomo_step), ("sgd", sgd_step)):
        if label == "lomo":
            for h in handles:
                h.remove()
            handles = [p.register_post_accumulate_grad_hook(timed_hook) for p in model.parameters() if p.dim() > 1]
        else:
            for h in handles:
                h.remove()
            handles = []
        total, hooks, launches, calls, backward = measure(step)
        print(f"round {rnd} {label:13s} step {total:7.1f} ms  in hooks {hooks:6.1f} ms ({calls} calls, "
              f"{hooks / max(calls, 1) * 1e3:5.1f} us each; kernel launch {launches:5.1f} ms)  sgd backward "
              f"{backward:6.1f} ms", flush=True)
print(torch.cuda.get_device_name() if device == "cuda" else "cpu", torch.__version__)
