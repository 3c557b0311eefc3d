"""gram_norm.py on the GPU, at 7B's layer shapes and 4 x 512 tokens (N = 2048), bf16: the norm from Grams
against the norm of the bf16 gradient g^T x, and the time of each way (CUDA events, 20 repetitions).
Run from anywhere: python3 results/gram-norm/check_gpu.py"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
import torch  # noqa: E402

import gram_norm  # noqa: E402

N, REPS = 2048, 20
print(torch.cuda.get_device_name(), "torch", torch.__version__)
a = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
try:
    torch.mm(a, a.t(), out_dtype=torch.float32)
    print("torch.mm out_dtype=float32 from bf16: available")
except (TypeError, RuntimeError) as error:
    print("torch.mm out_dtype: not available, Grams rounded to bf16 first:", str(error).splitlines()[0])

# (input width, output widths of the layers that read that one input)
LAYERS = {"wq, wk, wv (one input)": (4096, [4096] * 3), "wo": (4096, [4096]),
          "w1, w3 (one input)": (4096, [11008] * 2), "w2": (11008, [4096])}


def timed(fn):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPS):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / REPS


generator = torch.Generator(device="cuda").manual_seed(0)
total_direct = total_gram = 0.0
for name, (d_in, d_outs) in LAYERS.items():
    x = torch.randn(N, d_in, device="cuda", dtype=torch.bfloat16, generator=generator)
    # Output gradients with a shared direction across tokens, as real ones have, so cross terms do not cancel.
    gs = [(torch.randn(N, d, device="cuda", generator=generator) * 1e-3
           + torch.randn(1, d, device="cuda", generator=generator) * 3e-4).to(torch.bfloat16) for d in d_outs]

    def direct():
        return [torch.linalg.vector_norm(g.t().mm(x), dtype=torch.float32) for g in gs]

    def grams():
        gx = gram_norm._gram(x)
        return [torch.dot(gram_norm._gram(g).view(-1), gx.view(-1)).clamp_min(0).sqrt() for g in gs]

    exact = [float(g.double().t().mm(x.double()).norm()) for g in gs]
    worst_direct = max(abs(float(v) / e - 1) for v, e in zip(direct(), exact))
    worst_gram = max(abs(float(v) / e - 1) for v, e in zip(grams(), exact))
    t_direct, t_gram = timed(direct), timed(grams)
    total_direct, total_gram = total_direct + t_direct, total_gram + t_gram
    print(f"{name:24s} direct {t_direct:6.3f} ms  grams {t_gram:6.3f} ms  ({t_gram / t_direct:4.2f}x)   "
          f"relative error vs float64: direct {worst_direct:.1e}, grams {worst_gram:.1e}")
print(f"one block's weight-gradient norms: direct {total_direct:.3f} ms, grams {total_gram:.3f} ms; "
      f"x 32 blocks: {32 * (total_direct - total_gram):.1f} ms less per norm pass")
