"""One GPU kernel for LOMO's checked one-pass update: w <- w + alpha * g, and the sum of g^2 on the way.

Why it exists: a checked one-pass step (lomo.py's default) updates each weight and also sums its
gradient's squares, for the norm it reports and checks. As two PyTorch ops that is two kernels, and the
norm's kernel reads the whole gradient a second time: 1.5-2.5% of a 7B step on an H200, most of the
checked LOMO's gap to plain SGD (PERFORMANCE.md, fused_update.py). `torch.compile` does not fuse the two
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
(they take the unfused path), and tensors that are not contiguous, have 2**31 elements or more, or a number
of elements that is not a multiple of 16 (every LLaMA matrix is one).
Triton ships with PyTorch's CUDA builds; without it `available()` is False and nothing changes. The kernel is
launched through its compiled kernel's own launcher where it can be (`_direct_launcher`): less CPU per call.
"""
import functools
import warnings

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # CPU builds of PyTorch come without Triton (and a broken install is no Triton either)
    triton = None

# Programs per launch (and so slots in the buffer), elements per program per iteration, and warps per
# program: the fastest of 32 settings on the 7B shapes on an H200 (the search, in git history:
# `git show 8a5d2d9:results/eager-gap/kernel_tune.py`), 0.56 ms a 7B step above `add_` alone (9.85 ms),
# against 0.73 ms for the next guess (4096, 8, 1024). A tensor of more than NUM_SLOTS * BLOCK elements is
# covered by each program looping over several blocks.
NUM_SLOTS = 2048
BLOCK = 2048  # 8 per thread with 8 warps of 32 threads: one 16-byte load of bf16
NUM_WARPS = 8

if triton is not None:
    # The block size is a global constant, not an argument: the kernel then takes only run-time arguments,
    # which every Triton's compiled-kernel launcher takes the same way (see _direct_launcher).
    _BLOCK = tl.constexpr(BLOCK)

    # numel and iterations are not specialized on (Triton would otherwise compile a variant for each value
    # class: 1, a multiple of 16, other), so one compiled kernel per dtype serves every matrix; numel is
    # passed divided by 16, which tells the compiler what specializing told it: the masks below are
    # uniform over 16 elements, so loads and stores stay 16-byte wide.
    @triton.jit(do_not_specialize=["numel_over_16", "iterations"])
    def _update_and_sum_squares(param_ptr, grad_ptr, slots_ptr, apply_ptr, alpha_ptr, numel_over_16, iterations):
        program, programs = tl.program_id(0), tl.num_programs(0)
        numel = numel_over_16 * 16
        apply = tl.load(apply_ptr) != 0  # 0: the loss was not finite, leave the weights as they are
        alpha = tl.load(alpha_ptr)  # fp32, read on the device: a CUDA graph of the step takes each step's lr
        squares = tl.zeros([_BLOCK], dtype=tl.float32)
        # (Offsets are int32: below 2**31 since numel is and NUM_SLOTS * BLOCK, a power of two, divides 2**31.)
        for i in range(iterations):  # program p takes blocks p, p + programs, p + 2 programs, ...
            offsets = (i * programs + program) * _BLOCK + tl.arange(0, _BLOCK)
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
            and param.numel() % 16 == 0 and _supported(param.device.index))


@functools.lru_cache(maxsize=None)
def _supported(device_index) -> bool:
    # Triton builds for NVIDIA GPUs from Volta (compute capability 7.0) on, and for AMD's through ROCm.
    return torch.version.hip is not None or torch.cuda.get_device_capability(device_index) >= (7, 0)


def new_slots(device) -> torch.Tensor:
    """A zeroed buffer for one step's sums of squares (pass it to every call of that step)."""
    return torch.zeros(NUM_SLOTS, dtype=torch.float32, device=device)


def update_and_sum_squares(param: torch.Tensor, grad: torch.Tensor, alpha, slots: torch.Tensor,
                           apply: torch.Tensor) -> None:
    """param += alpha * grad (fp32 maths, rounded once) if the 0-dim uint8 tensor `apply` is not 0, and
    sum(grad**2) (fp32) added into `slots` either way. The squared norm of all the gradients seen is then
    `slots.sum()`. `alpha`: a 0-dim float32 tensor on the device (what LOMO passes: a CUDA graph of the step
    reads each step's value from it), or a float. Needs `available(param, grad)`."""
    numel = param.numel()
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.full((), alpha, dtype=torch.float32, device=param.device)
    if (numel % 16 or grad.dtype != param.dtype or slots.dtype != torch.float32 or apply.dtype != torch.uint8
            or alpha.dtype != torch.float32 or alpha.numel() != 1 or alpha.device != param.device):
        raise ValueError(f"update_and_sum_squares takes {numel} elements (needs a multiple of 16), a {grad.dtype} "
                         f"gradient for a {param.dtype} weight (needs the same), {slots.dtype} slots (needs "
                         f"new_slots()), a {apply.dtype} flag (needs uint8) and a {alpha.dtype} alpha of "
                         f"{alpha.numel()} elements on {alpha.device} (needs one float32 on the weight's device): "
                         f"check available() first")
    blocks = -(-numel // BLOCK)
    programs = min(NUM_SLOTS, blocks)
    args = (param, grad, slots, apply, alpha, numel // 16, -(-blocks // programs))
    aligned = not any(t.data_ptr() % 16 for t in (param, grad, slots, apply, alpha))
    # (The JIT launches on the current device's stream, as does the direct launch, with a kernel loaded for it.)
    direct = aligned and param.device.index == torch.cuda.current_device()
    launch = _direct_launcher(param.device.index, param.dtype) if direct else None
    if launch is not None:
        launch((programs, 1, 1))(*args)
    else:
        _update_and_sum_squares[(programs,)](*args, num_warps=NUM_WARPS)


def prepare(device: torch.device, dtype: torch.dtype) -> None:
    """Compile the kernel for this GPU and dtype, and check its direct launch, now (one host sync): before a
    CUDA graph capture, inside which neither may happen (cuda_graph.py). Nothing for what the kernel cannot take."""
    if triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        _direct_launcher(device.index if device.index is not None else torch.cuda.current_device(), dtype)


@functools.lru_cache(maxsize=None)
def _direct_launcher(device_index, dtype):
    """The compiled kernel for this GPU and dtype, to launch directly; None to launch through Triton's JIT.

    Why: `kernel[grid](...)` costs ~15-25 us of CPU per call (Triton binds the arguments, works out their
    specialization and looks the compiled kernel up), about what the two PyTorch ops the kernel replaces
    cost, and an eager 7B step makes 224 such calls from inside backward, where the CPU is often what the
    GPU waits for (PERFORMANCE.md, fused_update.py). The compiled kernel that the JIT returns can be launched as
    `compiled[grid](*args)`, which skips all that. On NVIDIA GPUs it is the right kernel for every later
    call with the same dtype whose pointers are 16-byte aligned: Triton specializes this kernel on the
    dtypes and on each pointer's alignment only (numel and iterations are not specialized on, and all five
    pointers were aligned here as there). Not on AMD GPUs, where Triton may also specialize on a tensor's
    size. The launch is checked once here, on scratch tensors (one host sync per dtype per process): the
    masked tail, a flag of 0, several programs; a Triton whose compiled kernels take their arguments
    differently falls back to the JIT launch (correct, more CPU) with a warning, instead of computing
    anything wrong."""
    if torch.version.hip is not None:
        return None
    device = torch.device("cuda", device_index)
    storage = torch.zeros(2 * BLOCK, dtype=dtype, device=device)
    weight = storage[:2 * BLOCK - 16]  # the last block is masked; the 16 elements after it must stay 0
    grad = torch.ones_like(weight)
    slots = new_slots(device)
    apply, skip = (torch.full((), value, dtype=torch.uint8, device=device) for value in (1, 0))
    half = torch.full((), 0.5, dtype=torch.float32, device=device)  # alpha
    args = (weight, grad, slots)
    numel_over_16 = weight.numel() // 16
    try:
        with torch.cuda.device(device):
            # Through the JIT: one program over both blocks. Then directly: two programs, one block each,
            # and again with the flag at 0 (the squares summed, no weight written).
            compiled = _update_and_sum_squares[(1,)](*args, apply, half, numel_over_16, 2, num_warps=NUM_WARPS)
            compiled[(2, 1, 1)](*args, apply, half, numel_over_16, 1)
            compiled[(2, 1, 1)](*args, skip, half, numel_over_16, 1)
        tail = BLOCK - 16
        works = (bool((weight == 1.0).all()) and not storage[weight.numel():].any()
                 and slots[:3].tolist() == [BLOCK + tail + 2 * BLOCK, 2 * tail, 0.0])
        failure = "it computed something else than the JIT launch"
    except Exception as error:  # noqa: BLE001 - whatever failed, the JIT launch is the safe way
        works, failure = False, f"{type(error).__name__}: {error}"
    if not works:
        warnings.warn(f"fused_update.py: the direct launch of the Triton kernel failed its check ({failure}); "
                      f"the kernel is launched through Triton's JIT instead (correct, more CPU per call)")
        return None
    return compiled.__getitem__


# ----------------------------------------------------------------------------------------------------
# The fast paths (lomo.py's seam): faster ways to apply a rule that declares itself an axpy, w += alpha * g.
# Each claims its parameters once (`claim`), says per pass whether it updates them (`begin_pass`), updates one
# from LOMO's hook (`update`: it guards, averages over dp, sums the norm and updates, in its own way), and may
# work after the pass (`end_pass`; `batched`: its parameters get no hook and are all updated there).

def _is_axpy(lomo) -> bool:
    return lomo.rule.axpy_alpha(1.0) is not None and lomo.clip_grad_value is None


def _sharded(param) -> bool:
    return hasattr(param, "tensor_parallel_dim")


def _loss_flag(guard, device):
    """1 where the step's loss is finite, on the device: a guard that reads the loss before backward has none."""
    if hasattr(guard, "device_flag"):
        return guard.device_flag(device)
    return torch.ones((), dtype=torch.uint8, device=device)


def sums_norms(lomo) -> bool:
    """Whether this pass sums its gradients' norms as it updates: a checked one-pass step."""
    return lomo.pass_kind == "one-pass" and lomo.guard.checks


def _unread_flag(guard):
    """That flag while the loss is still unread on the host (the update waits for nothing else), else None."""
    return guard.unread_flag() if hasattr(guard, "unread_flag") else None


def axpy(param, grad, alpha: float):
    """w = fp32(w) + alpha * g, rounded back once. On CUDA `param.add_(grad, alpha)` computes exactly that in
    one kernel; on the CPU (whose bf16 add_ would round alpha to bf16) it goes through fp32 chunks."""
    if param.is_cuda:
        param.add_(grad, alpha=alpha)
        return
    for p_piece, g_piece in zip(param.view(-1).split(2**24), grad.view(-1).split(2**24)):
        p_piece.copy_(p_piece.float().add_(g_piece, alpha=alpha))


class TorchAxpy:
    """A bf16/fp16 axpy in one PyTorch op (`axpy`), alpha with the clip factor and the unscaling folded in.
    Equal to lomo.LOMO.update bit for bit without clipping or loss scaling (tests/test_fused_update.py)."""
    batched = False

    def claim(self, lomo):
        return [p for p in lomo.params if p.dtype in (torch.bfloat16, torch.float16) and _is_axpy(lomo)]

    def begin_pass(self, kind, lomo) -> bool:
        return kind != "norm"

    def update(self, param, grad, lomo):
        if lomo.discarding or not lomo.guard.before_update(lomo):
            return
        grad = lomo.average(grad)
        if sums_norms(lomo):
            lomo.record_norm(param, grad)
        axpy(param, grad, lomo.axpy_alpha())

    def end_pass(self, kind, lomo):
        pass


class TritonAxpy:
    """The Triton kernel above for a checked one-pass step's bf16 matrices: the update and the gradient's sum of
    squares in one read, held back on the device by the guard's flag (whether the loss is finite), so that the
    guard need not read the loss first. alpha is read from a 0-dim tensor on the device, so that a CUDA graph
    of the step (cuda_graph.py, which sets `capturing`) takes each step's value from the address it captured:
    `set_alpha` fills it."""
    batched = False

    def __init__(self):
        self.alpha, self.slots, self.active, self.capturing, self.claimed = None, {}, False, False, []

    def claim(self, lomo):
        self.claimed = [p for p in lomo.params if p.dim() > 1 and _is_axpy(lomo) and available(p, p)]
        return self.claimed

    def begin_pass(self, kind, lomo) -> bool:
        # Eager: only where the norm is wanted as well (a norm pass's update pass takes TorchAxpy's add_).
        self.active = bool(self.claimed) and (self.capturing and kind != "norm" or
                                              kind == "one-pass" and lomo.guard.checks)
        self.slots = {}  # per pass: the sums of squares of its gradients, by norm group
        if self.active and not self.capturing:
            self.set_alpha(lomo.axpy_alpha(), lomo.params[0].device)
        return self.active

    def set_alpha(self, alpha: float, device):
        if self.alpha is None or self.alpha.device != device:
            self.alpha = torch.empty((), dtype=torch.float32, device=device)
        self.alpha.fill_(alpha)  # a kernel with the value as its argument: no host sync

    def update(self, param, grad, lomo):
        if lomo.discarding:
            return
        grad = lomo.average(grad)
        group = _sharded(param)
        if group not in self.slots:
            self.slots[group] = new_slots(param.device)
        try:
            update_and_sum_squares(param, grad, self.alpha, self.slots[group], _loss_flag(lomo.guard, param.device))
        except Exception as error:  # a Triton that cannot build for this GPU, say
            raise RuntimeError(f"fused_update.py's Triton kernel failed on {lomo.name_of(param)} "
                               f"({type(error).__name__}: {error}); use the PyTorch ops instead: train.py/bench.py "
                               f"--no-fused-kernel") from error

    def end_pass(self, kind, lomo):
        for sharded, slots in self.slots.items():  # the kernel's gradients, as one norm per group
            lomo.add_norm(slots.sum().sqrt(), sharded)
        self.slots = {}


class VectorGroup:
    """The vectors (1-D parameters: the RMSNorm weights, 65 in 7B, 0.5 MiB in bf16) without hooks: their
    gradients accumulate during backward and are applied together after it with multi-tensor kernels, instead
    of a Python hook, a norm and an update launch each (CPU time, in an eager step that is partly launch-bound).
    Alive beyond the largest gradient: (2 L + 1) d elements. Under a CUDA graph's capture (`kernel` set by
    cuda_graph.py) each goes through TritonAxpy instead, which reads alpha on the device (a multi-tensor add
    takes it as a number that the graph would keep)."""
    batched = True

    def __init__(self):
        self.params, self.kernel = [], None

    def claim(self, lomo):
        self.params = [p for p in lomo.params if p.dim() <= 1]
        return self.params

    def begin_pass(self, kind, lomo) -> bool:
        return True

    def update(self, param, grad, lomo):  # (batched: never called from a hook)
        raise RuntimeError("VectorGroup updates its parameters after backward, not from a hook")

    @torch.no_grad()  # outside backward, unlike the hooks: the in-place updates must not be recorded
    def end_pass(self, kind, lomo):
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        same_dtype = len({g.dtype for g in grads}) == 1
        low_precision_axpy = params[0].dtype in (torch.bfloat16, torch.float16) and _is_axpy(lomo)
        multi_tensor = same_dtype and params[0].is_cuda and low_precision_axpy
        # The loss may still be unread (the kernel guarded every matrix): the multi-tensor add can guard itself
        # with the same flag; anything else waits for the guard.
        flag = _unread_flag(lomo.guard) if multi_tensor else None
        if lomo.discarding or (kind != "norm" and flag is None and not lomo.guard.before_update(lomo)):
            return
        if lomo.dp_group is not None:
            grads = average_flat(grads, lomo.dp_size, lomo.dp_group)  # one all-reduce, not one per vector
        if self.kernel is not None and kind != "norm":
            for p, g in zip(params, grads):
                self.kernel.update(p, g, lomo)
            return
        if kind == "norm" or sums_norms(lomo):
            if lomo.clip_grad_value is None and same_dtype:
                norms = torch._foreach_norm(grads, 2, dtype=torch.promote_types(grads[0].dtype, torch.float32))
                for p, norm in zip(params, norms):
                    lomo.add_norm(norm, _sharded(p))
            else:
                for p, g in zip(params, grads):
                    lomo.record_norm(p, g)
        if kind == "norm":
            return
        if multi_tensor:  # fp32 maths, one rounding, as TorchAxpy, in a few kernels for all of them
            if flag is not None:  # a non-finite loss zeroes the gradients (0.5 MiB in 7B)
                flat = torch.cat([g.reshape(-1) for g in grads]).where(flag.bool(), 0.0)
                grads = [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads)]
            torch._foreach_add_(params, grads, alpha=lomo.axpy_alpha())
            return
        for p, g in zip(params, grads):  # as TorchAxpy where it would have claimed p, else the reference
            if p.dtype in (torch.bfloat16, torch.float16) and _is_axpy(lomo):
                axpy(p, g, lomo.axpy_alpha())
            else:
                lomo.update(p, g)


def average_flat(grads, dp_size, group):
    """The mean over the dp group of many small gradients, in one all-reduce per dtype (views of it)."""
    averaged = list(grads)
    for dtype in dict.fromkeys(g.dtype for g in grads):  # in the same order on every replica (not a set)
        indices = [i for i, g in enumerate(grads) if g.dtype == dtype]
        flat = torch.cat([grads[i].reshape(-1) for i in indices]).div_(dp_size)  # divide first, as the hook
        torch.distributed.all_reduce(flat, group=group)
        for i, piece in zip(indices, flat.split([grads[i].numel() for i in indices])):
            averaged[i] = piece.view_as(grads[i])
    return averaged
