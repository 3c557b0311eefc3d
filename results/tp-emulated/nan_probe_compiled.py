"""Run 1's compiled emulated run trained with every token, so with zero embeddings at the first position of some
sequences, and raised nothing, where the eager runs stopped on a NaN gradient norm. Is the gradient finite under
compiled blocks, or does the finiteness check miss it? nan_probe_origin.py's case (no tp, 7B, bf16, the
embedding rows of half the vocabulary zero, checkpointed) with `compile_blocks`: the non-finite gradients and the
largest gradient of loss.backward(), the gradient at the embedding output's first positions, then three LOMO steps.
`python results/tp-emulated/nan_probe_compiled.py [cuda|cpu] [small]`."""
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
import bench  # noqa: E402
import shard  # noqa: E402
from lomo import LOMO  # noqa: E402
from losses import model_loss  # noqa: E402
from model import compile_blocks, model_args  # noqa: E402

device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
small = len(sys.argv) > 2 and sys.argv[2] == "small"
margs = model_args("tiny", vocab_size=512) if small else model_args("7B")
seq = 128 if small else 512
tokens = torch.randint(0, margs.vocab_size, (4, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
print("first tokens", tokens[:, 0].tolist(), "zeroed from", margs.vocab_size // 2, flush=True)
grid = shard.Grid(device=device)
for compiled in (False, True):
    torch.manual_seed(0)  # the same weights for both
    model = bench.random_model(margs, grid, torch.bfloat16)
    with torch.no_grad():
        model.tok_embeddings.weight[margs.vocab_size // 2:] = 0
    model.activation_checkpointing = True
    if compiled:
        compile_blocks(model, backend="inductor" if device.type == "cuda" else "aot_eager")
    kept = {}
    handle = model.tok_embeddings.register_forward_hook(lambda module, args, out: kept.update(out=out.retain_grad()
                                                                                                or out))
    loss = model_loss(model, tokens[:, :-1], tokens[:, 1:], grid)
    loss.backward()
    handle.remove()
    bad = [n for n, p in model.named_parameters() if not p.grad.isfinite().all()]
    largest = max(p.grad.abs().max().item() for p in model.parameters() if p.grad.isfinite().all())
    first = kept["out"].grad[:, 0].float().norm(dim=-1).tolist()
    print(f"compiled {compiled}: loss {loss.item():.4g}; {len(bad)} non-finite gradients (first {bad[-1:]}); the "
          f"largest finite gradient {largest:.3g}; gradient norm at each sequence's first position {first}",
          flush=True)
    model.zero_grad(set_to_none=True)
    lomo = LOMO(model, lr=1e-6)
    try:
        norms = [lomo.step(model_loss(model, tokens[:, :-1], tokens[:, 1:], grid)).grad_norm for _ in range(3)]
        print(f"compiled {compiled}: LOMO gradient norms {norms}", flush=True)
    except FloatingPointError as error:
        print(f"compiled {compiled}: LOMO raised {str(error)[:80]}", flush=True)
    del model, lomo
