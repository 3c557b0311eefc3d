"""Every acceleration of the LOMO step, applied to a plain model from outside the reference core, in order.

Like torchtitan's `parallelize_llama`: one plain function (`apply`) that takes the reference pieces (model.py's
model, lomo.py's LOMO) and attaches what makes them fast, with every precondition and refusal in one place.
train.py and bench.py call it, so their defaults are fast; a library user gets the same with

    lomo = speedups.apply(model, lr=..., clip_grad_norm=..., activation_checkpointing=True)

and a bare `LOMO(model, lr)` stays the reference, correct on every device. In order (each file's docstring
says what it removes from the step and which test holds it equal to the reference):

1. fast_layers.py: memory-saving autograd Functions for RMSNorm, rotary and SwiGLU, swapped in with every
   parameter name unchanged (bit for bit the plain layers' gradients);
2. offload.py: activation checkpointing per block, its inputs on the GPU or in pinned host memory, and a
   recomputation that skips each block's w2;
3. the update rule (lomo.SGD, or any rule passed in: adalomo.AdaLomo), and whether the step has a norm pass
   (clipping by norm, or fp16);
4. extensions of the norm pass: Gram-matrix norms (gram_norm.py) and saved branch gradients (offload.py);
5. fast paths of the update (fused_update.py): the vectors batched after backward, the Triton update with its
   square-sum, and the one-op bf16 add;
6. the guard: step_result.py's deferred checks (no host sync), or `Unchecked` (the paper's one pass);
7. LOMO, then compiled blocks (after LOMO, which says whether backward runs twice over one graph).
CUDA graphs (cuda_graph.GraphedStep) wrap the step last; `check_cuda_graph` refuses what they cannot hold
before anything is built, and GraphedStep checks the rest (cuda_graph.obstacle).
"""
import math
from typing import Optional

import torch

import fast_layers
import fused_update
import gram_norm
import offload
from lomo import LOMO, SGD
from step_result import DeferredGuard, Unchecked


def apply(model, lr: float, weight_decay: float = 0.0, clip_grad_norm: Optional[float] = None,
          clip_grad_value: Optional[float] = None, tp_group=None, dp_group=None, rule=None,
          activation_checkpointing: bool = False, offload_checkpoints: bool = False, compile: bool = False,
          compile_backend: str = "inductor", gram_norms: bool = True, saved_branch_grads: bool = True,
          branch_grads_gpu_gib: float = 1.0, fused_kernel: bool = True, check_finite: bool = True,
          **lomo_options) -> LOMO:
    """The model made fast in place, and its LOMO with every attachment that applies. lomo_options go to LOMO
    (loss_scaler, max_consecutive_skips)."""
    check_budget(branch_grads_gpu_gib)
    if rule is not None and weight_decay:
        raise ValueError(f"weight_decay={weight_decay} with rule={type(rule).__name__}: weight decay is a rule's "
                         f"own setting (lomo.SGD(weight_decay=...))")
    apply_layers(model, activation_checkpointing, offload_checkpoints)
    rule = rule if rule is not None else SGD(weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    fp16 = lomo_options.get("loss_scaler") is not None or any(p.dtype == torch.float16 for p in params)
    norm_pass = clip_grad_norm is not None or fp16
    extensions = []
    # Gram norms give the plain norm of a layer's gradient: not the value-clipped one, not dp's average over
    # replicas (whose Gram needs every replica's tokens), and not under fp16 (a scaled gradient's Gram overflows).
    if gram_norms and norm_pass and clip_grad_value is None and dp_group is None and not fp16:
        extensions.append(gram_norm.GramNorms(model, params))
    if saved_branch_grads and norm_pass and activation_checkpointing:
        extensions.append(offload.SavedBranchGrads(gpu_gib=branch_grads_gpu_gib))
    fast_paths = [fused_update.VectorGroup()]
    if fused_kernel:
        fast_paths.append(fused_update.TritonAxpy())
    fast_paths.append(fused_update.TorchAxpy())
    guard = DeferredGuard() if check_finite else Unchecked()
    lomo = LOMO(model, lr, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value, tp_group=tp_group,
                dp_group=dp_group, rule=rule, guard=guard, fast_paths=fast_paths, extensions=extensions,
                **lomo_options)
    if compile:
        compile_blocks(model, backend=compile_backend, backward_twice=lomo.needs_norm_pass)
    return lomo


def apply_layers(model, activation_checkpointing: bool = False, offload_checkpoints: bool = False):
    """Steps 1 and 2 alone (bench.py's other modes measure the same model): the fast layers, and checkpointing."""
    if offload_checkpoints and not activation_checkpointing:
        raise ValueError("offload_checkpoints (--offload-checkpoints) moves the block inputs that checkpointing "
                         "saves: add activation_checkpointing (--activation-checkpointing)")
    fast_layers.apply(model)
    if activation_checkpointing:
        offload.apply_checkpointing(model, host=offload_checkpoints)
    return model


def check_cuda_graph(dtype: str, device: torch.device, offload_checkpoints: bool = False):
    """What CUDA graphs of the step cannot hold, refused before any model is built (GraphedStep checks the rest)."""
    if dtype != "bf16":
        raise ValueError(f"--cuda-graph with --dtype {dtype}: the graphed step's kernel updates bf16 weights (and "
                         f"fp16's loss scale changes between steps): add --dtype bf16")
    if device.type != "cuda":
        raise ValueError("--cuda-graph replays CUDA graphs: it needs a GPU (--device cuda)")
    if offload_checkpoints:
        raise ValueError("--cuda-graph needs the checkpoints kept on the GPU: drop --offload-checkpoints")


def check_budget(branch_grads_gpu_gib: float):
    if not (math.isfinite(branch_grads_gpu_gib) and branch_grads_gpu_gib >= 0):
        raise ValueError(f"--branch-grads-gpu-gib={branch_grads_gpu_gib} must be a number >= 0 (0: keep the "
                         f"saved gradients in host memory only)")


def report(model, lomo: LOMO) -> dict:
    """Which accelerations this LOMO's step uses, for logs and bench.py's rows."""
    kernel = next((path for path in lomo.fast_paths if isinstance(path, fused_update.TritonAxpy)), None)
    grams = next((e for e in lomo.extensions if isinstance(e, gram_norm.GramNorms)), None)
    saved = next((e for e in lomo.extensions if isinstance(e, offload.SavedBranchGrads)), None)
    compiled = any(getattr(block, "_compiled_call_impl", None) is not None for block in model.layers)
    return dict(fused_kernel=bool(kernel is not None and lomo.guard.checks and not lomo.needs_norm_pass
                                  and kernel.claim(lomo)),
                gram_norms=bool(grams is not None and grams.layers) and not compiled,
                saved_branch_grads=saved is not None and not compiled,
                branch_grads_gpu_gib=saved.gpu_gib if saved is not None else None,
                checkpointing=offload.checkpointing_of(model), compiled=compiled,
                deferred_checks=isinstance(lomo.guard, DeferredGuard) and lomo.guard.checks)


def compile_blocks(model, backend: str = "inductor", backward_twice: bool = False):
    """torch.compile each block in place (--compile). Names and parameters are unchanged, so checkpoints,
    sharding and LOMO's hooks see the same model; only the block's elementwise work (norms, rotary, SwiGLU,
    residuals) is fused into fewer kernels and launched with less CPU time.

    backward_twice: LOMO will run backward twice over one graph (clipping by norm, or fp16). Compiled
    backward reuses ("donates") the buffers it saved by default, which refuses a second backward with an
    error; this turns the donation off (for the whole process: compilation happens later, lazily)."""
    if backward_twice:
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False
    for layer in model.layers:
        layer.compile(backend=backend)
    return model
