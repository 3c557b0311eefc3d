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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from step7b import LR, loss, lomo, model  # noqa: E402

sgd = torch.optim.SGD(model.parameters(), lr=LR, foreach=True)


def lomo_step():
    lomo.step(loss())


def one_pass_without_sync(norm=True):
    value = loss()
    lomo._inv_scale, lomo._clip_coef, lomo._lr = 1.0, 1.0, LR
    lomo._mode, lomo._single_pass = "update", norm
    lomo._reset_norm(value.device)
    value.backward()
    lomo._mode = None
    lomo._global_norm(value.detach())  # the one sync, after backward


def sgd_step():
    loss().backward()
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
