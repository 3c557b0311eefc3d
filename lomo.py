"""LOMO: SGD fused into the backward pass, so that at most one parameter gradient is alive at a time.

Lv et al., "Full Parameter Fine-tuning for Large Language Models with Limited Resources" (2023).

How it works:
- Every trainable matrix gets one `register_post_accumulate_grad_hook`. Autograd calls it the moment
  that parameter's gradient is complete; the hook takes the gradient out of `.grad`, updates the
  parameter with SGD in fp32 maths, writes the result back in the parameter's dtype, and lets the
  gradient go. Gradient memory is therefore one matrix (the largest), not the whole model. The vectors
  (the norm weights: a few KiB each) are cheaper updated together once backward is done.
  (The official code hooks the gradient *before* it is accumulated and scans all parameters for the
  previous one, so it lags one parameter behind and needs a manual call after backward; the
  post-accumulate hook, PyTorch >= 2.1, needs neither.)
- There is no `optimizer.step()`: `LOMO.step(loss, lr)` runs the backward pass(es) and is the step.
- Clipping by global gradient norm needs the norm of *all* gradients before *any* parameter is
  updated, but the update happens inside backward, parameter by parameter. So clipping runs backward
  twice: pass 1 only adds each gradient's squared norm into one scalar on the device (no host sync
  per parameter) and frees the gradient; one sync reads the norm and decides the clip factor; pass 2
  runs backward again over the retained graph and updates. Clipping by value needs one pass. In pass 1
  most linear layers give their norm from two small Gram matrices instead of a gradient (gram_norm.py):
  fewer FLOPs, and those gradients are never made at all. With checkpointed blocks, pass 1 also keeps the
  gradient at each block's two branch inputs (the first GiB on the GPU, the rest in host memory), and pass
  2 starts each block's backward from them, so no input gradient of wq, wk, wv, w1 or w3 is computed twice
  (offload.py).
- fp16 needs dynamic loss scaling, and an overflow must be known before any weight changes, so fp16
  always takes the norm pass: a non-finite norm means overflow, the step is skipped with every weight
  untouched, and the scale is halved. It doubles after `growth_interval` clean steps (the official
  code never grows it back).
- bf16/fp32: a non-finite loss skips the step before any weight moves. With a norm pass it is read with
  the norm. In one pass on a GPU with Triton, bf16 matrices are updated by fused_update.py's kernel (and
  the vectors by a multi-tensor add), which read whether the loss is finite from a flag on the device and
  change nothing if not: the step never waits for its loss, and the host learns that it was skipped when
  it reads the loss (`StepResult.skipped`); `check_previous_step()` counts the skip, so a run of too many
  raises there or at the next step, and `consecutive_skips` (and `state_dict()`) are current only after
  it. Any other one-pass update (the CPU, fp32, weight decay, value clipping, `fused_kernel=False`)
  waits for the loss first: it is copied to the host when the step begins and read at the first
  such update (by then long computed, with backward's first kernels queued), and a non-finite one makes
  the rest of that backward only free gradients. With a norm pass a non-finite norm skips the step as well.
  Without one (the fast default: one backward), each gradient's norm is still summed on the device as
  it goes by (the kernel does it in the same read as the update; as a separate PyTorch op it is one more
  read, 1.5-2.5% of a 7B step), and the step reports the norm, but a gradient can only be
  checked after its weights have moved. So the step does not wait for the norm either: it is copied to the
  host without waiting, and a non-finite one with a finite loss (rare outside fp16) stops training with an
  error saying to resume from a checkpoint with clipping on, raised by `check_previous_step()` (train.py
  calls it before writing each step's row) or else when the next step begins, before any of its weights
  moves. Masking each gradient before its update would cost one more read and write of every gradient (~5%
  of a step, PERF_NOTES.md) for a step that is then half applied anyway. Many skipped steps in a row stop
  training too.
  `check_finite=False` drops the loss read and the norms, as the paper's LOMO does: a step with no host
  sync and nothing beyond backward and the update, for users who check elsewhere (train.py then stops on
  a non-finite loss and checks the weights before each save and export).

CUDA graphs (cuda_graph.py) replay kernels with the arguments they were captured with and run no Python, so
the step is also offered in parts: the host's (`begin_graphed_step`, `after_graphed_norm_pass`,
`end_graphed_step`) and the device's (`device_pass`: one backward pass whose every update is the kernel,
reading alpha, the lr with the clip factor, from a tensor on the device). There the norm pass keeps all its
saved branch gradients on the GPU (a capture cannot wait for host copies), within `branch_grads_gpu_gib`.

Weight decay is L2 regularization added to the gradient (g + wd * w), exactly as `torch.optim.SGD`'s
`weight_decay`; with a constant lr this equals decoupled decay with factor lr * wd.

Left out: momentum (it is optimizer state, which LOMO exists to avoid), fp32 master weights (each
step rounds back to the parameter's dtype, as in the paper), gradient accumulation (an update made
inside backward cannot wait for later micro-batches), and AdaLomo.
"""
import math
from typing import Optional

import torch
import torch.distributed as dist

import fused_update
import gram_norm
import offload
from step_result import StepResult, copy_to_host, read

# The fp32 update of a bf16/fp16 parameter runs in chunks of this many elements, so its temporaries
# stay bounded (2**24 elements = 64 MiB per fp32 temporary) however large the parameter.
UPDATE_CHUNK_NUMEL = 2**24


class DynamicLossScaler:
    """Loss scaling for fp16: multiply the loss so small gradients do not underflow fp16.

    Start at `init_scale`; halve on overflow (the step is skipped); double after `growth_interval`
    steps in a row without overflow. An overflow at `min_scale` is an error: the gradients overflow
    fp16 even without scaling, so no scale can help.
    """

    def __init__(self, init_scale=2.0**16, growth_interval=1000, min_scale=1.0):
        if init_scale < min_scale:
            raise ValueError(f"init_scale={init_scale} is below min_scale={min_scale}")
        self.scale, self.growth_interval, self.min_scale = float(init_scale), growth_interval, float(min_scale)
        self.clean_steps = 0

    def update(self, overflow: bool, step: int):
        if overflow:
            if self.scale <= self.min_scale:
                raise FloatingPointError(
                    f"step {step}: fp16 gradients overflow even at the minimum loss scale {self.min_scale}; "
                    f"train in bf16 (--dtype bf16), lower the learning rate, or clip gradients")
            self.scale = max(self.scale / 2, self.min_scale)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale *= 2
                self.clean_steps = 0

    def state_dict(self):
        return dict(scale=self.scale, clean_steps=self.clean_steps,
                    growth_interval=self.growth_interval, min_scale=self.min_scale)

    def load_state_dict(self, state):
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
        self.growth_interval, self.min_scale = int(state["growth_interval"]), float(state["min_scale"])


class LOMO:
    """Fused backward + SGD update. Usage: `result = lomo.step(loss, lr)` instead of backward/step."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                 clip_grad_norm: Optional[float] = None, clip_grad_value: Optional[float] = None,
                 loss_scaler: Optional[DynamicLossScaler] = None, max_consecutive_skips: int = 25,
                 tp_group=None, dp_group=None, gram_norms: bool = True, check_finite: bool = True,
                 fused_kernel: bool = True, saved_branch_grads: bool = True, branch_grads_gpu_gib: float = 1.0):
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} must be a finite number >= 0")
        if not (math.isfinite(branch_grads_gpu_gib) and branch_grads_gpu_gib >= 0):
            raise ValueError(f"branch_grads_gpu_gib={branch_grads_gpu_gib} must be a finite number >= 0 (0: keep "
                             f"the norm pass's saved gradients in host memory only)")
        for name, value in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value} must be a positive number, or None to turn it off")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._names = {id(p): name for name, p in model.named_parameters()}  # for error messages
        if not self.params:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
        if any(p.dtype == torch.float16 for p in self.params) and loss_scaler is None:
            loss_scaler = DynamicLossScaler()  # fp16 without loss scaling underflows; never run it bare
        self.lr, self.weight_decay = lr, weight_decay
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.loss_scaler, self.max_consecutive_skips = loss_scaler, max_consecutive_skips
        # One-pass mode (no clipping by norm, no fp16) checks by default: the loss is read before the first
        # update (a non-finite one skips the step) and every gradient's norm is summed on the device (reported;
        # a non-finite one stops training, at check_previous_step). check_finite=False drops both, as the
        # paper's LOMO: no extra read of each gradient (1.5-2.5% of a 7B step on an H200, PERF_NOTES.md), and
        # a non-finite loss or gradient reaches the weights unseen. A norm pass always checks: its norm is
        # the check.
        self.check_finite = check_finite
        # On a GPU with Triton, a checked one-pass step updates each bf16 matrix and sums its gradient's
        # squares in one kernel (fused_update.py): one read of the gradient instead of two. False: the two
        # PyTorch ops (for comparison: bench.py --no-fused-kernel).
        self.fused_kernel = fused_kernel
        # With a norm pass and checkpointed, uncompiled blocks, the update pass takes each block's chain of
        # input gradients from the norm pass instead of computing it again (offload.py): same result, fewer
        # FLOPs. False: both passes compute everything (for comparison: bench.py --no-saved-branch-grads).
        self.saved_branch_grads = saved_branch_grads
        # Of those saved gradients (two (batch, seq, dim) tensors per block), the first this many GiB stay on
        # the GPU and the rest wait in pinned host memory: a host copy saves GPU memory but costs PCIe copies
        # and the CPU that issues them, in a step often bound by that CPU (offload.py). 7B at 4 x 512 saves
        # exactly 1 GiB, so the default keeps all of it on the GPU there; 0: all in host memory.
        self.branch_grads_gpu_gib = branch_grads_gpu_gib
        self.step_count, self.consecutive_skips = 0, 0
        # Parallelism (shard.py): a parameter with a `tensor_parallel_dim` attribute is split across the
        # tp group; one without is replicated there. Every parameter is replicated across the dp group.
        self.tp_group, self.dp_group = tp_group, dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self._single_pass = False
        # What the hooks do is set by step() for each pass: None (plain autograd, hooks do nothing),
        # "norm" (pass 1: accumulate the squared norm), "update" (apply SGD) or "discard" (the loss turned
        # out non-finite: free each gradient, change nothing).
        self._mode = None
        self._loss_on_host = None  # (host copy, CUDA event) of a checked one-pass step's loss, until read
        # On a GPU: whether that loss is finite, as a flag on the device (uint8), which fused_update.py's
        # kernel reads instead of the host waiting for the loss: a non-finite loss makes it write nothing.
        self._loss_is_finite = None
        self._step_loss = None  # that loss on the device, from which the flag is made at the first kernel
        self._unchecked_result = None  # the last checked one-pass step, until check_previous_step reads its norm
        # fused_update.py's kernel reads alpha (-lr) from this 0-dim float32 tensor on the device, filled when a
        # step begins: one buffer for all steps, so that a CUDA graph of a step (cuda_graph.py) reads each
        # step's lr from the address it captured.
        self._alpha = None
        # True while cuda_graph.py captures a step (device_pass): the vectors then go through the kernel too
        # (the multi-tensor add takes alpha as a number, which a graph would keep from its capture).
        self._capturing = False
        self._graph_saved = None  # a captured norm pass's saved branch gradients, until pass 2 is captured
        # Vectors (1-D parameters: the RMSNorm weights, 65 of them in 7B, 0.5 MiB in bf16) get no hook. Their
        # gradients accumulate during backward and are applied together after it with multi-tensor kernels,
        # instead of a Python hook, a norm and an update launch each: CPU time, in an eager step that is
        # partly launch-bound (PERF_NOTES.md, change 19). Alive beyond the largest gradient: (2 L + 1) d
        # elements. Every matrix keeps its hook, so gradient memory stays that of one matrix.
        self._vectors = [p for p in self.params if p.dim() <= 1]
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params if p.dim() > 1]
        # The norm pass may take linear layers' norms from Gram matrices, without their gradients
        # (gram_norm.py), where that norm is the one needed: not with value clipping (the norm is of
        # clipped gradients), dp (of the average over replicas) or loss scaling (fp16 Grams can overflow).
        self._gram_norms = (gram_norms and self.needs_norm_pass and clip_grad_value is None
                            and dp_group is None and loss_scaler is None)
        # A weight that another module uses too (a head tied to the embedding) gets gradient from both, and
        # the norm is of their sum: Grams of one use cannot give it, so such layers keep the gradient.
        uses = {}
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None:
                    uses[id(param)] = uses.get(id(param), 0) + 1
        trained = {id(p) for p in self.params}
        self._gram_layers = [m for m in model.modules() if hasattr(m, "gram_norm")]
        for layer in self._gram_layers:
            layer.gram_norm = self._gram_norms and uses[id(layer.weight)] == 1 and id(layer.weight) in trained
        self._gram_weights = {id(layer.weight) for layer in self._gram_layers if layer.gram_norm}

    # ------------------------------------------------------------------------------------------------
    # The hook: runs once per parameter per backward pass, as soon as its gradient is complete.

    def _hook(self, param):
        # Autograd runs this with grad mode off (as for any backward without create_graph), so the in-place
        # updates below are not recorded. It runs ~300 times a step: kept lean.
        grad = param.grad
        if grad is None or self._mode is None:
            # None: a gram_norm layer in the norm pass (its norm was recorded, no gradient was made). Mode
            # None: a backward outside step() (a diagnostic, a test) leaves .grad to the caller.
            return
        param.grad = None  # free it now: this is where LOMO's memory saving comes from
        # A checked one-pass step (and a captured update pass, cuda_graph.py): the update and the sum of squares in
        # one kernel, which reads the loss's finiteness on the device (no host wait). Any other update of such a
        # step waits for the loss first.
        fuse = ((self._single_pass or (self._capturing and self._mode == "update")) and self._can_fuse(param, grad)
                and self._step_loss.device == param.device)
        if self._loss_on_host is not None and not fuse:
            self._read_loss()  # the first unguarded update of a checked one-pass step: is the loss finite?
        if self._mode == "discard":
            return  # (every dp replica decides on the same averaged loss, so none enters the all-reduce)
        if self.dp_group is not None:
            # Data parallelism: average this gradient over the dp replicas before using it, so every
            # replica computes the same norm and applies the same update and they stay equal.
            grad.div_(self.dp_size)  # divide first: in fp16 the sum of scaled gradients could overflow
            dist.all_reduce(grad, group=self.dp_group)
        if self._mode == "norm":
            self._record_norm(param, grad)
            return
        # No norm pass vouched for a one-pass step's gradient: its norm is recorded on the device (no host
        # sync); the total is checked by check_previous_step (the next step() calls it first).
        if fuse:
            self._update_with_kernel(param, grad)
            return
        if self._capturing:  # (cuda_graph.py checks every weight first; this would bake one step's lr in the graph)
            raise RuntimeError(f"{self._names.get(id(param), 'a weight')} cannot be updated by the kernel, which a "
                               f"CUDA graph of the step needs (fused_update.available)")
        if self._single_pass:
            self._record_norm(param, grad)
        self._update(param, grad)

    def _update_with_kernel(self, param, grad):
        """_update's CUDA fast path and _record_norm in one read of the gradient (fused_update.py), guarded by
        a flag on the device: whether this step's loss is finite (if not, the kernel writes no weight)."""
        if self._loss_is_finite is None:  # the step's first kernel makes the flag (queued after the loss)
            self._loss_is_finite = torch.isfinite(self._step_loss).view(torch.uint8)
        try:
            fused_update.update_and_sum_squares(param, grad, self._alpha, self._square_sum_slots(param),
                                                self._loss_is_finite)
        except Exception as error:  # a Triton that cannot build for this GPU, say
            raise RuntimeError(
                f"fused_update.py's Triton kernel failed on {self._names.get(id(param), 'a weight')} "
                f"({type(error).__name__}: {error}); use the PyTorch ops instead: LOMO(fused_kernel=False), "
                f"train.py/bench.py --no-fused-kernel") from error

    def _read_loss(self):
        """Before the first weight of a checked one-pass step moves: the loss, copied to the host when the
        step began, is read now (long computed: no wait, and backward's first kernels are already queued, so
        the GPU does not idle as it would after a read before backward). If it is not finite, the rest of
        the pass only frees gradients ("discard") and step() reports the step skipped."""
        self._loss_value, self._loss_on_host = read(self._loss_on_host), None
        if not math.isfinite(self._loss_value):
            self._mode = "discard"

    @torch.no_grad()  # outside backward, unlike the hooks: the in-place updates must not be recorded
    def _finish_vectors(self):
        """After a backward pass: what the hook does for each matrix, done for all the vectors at once."""
        params = [p for p in self._vectors if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        same_dtype = len({g.dtype for g in grads}) == 1
        multi_tensor = (same_dtype and params[0].is_cuda and params[0].dtype in (torch.bfloat16, torch.float16)
                        and self.clip_grad_value is None and not self.weight_decay)
        # The loss may still be unread (the kernel guarded every matrix): the multi-tensor update below can
        # guard itself with the same flag; the others wait for it.
        guarded = multi_tensor and self._loss_is_finite is not None
        if self._mode != "norm" and self._loss_on_host is not None and not guarded:
            self._read_loss()
        if self._mode == "discard":
            return
        if self.dp_group is not None:
            grads = _average_flat(grads, self.dp_size, self.dp_group)  # one all-reduce, not one per vector
        if self._capturing and self._mode == "update":  # one kernel each, alpha read on the device (65 in 7B)
            for p, g in zip(params, grads):
                self._update_with_kernel(p, g)
            return
        if self._mode == "norm" or self._single_pass:
            if self.clip_grad_value is None and same_dtype:
                norms = torch._foreach_norm(grads, 2, dtype=torch.promote_types(grads[0].dtype, torch.float32))
                for p, norm in zip(params, norms):
                    self._keep_norm(p, norm)
            else:
                for p, g in zip(params, grads):
                    self._record_norm(p, g)
        if self._mode == "norm":
            return
        if multi_tensor:
            # As _update's CUDA fast path (fp32 maths, one rounding), in a few kernels for all of them.
            if self._loss_on_host is not None:  # unread: a non-finite loss zeroes the gradients (0.5 MiB in 7B)
                flat = torch.cat([g.reshape(-1) for g in grads]).where(self._loss_is_finite.bool(), 0.0)
                grads = [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads)]
            torch._foreach_add_(params, grads, alpha=-self._lr * self._clip_coef * self._inv_scale)
            return
        for p, g in zip(params, grads):
            self._update(p, g)

    def _record_norm(self, param, grad):
        # Each gradient's norm stays on the device as a 0-dim tensor (one kernel, no host sync); the
        # global norm is reduced from them once, after the pass. Sharded tensors' norms go apart from
        # replicated ones (the norm weights), which every tp rank holds whole and must count once.
        if self.clip_grad_value is None:
            # One read of the gradient. On GPUs a bf16/fp16 tensor is reduced in fp32 without an fp32 copy.
            # (The loss scale comes off after the pass: squaring a scaled fp16 gradient could overflow.)
            norm = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32))
        else:
            # The norm must be of the gradients that will be applied, i.e. unscaled and value-clipped: fp32
            # temporaries, in bounded chunks.
            norm = sum(torch.linalg.vector_norm((chunk.float() * self._inv_scale).clamp_(
                -self.clip_grad_value, self.clip_grad_value)).square()
                for chunk in grad.view(-1).split(UPDATE_CHUNK_NUMEL)).sqrt()
            if self.loss_scaler is not None:
                # Clamping turns an fp16 overflow (inf) into clip_value; the overflow must still skip the
                # step and halve the scale, so a non-finite raw gradient makes the norm non-finite (0 * inf).
                norm = norm + 0.0 * torch.linalg.vector_norm(grad, dtype=torch.float32)
        self._keep_norm(param, norm)

    @property
    def uses_fused_kernel(self) -> bool:
        """Whether a step updates the matrices with fused_update.py's kernel: a checked one-pass step, with
        bf16 weights on a GPU with Triton, no value clipping and no weight decay (fp16 takes the norm pass)."""
        return (self.check_finite and not self.needs_norm_pass
                and any(self._can_fuse(p, p) for p in self.params if p.dim() > 1))

    def _can_fuse(self, param, grad):
        # fused_update.py computes exactly _update's CUDA fast path plus the plain (unclipped) norm.
        return (self.fused_kernel and self.clip_grad_value is None and not self.weight_decay
                and fused_update.available(param, grad))

    def _square_sum_slots(self, param):
        # fused_update's per-program sums of squares, one buffer per norm group (as _keep_norm's lists).
        group = "sharded" if hasattr(param, "tensor_parallel_dim") else "replicated"
        if group not in self._square_sums:
            self._square_sums[group] = fused_update.new_slots(param.device)
        return self._square_sums[group]

    def _keep_gram_norm(self, weight, norm):
        # gram_norm.py's recorder in the norm pass. A weight reached twice in one backward (a layer called
        # twice) has the norm of the sum of its uses' gradients, which the Grams of each use cannot give.
        if id(weight) not in self._gram_weights:
            return  # not a layer LOMO turned this on for (another model's, say): not this step's gradient
        if id(weight) in self._gram_seen:
            raise RuntimeError(
                f"{self._names.get(id(weight), 'a weight')} is used more than once in one forward (a layer "
                f"called twice?), so its gradient norm cannot come from Gram matrices; no weight has moved. "
                f"Construct LOMO with gram_norms=False")
        self._gram_seen.add(id(weight))
        self._keep_norm(weight, norm)

    def _keep_norm(self, param, norm):
        (self._sharded_norms if hasattr(param, "tensor_parallel_dim") else self._replicated_norms).append(norm)

    def _update(self, param, grad):
        low_precision = param.dtype in (torch.bfloat16, torch.float16)
        if low_precision and self.clip_grad_value is None and not self.weight_decay:
            # The common bf16/fp16 case: w32 = fp32(w) + alpha * g, with the unscaling and the clip factor
            # folded into alpha, then rounded back into w. Adding the bf16 gradient to the fp32 copy computes
            # in fp32 with an fp32 alpha; one temporary per chunk instead of three. (On the CPU a bf16
            # w.add_(g, alpha) rounds alpha itself to bf16; on CUDA it does not, and is one kernel.)
            alpha = -self._lr * self._clip_coef * self._inv_scale
            if param.is_cuda:  # CUDA's add_ keeps alpha in fp32 and computes in fp32: one kernel, no copies
                param.add_(grad, alpha=alpha)
                return
            for p_piece, g_piece in zip(param.view(-1).split(UPDATE_CHUNK_NUMEL), grad.view(-1).split(UPDATE_CHUNK_NUMEL)):
                p_piece.copy_(p_piece.float().add_(g_piece, alpha=alpha))
            return
        # fp32 (and float64) parameters are updated in place with exactly torch.optim.SGD's operations,
        # which keeps them bit-identical to it. Other lower-precision updates go through fp32 in bounded chunks.
        if not low_precision:
            pieces = [(param, grad)]
        else:
            pieces = zip(param.view(-1).split(UPDATE_CHUNK_NUMEL), grad.view(-1).split(UPDATE_CHUNK_NUMEL))
        for p_piece, g_piece in pieces:
            g32, p32 = (g_piece.float(), p_piece.float()) if low_precision else (g_piece, p_piece)  # no copies
            if self._inv_scale != 1.0:
                g32.mul_(self._inv_scale)
            if self.clip_grad_value is not None:
                g32.clamp_(-self.clip_grad_value, self.clip_grad_value)
            if self._clip_coef != 1.0:
                g32.mul_(self._clip_coef)
            if self.weight_decay:
                g32 = g32.add(p32, alpha=self.weight_decay)
            p32.add_(g32, alpha=-self._lr)
            if p32.data_ptr() != p_piece.data_ptr():
                p_piece.copy_(p32)  # round the fp32 result back into the bf16/fp16 parameter

    # ------------------------------------------------------------------------------------------------
    # One training step.

    @property
    def needs_norm_pass(self) -> bool:
        return self.clip_grad_norm is not None or self.loss_scaler is not None

    def step(self, loss: torch.Tensor, lr: Optional[float] = None) -> StepResult:
        """Backward (once, or twice with clipping/fp16) with the update fused in. Returns what happened."""
        lr = self._begin_step(lr)
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        mean_loss = loss.detach().clone()
        if self.dp_group is not None:
            # The mean over the dp replicas, for the report, and so that a non-finite loss on any
            # replica is seen by all of them: they must take the same decision or the next
            # collective would hang.
            dist.all_reduce(mean_loss, group=self.dp_group)
            mean_loss /= self.dp_size
        result = StepResult(step=self.step_count, lr=lr, loss_scale=scale if self.loss_scaler is not None else None)
        unchecked = not self.needs_norm_pass and not self.check_finite
        if unchecked:
            result.loss = copy_to_host(mean_loss)  # read when asked for: this step makes no host sync
        elif not self.needs_norm_pass:
            # A non-finite loss gives non-finite gradients, and in one pass they would reach the weights. It
            # is copied to the host now without waiting, and read before the first update (_read_loss).
            # (With a norm pass the loss is read with the norm, in one sync after pass 1: a non-finite loss
            # makes a non-finite norm, and no weight has moved.)
            self._loss_on_host = copy_to_host(mean_loss)
            self._step_loss = mean_loss  # fused_update.py's kernel makes its flag from it
        scaled_loss = loss * scale if scale != 1.0 else loss
        self._inv_scale, self._clip_coef, self._lr = 1.0 / scale, 1.0, lr
        if not self.needs_norm_pass and not unchecked and self.fused_kernel:
            self._fill_alpha(loss.device, -lr)  # for the kernel (a one-pass step has no clip factor or scale)
        saved = []  # the norm pass's saved branch gradients (offload.py), let go when the step ends
        try:
            if self.needs_norm_pass:
                self._mode = "norm"
                self._reset_norm(loss.device)
                self._gram_seen = set()
                with gram_norm.recording(self._keep_gram_norm if self._gram_norms else None), \
                        offload.branch_gradients("save" if self.saved_branch_grads else None,
                                                 gpu_bytes=int(self.branch_grads_gpu_gib * 2**30)) as saved:
                    scaled_loss.backward(retain_graph=True)
                self._finish_vectors()
                skipped = self._after_norm_pass(result, self._global_norm(), mean_loss)
                if skipped is not None:
                    return skipped
            # _single_pass: one-pass mode with its checks, where the update pass records the norms.
            self._mode, self._single_pass = "update", not self.needs_norm_pass and not unchecked
            if self._single_pass:
                self._reset_norm(loss.device)
            reuse = self.needs_norm_pass and self.saved_branch_grads
            with offload.branch_gradients("reuse" if reuse else None):
                scaled_loss.backward()
            self._finish_vectors()
            # Still unread with a flag made: every update was guarded on the device by it. The host learns
            # whether the step was skipped when it reads the loss.
            unread_loss = self._loss_on_host if self._loss_is_finite is not None else None
            if self._loss_on_host is not None and unread_loss is None:
                self._read_loss()  # no gradient reached any parameter
            discarded = self._mode == "discard"
        finally:
            self._mode, self._loss_on_host, self._loss_is_finite, self._step_loss = None, None, None, None
            for record in saved:  # used up by the update pass; else (a skip, an error) not kept with the graph
                record.release()
            for p in self._vectors:
                p.grad = None  # after an error inside backward: nothing of this step may leak into the next
        if discarded:
            result.loss = self._loss_value
            return self._skip(result, f"non-finite loss {result.loss}")
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow=False, step=self.step_count)
        if self._single_pass:
            # The norm is only known once this step's weights have moved, so nothing is gained by waiting for it
            # now (a host sync: the GPU would idle while the CPU launches the next forward). It is copied to the
            # host without waiting, and checked when the next step begins (check_previous_step).
            result.grad_norm = copy_to_host(self._global_norm())
            if unread_loss is not None:
                result.loss, result._loss_decides = unread_loss, True
                self._unchecked_result = result
                return result  # skipped or not: counted by check_previous_step
            result.loss = self._loss_value
            self._unchecked_result = result
        self.consecutive_skips = 0
        return result

    def _after_norm_pass(self, result: StepResult, grad_norm: torch.Tensor, mean_loss: torch.Tensor):
        """Between the passes: the norm and the loss read (one host sync); the skipped result, or None with the
        clip factor set for the update pass."""
        grad_norm, result.loss = torch.stack([grad_norm, mean_loss.float()]).tolist()
        result.grad_norm = grad_norm
        if not math.isfinite(result.loss):
            return self._skip(result, f"non-finite loss {result.loss}")
        if not math.isfinite(grad_norm):
            if self.loss_scaler is not None:
                scale = self.loss_scaler.scale  # (the step's: update() halves it)
                self.loss_scaler.update(overflow=True, step=self.step_count)
                return self._skip(result, f"fp16 gradient overflow at loss scale {scale:g}")
            return self._skip(result, f"non-finite gradient norm {grad_norm}")
        if self.clip_grad_norm is not None:
            # The same formula as torch.nn.utils.clip_grad_norm_.
            self._clip_coef = min(1.0, self.clip_grad_norm / (grad_norm + 1e-6))
        return None

    def _begin_step(self, lr: Optional[float]) -> float:
        """The host's checks and count before a step's device work; returns the step's learning rate."""
        self.check_previous_step()  # before any weight of this step moves
        lr = self.lr if lr is None else lr
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"learning rate {lr} must be a finite number >= 0 (check the schedule's --min-lr-ratio)")
        stale = next((p for p in self.params if p.grad is not None), None)
        if stale is not None:
            raise ValueError(
                f"{self._names.get(id(stale), 'a parameter')} already has a .grad (from a backward run outside "
                f"LOMO.step), which this step would add to its gradient: clear it first with "
                f"model.zero_grad(set_to_none=True)")
        self.step_count += 1
        return lr

    def _fill_alpha(self, device, alpha: float):
        if self._alpha is None or self._alpha.device != device:
            self._alpha = torch.empty((), dtype=torch.float32, device=device)
        self._alpha.fill_(alpha)  # a kernel with the value as its argument: no host sync

    # ------------------------------------------------------------------------------------------------
    # A step as a CUDA graph (cuda_graph.py): the host's part before and after, the device's part between.

    def begin_graphed_step(self, device, lr: Optional[float] = None) -> StepResult:
        """Before the replay of a captured step: step()'s checks and count, and this step's alpha (-lr) into the
        buffer that the captured kernels read."""
        lr = self._begin_step(lr)
        self._fill_alpha(device, -lr)
        return StepResult(step=self.step_count, lr=lr)

    def device_pass(self, loss: torch.Tensor, phase: str = "one-pass"):
        """A backward pass of a step, with only device work: no host sync, no host copy, and no Python number
        that changes from step to step in a kernel's arguments (every update is fused_update.py's kernel, which
        reads alpha from the device), so that cuda_graph.py can capture it once and replay it.
        phase "one-pass": a checked one-pass step, its updates guarded by the loss's finiteness on the device;
        returns (the mean loss, the gradient norm), tensors on the device.
        "norm": pass 1 of a clipped step: the norm, and each block's branch gradients saved on the device for
        pass 2; returns (the mean loss, the norm). The host reads them and decides (after_graphed_norm_pass).
        "update": pass 2: the updates, with the clip factor in alpha; returns None."""
        mean_loss = loss.detach().clone()
        if self.dp_group is not None and phase != "update":
            dist.all_reduce(mean_loss, group=self.dp_group)  # the same mean, and the same decision, on every replica
            mean_loss /= self.dp_size
        self._capturing, self._inv_scale, self._clip_coef = True, 1.0, 1.0
        self._reset_norm(loss.device)
        try:
            if phase == "norm":
                self._mode, self._gram_seen = "norm", set()
                # Every saved gradient stays on the device: a host copy would wait on events, which a capture
                # cannot (cuda_graph.py checks the budget after the capture).
                with gram_norm.recording(self._keep_gram_norm if self._gram_norms else None), \
                        offload.branch_gradients("save" if self.saved_branch_grads else None, gpu_bytes=2**62) as saved:
                    loss.backward(retain_graph=True)
                self._graph_saved = saved  # for pass 2's capture, which takes them
                self._finish_vectors()
                return mean_loss, self._global_norm()
            self._mode, self._single_pass = "update", phase == "one-pass"
            # The kernel's flag: the loss's finiteness (pass 2 runs only after the host found it finite).
            self._step_loss = mean_loss if phase == "one-pass" else torch.ones((), device=loss.device)
            with offload.branch_gradients("reuse" if phase == "update" and self.saved_branch_grads else None):
                loss.backward()
            self._finish_vectors()
            return (mean_loss, self._global_norm()) if phase == "one-pass" else None
        finally:
            self._mode, self._loss_is_finite, self._step_loss, self._capturing = None, None, None, False
            self._single_pass = False
            for p in self._vectors:
                p.grad = None

    def graph_saved_bytes(self) -> int:
        """How many bytes of branch gradients the captured norm pass keeps on the device until pass 2."""
        return sum(copy.grad.numel() * copy.grad.element_size() for record in (self._graph_saved or [])
                   for copy in record.copies.values() if getattr(copy, "grad", None) is not None)

    def release_graph_saved(self):
        for record in self._graph_saved or []:
            record.release()
        self._graph_saved = None

    def after_graphed_norm_pass(self, result: StepResult, mean_loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """After the replay of a clipped step's norm pass: its norm and loss read (one host sync, as in step()),
        and the step skipped (False) or the clip factor put into alpha for the update pass (True)."""
        self._clip_coef = 1.0
        if self._after_norm_pass(result, grad_norm, mean_loss) is not None:
            return False
        self._fill_alpha(self._alpha.device, -result.lr * self._clip_coef)
        return True

    def end_graphed_step(self, result: StepResult, mean_loss: Optional[torch.Tensor] = None,
                         grad_norm: Optional[torch.Tensor] = None) -> StepResult:
        """After the replays: a one-pass step's loss and norm on their way to the host, counted by
        check_previous_step as for step(); a clipped step's were read between its passes."""
        if self.needs_norm_pass:
            self.consecutive_skips = 0
            return result
        result.loss, result._loss_decides = copy_to_host(mean_loss), True
        result.grad_norm = copy_to_host(grad_norm)
        self._unchecked_result = result
        return result

    def _reset_norm(self, device):
        self._sharded_norms, self._replicated_norms, self._norm_device = [], [], device
        self._square_sums = {}  # fused_update.py's buffers, by group

    def _global_norm(self):
        """The global gradient norm of this pass, on the device, from the norms its hooks recorded."""
        unscale = self._inv_scale if self.clip_grad_value is None else 1.0  # value clipping unscaled already
        sharded_norms, replicated_norms = list(self._sharded_norms), list(self._replicated_norms)
        for group, norms in (("sharded", sharded_norms), ("replicated", replicated_norms)):
            if group in self._square_sums:
                norms.append(self._square_sums[group].sum().sqrt())  # the fused kernel's gradients, as one norm

        def sum_of_squares(norms):
            if not norms:
                return torch.zeros((), device=self._norm_device)
            return (torch.stack(norms) * unscale).square().sum()

        sharded = sum_of_squares(sharded_norms)
        if self.tp_group is not None:
            dist.all_reduce(sharded, group=self.tp_group)  # each tp rank holds a different slice
        # Gradients were averaged over dp inside the hooks, so every dp replica has this same norm.
        return (sharded + sum_of_squares(replicated_norms)).sqrt()

    def check_previous_step(self):
        """Raise if the last one-pass step's gradient norm was not finite (waiting for it if it is still on its
        way from the device). step() calls this first, so training stops before another weight moves; call
        it before saving weights, since by then the bad step's update has already been applied. A step whose
        updates the device held back for a non-finite loss is counted here as skipped (too many in a row
        raise): call it before reading `consecutive_skips` or saving `state_dict()`."""
        result, self._unchecked_result = self._unchecked_result, None
        if result is None:
            return
        if result._loss_decides:
            if result.skipped:  # a non-finite loss: the kernel left every weight as it was
                self._count_bad_step(result)
                return
            self.consecutive_skips = 0
        if not math.isfinite(result.grad_norm):
            raise FloatingPointError(
                f"step {result.step}: gradient norm {result.grad_norm} with a finite loss ({result.loss:.4g}); in "
                f"one-pass mode the weights were updated before the norm was known, so some are no longer "
                f"finite. Resume from the last checkpoint (--resume) with --clip-grad-norm, whose norm pass "
                f"checks every gradient before any weight moves, or a lower --lr")

    def _skip(self, result: StepResult, reason: str) -> StepResult:
        for p in self.params:
            p.grad = None  # nothing of this step may leak into the next
        result.skipped, result.reason = True, reason
        return self._count_bad_step(result)

    def _count_bad_step(self, result: StepResult) -> StepResult:
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"step {result.step}: {self.consecutive_skips} bad steps in a row (last: {result.reason}); "
                f"training is diverging: lower the learning rate, enable --clip-grad-norm, or use bf16")
        return result

    # ------------------------------------------------------------------------------------------------
    # State: SGD has none; the step counter and the loss scaler are all there is to save.

    def state_dict(self):
        return dict(step_count=self.step_count, consecutive_skips=self.consecutive_skips,
                    loss_scaler=self.loss_scaler.state_dict() if self.loss_scaler is not None else None)

    def load_state_dict(self, state):
        self.step_count, self.consecutive_skips = int(state["step_count"]), int(state["consecutive_skips"])
        self._unchecked_result = None  # a step of before the restore is not this state's to count
        if (state["loss_scaler"] is None) != (self.loss_scaler is None):
            raise ValueError("the saved state and this LOMO disagree on loss scaling (fp16 vs bf16/fp32): "
                             "resume with the --dtype the run was started with")
        if self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(state["loss_scaler"])

    def remove_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._gram_layers:
            layer.gram_norm = False


def _average_flat(grads, dp_size, group):
    """The mean over the dp group of many small gradients, in one all-reduce per dtype (views of it)."""
    averaged = list(grads)
    for dtype in dict.fromkeys(g.dtype for g in grads):  # in the same order on every replica (not a set)
        indices = [i for i, g in enumerate(grads) if g.dtype == dtype]
        flat = torch.cat([grads[i].reshape(-1) for i in indices]).div_(dp_size)  # divide first, as the hook
        dist.all_reduce(flat, group=group)
        for i, piece in zip(indices, flat.split([grads[i].numel() for i in indices])):
            averaged[i] = piece.view_as(grads[i])
    return averaged


def learning_rate(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
                  min_lr_ratio: float = 0.0) -> float:
    """The learning rate of step `step` (1-based): linear warmup from base_lr / warmup_steps up to base_lr
    over `warmup_steps` steps, then constant, or a linear or cosine decay to min_lr_ratio * base_lr at
    `total_steps`. LOMO applies it inside backward, so it is computed before the step and passed in."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}: use constant, linear or cosine")
    if step <= warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * decay)
