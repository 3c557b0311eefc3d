"""One GPU kernel for LOMO's checked one-pass update: w <- w + alpha * g, and the sum of g^2 on the way.

Why it exists: a checked one-pass step (lomo.py's default) updates each weight and also sums its
gradient's squares, for the norm it reports and checks. As two PyTorch ops that is two kernels, and the
norm's kernel reads the whole gradient a second time: 1.5-2.5% of a 7B step on an H200, most of the
checked LOMO's gap to plain SGD (PERF_NOTES.md, sessions 7 and 8). `torch.compile` does not fuse the two
(it makes three kernels). This Triton kernel does both in one read: each program walks its share of the tensor,
updates it, and adds the squares it saw into its own slot of a small fp32 buffer. The buffer is summed
once per step; no slot is written by two programs, so the norm does not depend on timing (no atomics).
The kernel also reads a flag on the device, whether the step's loss is finite, and writes nothing if it is
not: so a checked step never has to wait for its loss to reach the host before updating (lomo.py).

The maths is that of `param.add_(grad, alpha=alpha)` on CUDA: both loaded as fp32, alpha in fp32, one
rounding back into the parameter's dtype; the updated weights are bit-identical to it
(tests/test_fused_update.py checks this on a GPU). Only the norm's summation order differs from
`torch.linalg.vector_norm`'s.

Left out: the CPU (no Triton there; lomo.py uses the two PyTorch ops), weight decay and value clipping
(they take the unfused path), and tensors that are not contiguous or have 2**31 elements or more.
Triton ships with PyTorch's CUDA builds; without it `available()` is False and nothing changes.
"""
import functools

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # CPU builds of PyTorch come without Triton (and a broken install is no Triton either)
    triton = None

# Programs per launch (and so slots in the buffer), elements per program per iteration, and warps per
# program: the fastest of 32 settings on the 7B shapes on an H200 (results/eager-gap/kernel_tune.py, run 14),
# 0.56 ms a 7B step above `add_` alone (9.85 ms), against 0.73 ms for the next guess (4096, 8, 1024). A
# tensor of more than NUM_SLOTS * BLOCK elements is covered by each program looping over several blocks.
NUM_SLOTS = 2048
BLOCK = 2048  # 8 per thread with 8 warps of 32 threads: one 16-byte load of bf16
NUM_WARPS = 8

if triton is not None:
    @triton.jit
    def _update_and_sum_squares(param_ptr, grad_ptr, slots_ptr, apply_ptr, numel, alpha, iterations,
                                BLOCK: tl.constexpr):
        program, programs = tl.program_id(0), tl.num_programs(0)
        apply = tl.load(apply_ptr) != 0  # 0: the loss was not finite, leave the weights as they are
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        # (Offsets are int32: below 2**31 since numel is and NUM_SLOTS * BLOCK, a power of two, divides 2**31.)
        for i in range(iterations):  # program p takes blocks p, p + programs, p + 2 programs, ...
            offsets = (i * programs + program) * BLOCK + tl.arange(0, BLOCK)
            inside = offsets < numel
            grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            weight = tl.load(param_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            updated = (weight + alpha * grad).to(param_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(param_ptr + offsets, updated, mask=inside & apply)
            squares += grad * grad
        # This program's slot is its own: a plain read-add-write, ordered by the stream across launches.
        tl.store(slots_ptr + program, tl.load(slots_ptr + program) + tl.sum(squares, axis=0))


def available(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether `update_and_sum_squares` can take this pair; otherwise use the PyTorch ops."""
    return (triton is not None and param.is_cuda and param.dtype in (torch.bfloat16, torch.float16)
            and grad.dtype == param.dtype and grad.shape == param.shape
            and param.is_contiguous() and grad.is_contiguous() and param.numel() < 2**31
            and _supported(param.device.index))


@functools.lru_cache(maxsize=None)
def _supported(device_index) -> bool:
    # Triton builds for NVIDIA GPUs from Volta (compute capability 7.0) on, and for AMD's through ROCm.
    return torch.version.hip is not None or torch.cuda.get_device_capability(device_index) >= (7, 0)


def new_slots(device) -> torch.Tensor:
    """A zeroed buffer for one step's sums of squares (pass it to every call of that step)."""
    return torch.zeros(NUM_SLOTS, dtype=torch.float32, device=device)


def update_and_sum_squares(param: torch.Tensor, grad: torch.Tensor, alpha: float, slots: torch.Tensor,
                           apply: torch.Tensor) -> None:
    """param += alpha * grad (fp32 maths, rounded once) if the 0-dim uint8 tensor `apply` is not 0, and
    sum(grad**2) (fp32) added into `slots` either way. The squared norm of all the gradients seen is then
    `slots.sum()`."""
    numel = param.numel()
    blocks = triton.cdiv(numel, BLOCK)
    programs = min(NUM_SLOTS, blocks)
    _update_and_sum_squares[(programs,)](param, grad, slots, apply, numel, alpha, triton.cdiv(blocks, programs),
                                         BLOCK=BLOCK, num_warps=NUM_WARPS)
