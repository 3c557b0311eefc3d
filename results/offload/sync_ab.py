"""Where eager LOMO's time goes against plain SGD: 7B at 4 x 512 on one GPU, step times interleaved in one
process (one model, checkpointed inputs on the GPU). Variants:
  lomo            LOMO.step as shipped
  lomo-no-sync    the same one-pass step without reading the loss before backward (no host sync mid-step)
  lomo-no-norm    ... and without the per-gradient norm
  sgd             loss.backward(), torch.optim.SGD (foreach), zero_grad(set_to_none=True)
Run from anywhere: python3 results/offload/sync_ab.py"""
import os
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)
import torch  # noqa: E402

import model as M  # noqa: E402
from lomo import LOMO  # noqa: E402
from losses import model_loss  # noqa: E402
from shard import build_model, init_distributed  # noqa: E402

grid = init_distributed(1, "cuda")
model = build_model(M.model_args("7B"), grid, seed=0, dtype=torch.bfloat16, init=False)
with torch.no_grad():
    for n, p in model.named_parameters():
        p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0, 0.02)
model.activation_checkpointing = True
tok = torch.randint(0, 32000, (4, 513), device="cuda")
x, y = tok[:, :-1], tok[:, 1:]
lr = 1e-6
lomo = LOMO(model, lr=lr)
sgd = torch.optim.SGD(model.parameters(), lr=lr, foreach=True)


def lomo_step():
    lomo.step(model_loss(model, x, y))


def one_pass_without_sync(norm=True):
    loss = model_loss(model, x, y)
    lomo._inv_scale, lomo._clip_coef, lomo._lr = 1.0, 1.0, lr
    lomo._mode, lomo._single_pass = "update", norm
    lomo._reset_norm(loss.device)
    loss.backward()
    lomo._mode = None
    lomo._global_norm(loss.detach())  # the one sync, after backward


def sgd_step():
    model_loss(model, x, y).backward()
    sgd.step()
    sgd.zero_grad(set_to_none=True)
    torch.cuda.synchronize()  # as the others, which read the loss and norm at the end


variants = {"lomo": lomo_step, "lomo-no-sync": one_pass_without_sync,
            "lomo-no-norm": lambda: one_pass_without_sync(norm=False), "sgd": sgd_step}
for fn in variants.values():
    fn()
times = {name: [] for name in variants}
for rep in range(4):
    for name, fn in variants.items():
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times[name].append((time.perf_counter() - t) / 5 * 1e3)
for name, ts in times.items():
    print(f"{name:14s} ms/step {' '.join(f'{t:6.1f}' for t in ts)}   best {min(ts):6.1f}  tokens/s {2048e3 / min(ts):7.0f}")
print(torch.cuda.get_device_name(), torch.__version__)
