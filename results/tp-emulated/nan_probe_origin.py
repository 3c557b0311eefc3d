"""Which op makes the NaN of nan_probe_lomo.py's case B (no tp, the embedding rows of half the vocabulary zero,
7B, bf16, LOMO: gradient norm NaN on an H200). loss.backward() without LOMO, checkpointed and not: the parameters
whose gradients are not finite, then autograd's anomaly mode naming the first backward op that returned a NaN.
`python results/tp-emulated/nan_probe_origin.py [cuda|cpu] [small]`."""
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
import bench  # noqa: E402
import shard  # noqa: E402
from losses import model_loss  # noqa: E402
from model import model_args  # noqa: E402

device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
small = len(sys.argv) > 2 and sys.argv[2] == "small"
margs = model_args("tiny", vocab_size=512) if small else model_args("7B")
seq = 128 if small else 512
tokens = torch.randint(0, margs.vocab_size, (4, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
grid = shard.Grid(device=device)
torch.manual_seed(0)
model = bench.random_model(margs, grid, torch.bfloat16)
with torch.no_grad():
    model.tok_embeddings.weight[margs.vocab_size // 2:] = 0
for checkpointing, anomaly in ((True, False), (False, False), (False, True)):
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    try:
        with torch.autograd.detect_anomaly(check_nan=True) if anomaly else torch.enable_grad():
            loss = model_loss(model, tokens[:, :-1], tokens[:, 1:], grid)
            loss.backward()
        bad = [(n, p.grad.isnan().any().item(), p.grad.isinf().any().item()) for n, p in model.named_parameters()
               if p.grad is not None and not p.grad.isfinite().all()]
        print(f"checkpointing {checkpointing}, anomaly mode {anomaly}: loss {loss.item():.4g}, {len(bad)} non-finite "
              f"grads (name, nan, inf), first in backward order: {bad[::-1][:4]}", flush=True)
    except RuntimeError as error:
        print(f"checkpointing {checkpointing}, anomaly mode {anomaly}: {str(error)[:400]}", flush=True)

# The same model with LOMO (no fused kernel, so every norm is recorded by _keep_norm): which norms are not finite,
# in the order backward made them, and which weights the step left not finite.
from lomo import LOMO  # noqa: E402

model.activation_checkpointing = True
model.zero_grad(set_to_none=True)
lomo = LOMO(model, lr=1e-6, fused_kernel=False)
recorded = []
keep = lomo._keep_norm
lomo._keep_norm = lambda param, norm: (recorded.append((lomo._names.get(id(param)), norm)), keep(param, norm))[1]
result = lomo.step(model_loss(model, tokens[:, :-1], tokens[:, 1:], grid))
bad = [(name, norm.item()) for name, norm in recorded if not torch.isfinite(norm)]
moved = [n for n, p in model.named_parameters() if not p.isfinite().all()]
print(f"LOMO, checkpointed: loss {result.loss:.4g}, {len(recorded)} norms, {len(bad)} not finite, first: {bad[:4]}; "
      f"weights not finite after the step: {moved[:4]}", flush=True)
