"""Where the NaN of emulate_tp.py's first eager run (session 13, call 1) came from: the fake all-reduce leaves the
embeddings of tokens outside rank 0's vocabulary shard at exactly zero, so half the positions enter the first
RMSNorm as zero vectors. Checks, on the device given
(`python results/tp-emulated/nan_probe.py [cuda|cpu] [small]`):
  1. F.rms_norm's and model.RMSNorm's backward on zero rows, bf16 and fp32, against float64 autograd;
  2. the 7B-width block stack (2 layers) under the fake tp = 2 grid, tokens everywhere / inside rank 0's shard:
     which parameter's gradient is the first non-finite one, after loss.backward() (no LOMO);
  3. the same through a real one-process model (no tp) with the embedding rows of half the tokens zeroed.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from losses import model_loss  # noqa: E402
from model import RMSNorm, model_args  # noqa: E402
import shard  # noqa: E402

device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")

# 1. RMSNorm backward on zero rows
for dtype in (torch.bfloat16, torch.float32):
    x = torch.randn(8, 4096, dtype=dtype, device=device)
    x[::2] = 0
    grad_out = torch.randn_like(x)
    norm = RMSNorm(4096, 1e-5).to(device=device, dtype=dtype)
    results = {}
    for name, fn in (("F.rms_norm", lambda t: F.rms_norm(t, (4096,), eps=1e-5)), ("model.RMSNorm", norm)):
        leaf = x.clone().requires_grad_()
        fn(leaf).backward(grad_out)
        results[name] = leaf.grad
    ref = x.double().requires_grad_()
    (ref * torch.rsqrt(ref.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(grad_out.double())
    for name, g in results.items():
        print(f"1. {name} {dtype}: grad finite {bool(g.isfinite().all())}, zero rows' grad max "
              f"{g[::2].abs().max().item():.4g} (float64 {ref.grad[::2].abs().max().item():.4g}), "
              f"max error {(g.double() - ref.grad).abs().max().item():.3g}")


def first_bad(model):
    for name, p in model.named_parameters():
        if p.grad is not None and not p.grad.isfinite().all():
            return name
    return None


small = len(sys.argv) > 2 and sys.argv[2] == "small"  # the tiny shape: a seconds-long check that the probe runs
margs = model_args("tiny", vocab_size=512) if small else model_args("7B", n_layers=2, vocab_size=32000)
for checkpointing in (False, True):
    # 2. fake tp = 2 grid
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    grid = shard.Grid(rank=0, world_size=2, tp=2, tp_group=dist.group.WORLD, device=device)
    import bench
    for in_shard in (False, True):
        model = bench.random_model(margs, grid, torch.bfloat16)
        model.activation_checkpointing = checkpointing
        high = margs.vocab_size // 2 if in_shard else margs.vocab_size
        tokens = torch.randint(0, high, (4, 129 if small else 513), generator=torch.Generator().manual_seed(0)).to(device)
        loss = model_loss(model, tokens[:, :-1], tokens[:, 1:], grid)
        loss.backward()
        print(f"2. fake tp=2, checkpointing {checkpointing}, tokens inside rank 0's shard {in_shard}: loss "
              f"{loss.item():.4g}, first non-finite grad: {first_bad(model)}")
        del model
    dist.destroy_process_group()
    # 3. no tp, half the tokens' embedding rows zero
    grid = shard.Grid(device=device)
    model = bench.random_model(margs, grid, torch.bfloat16)
    model.activation_checkpointing = checkpointing
    tokens = torch.randint(0, margs.vocab_size, (4, 129 if small else 513), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        model.tok_embeddings.weight[margs.vocab_size // 2:] = 0
    loss = model_loss(model, tokens[:, :-1], tokens[:, 1:], grid)
    loss.backward()
    print(f"3. no tp, half the embedding rows zero, checkpointing {checkpointing}: loss {loss.item():.4g}, "
          f"first non-finite grad: {first_bad(model)}")
