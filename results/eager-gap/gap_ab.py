"""Where eager LOMO loses to torch.optim.SGD: 7B, bf16, checkpointing, 4 x 512 on one GPU, variants of the
per-parameter hook interleaved in one process (one model), each timed by CUDA events per step (median),
then one step of each under the profiler for the GPU's busy time (the union of its kernels) against the
step's span. "LOMO before" is lomo.py before change 19 (PERF_NOTES.md), beside this file: make it with
`git show 8cee26c:lomo.py > results/eager-gap/lomo_before.py` (runs 2-6; run 7 compares with 59f240d, the
loss read before backward). Run 1 had no LOMO variants but "LOMO".
Run from anywhere: python3 results/eager-gap/gap_ab.py [rounds] ["variant;variant;..."] [--compile]"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "offload"))
import torch  # noqa: E402

from step7b import LR, loss, lomo, model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lomo_before  # noqa: E402

if "--compile" in sys.argv:  # torch.compile each block (bench.py --compile), for every variant alike
    sys.argv.remove("--compile")
    from model import compile_blocks
    compile_blocks(model)
lomo_old = lomo_before.LOMO(model, lr=LR)
lomo_old.remove_hooks()
lomo_unchecked = type(lomo)(model, lr=LR, check_finite=False)  # the paper's one pass: no sync, no norms
lomo_unchecked.remove_hooks()
lomo_unfused = type(lomo)(model, lr=LR, fused_kernel=False)  # the update and the norm as two PyTorch ops
lomo_unfused.remove_hooks()

lomo.remove_hooks()  # its hooks are registered again for the variant "LOMO" only
handles = []
params = [p for p in model.parameters()]
norms = []
alpha_dev = torch.full((), -LR, device="cuda")


def bare(p):
    p.add_(p.grad, alpha=-LR)
    p.grad = None


def bare_norm(p):
    g = p.grad
    p.grad = None
    norms.append(torch.linalg.vector_norm(g, dtype=torch.float32))
    p.add_(g, alpha=-LR)


@torch.compile(dynamic=False, fullgraph=True)
def add_and_square_sum(p, g, alpha):
    g32 = g.float()
    p.copy_((p.float() + alpha * g32).to(p.dtype))
    return g32.square().sum()


def compiled_norm(p):
    g = p.grad
    p.grad = None
    norms.append(add_and_square_sum(p, g, alpha_dev))


import fused_update  # noqa: E402

slots = fused_update.new_slots("cuda")
apply = torch.ones((), dtype=torch.uint8, device="cuda")


def triton_norm(p):  # fused_update.py's kernel alone: what LOMO's checked step does, without its loss read
    g = p.grad
    p.grad = None
    fused_update.update_and_sum_squares(p, g, -LR, slots, apply)


def step_triton_no_sync():
    loss().backward()
    slots.sum().sqrt()
    slots.zero_()


def fused_sgd_norm(p):
    g = p.grad
    p.grad = None
    norms.append(torch.linalg.vector_norm(g, dtype=torch.float32))
    torch._fused_sgd_([p], [g], [], weight_decay=0.0, momentum=0.0, lr=LR, dampening=0.0, nesterov=False,
                      maximize=False, is_first_step=False, found_inf=found_inf)


found_inf = torch.zeros((), device="cuda")
sgd = torch.optim.SGD(params, lr=LR)


def step_sgd():
    loss().backward()
    sgd.step()
    sgd.zero_grad(set_to_none=True)


def step_hooks():
    loss().backward()


def step_hooks_syncs():  # LOMO's two host syncs: the loss before backward, the norms after
    global norms
    value = loss()
    float(value)
    value.backward()
    total = torch.stack(norms).square().sum().sqrt() if norms else value
    float(total)
    norms = []


def step_hooks_no_sync():  # the norms summed on the device, never read: no host sync at all
    global norms
    loss().backward()
    torch.stack(norms).square().sum().sqrt()
    norms = []


def step_hooks_pre_sync():  # only the loss read before backward
    global norms
    value = loss()
    float(value.detach())
    value.backward()
    torch.stack(norms).square().sum().sqrt()
    norms = []


def step_hooks_post_sync():  # only the norms read after backward
    global norms
    value = loss()
    value.backward()
    float(torch.stack(norms).square().sum().sqrt())
    norms = []


def step_hooks_last_sync():
    global norms
    value = loss()
    found_inf.copy_(~torch.isfinite(value.detach()))
    value.backward()
    float(torch.stack(norms).square().sum().sqrt())
    norms = []


def step_lomo():
    lomo.step(loss())


def step_lomo_unchecked():
    lomo_unchecked.step(loss())


def step_lomo_unfused():
    lomo_unfused.step(loss())


def step_lomo_old():
    lomo_old.step(loss())


def offloaded(step):
    def run():
        model.offload_checkpoints = True
        try:
            step()
        finally:
            model.offload_checkpoints = False
    return run


def jit_launch(step):  # fused_update.py's kernel launched through Triton's JIT, as before change 26
    def run():
        direct = fused_update._direct_launcher
        fused_update._direct_launcher = lambda device_index, dtype: None
        try:
            step()
        finally:
            fused_update._direct_launcher = direct
    return run


variants = {  # name: (hook or None, step, set-up)
    "sgd (foreach)": (None, step_sgd),
    "hook: add_": (bare, step_hooks),
    "hook: add_ + syncs": (bare, step_hooks_syncs),
    "hook: norm + add_, no sync": (bare_norm, step_hooks_no_sync),
    "hook: norm + add_, sync before backward": (bare_norm, step_hooks_pre_sync),
    "hook: norm + add_, sync after backward": (bare_norm, step_hooks_post_sync),
    "hook: norm + add_ + syncs": (bare_norm, step_hooks_syncs),
    "hook: compiled add+norm, syncs": (compiled_norm, step_hooks_syncs),
    "hook: compiled add+norm, no sync": (compiled_norm, step_hooks_no_sync),
    "hook: norm + fused_sgd, no pre-sync": (fused_sgd_norm, step_hooks_last_sync),
    "hook: triton kernel, no sync": (triton_norm, step_triton_no_sync),
    "LOMO before": ("lomo_old", step_lomo_old),
    "LOMO": ("lomo", step_lomo),
    "LOMO, check_finite=False": ("lomo_unchecked", step_lomo_unchecked),
    "LOMO, fused_kernel=False": ("lomo_unfused", step_lomo_unfused),
    "LOMO, Triton JIT launch": ("lomo", jit_launch(step_lomo)),
    "sgd, offloaded": (None, offloaded(step_sgd)),
    "LOMO before, offloaded": ("lomo_old", offloaded(step_lomo_old)),
    "LOMO, offloaded": ("lomo", offloaded(step_lomo)),
}
if len(sys.argv) > 2:
    variants = {name: variants[name] for name in sys.argv[2].split(";")}


def use(name):
    hook, step = variants[name]
    for handle in handles:
        handle.remove()
    handles.clear()
    if hook == "lomo":  # only its matrices have hooks (change 19)
        handles.extend(p.register_post_accumulate_grad_hook(lomo._hook) for p in params if p.dim() > 1)
    elif hook == "lomo_unchecked":
        handles.extend(p.register_post_accumulate_grad_hook(lomo_unchecked._hook) for p in params if p.dim() > 1)
    elif hook == "lomo_unfused":
        handles.extend(p.register_post_accumulate_grad_hook(lomo_unfused._hook) for p in params if p.dim() > 1)
    elif hook == "lomo_old":
        hooked = [p for p in params if p.dim() > 1] if hasattr(lomo_old, "_vectors") else params  # after change 19
        handles.extend(p.register_post_accumulate_grad_hook(lomo_old._hook) for p in hooked)
    elif hook is not None:
        handles.extend(p.register_post_accumulate_grad_hook(hook) for p in params)
    return step


def timed(step, n):
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    for i in range(n):
        marks[i].record()
        step()
    marks[-1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]


def gpu_busy(step):
    """(busy ms, span ms) of one step: the union of the GPU's kernel and copy intervals, and their extent."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, end = 0.0, None
    for a, b in spans:
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy / 1e3, (spans[-1][1] - spans[0][0]) / 1e3


rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
medians = {name: [] for name in variants}
for name in variants:  # warm-up, compilation, and the profile
    step = use(name)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    busy, span = gpu_busy(step)
    t = time.perf_counter()
    step()
    cpu = (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    print(f"{name:38s} profiled: GPU busy {busy:6.1f} ms of a {span:6.1f} ms span ({busy / span:.1%}); "
          f"CPU to return from step() {cpu:6.1f} ms", flush=True)
for r in range(rounds):
    for name in variants:
        step = use(name)
        step()
        ms = sorted(timed(step, 10))
        medians[name].append(ms[len(ms) // 2])
base = min(medians.get("sgd (foreach)", [float("nan")]))
for name, ms in medians.items():
    print(f"{name:38s} median ms per round {' '.join(f'{m:6.1f}' for m in ms)}   best {min(ms):6.1f}  "
          f"tokens/s {2048e3 / min(ms):6.0f}  x sgd {base / min(ms):.3f}", flush=True)
print(torch.cuda.get_device_name(), torch.__version__)
