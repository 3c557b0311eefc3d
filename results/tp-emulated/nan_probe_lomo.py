"""Run 1's NaN gradient norm, with LOMO (nan_probe.py found none with loss.backward() on 2 layers): 7B (32 layers),
bf16, checkpointed, eager, 4 x 512, LOMO at lr 1e-6, three steps each, printing each step's loss and gradient norm:
  A. the fake tp = 2 grid, every token (run 1's failing case), the fused kernel and without it;
  B. no tp, the embedding rows of half the vocabulary zero, the fused kernel.
`python results/tp-emulated/nan_probe_lomo.py [cuda|cpu] [small]`."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
import bench  # noqa: E402
import shard  # noqa: E402
from lomo import LOMO  # noqa: E402
from losses import model_loss  # noqa: E402
from model import model_args  # noqa: E402

device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
small = len(sys.argv) > 2 and sys.argv[2] == "small"
margs = model_args("tiny", vocab_size=512) if small else model_args("7B")
seq = 128 if small else 512
tokens = torch.randint(0, margs.vocab_size, (4, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)


def steps(label, grid, zero_half=False, **lomo_options):
    model = bench.random_model(margs, grid, torch.bfloat16)
    model.activation_checkpointing = True
    if zero_half:
        with torch.no_grad():
            model.tok_embeddings.weight[margs.vocab_size // 2:] = 0
    lomo = LOMO(model, lr=1e-6, tp_group=grid.tp_group, **lomo_options)
    shown = []
    for _ in range(3):
        result = lomo.step(model_loss(model, tokens[:, :-1], tokens[:, 1:], grid))
        shown.append(f"loss {result.loss:.4g} norm {result.grad_norm:.4g}")
    print(f"{label}: {'; '.join(shown)} (fused kernel used: {lomo.uses_fused_kernel})", flush=True)


from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
fake = shard.Grid(rank=0, world_size=2, tp=2, tp_group=dist.group.WORLD, device=device)
for fused in (True, False):
    try:
        steps(f"A. fake tp=2, fused kernel {fused}", fake, fused_kernel=fused)
    except FloatingPointError as error:
        print(f"A. fake tp=2, fused kernel {fused}: FloatingPointError: {str(error)[:90]}", flush=True)
dist.destroy_process_group()
try:
    steps("B. no tp, half the embedding rows zero", shard.Grid(device=device), zero_half=True)
except FloatingPointError as error:
    print(f"B. no tp, half the embedding rows zero: FloatingPointError: {str(error)[:90]}", flush=True)
