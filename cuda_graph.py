"""A LOMO step as CUDA graphs (the forward; the backward pass or passes with the updates): captured once, then
replayed, so that no kernel launch costs the CPU.

Why: an eager 7B step launches thousands of kernels (forward, the recomputed blocks, backward, 226 hook
updates), each costing the CPU some microseconds. At small batches, and at tp = 2 where each GPU's share
of every matmul halves but the launches do not, the GPU waits for the CPU that issues them
(PERFORMANCE.md, 'CUDA graphs'). A CUDA graph records kernels once; a replay launches all of them with one call.

What a graph needs: it replays the kernels it recorded, with the same arguments, and runs no Python. So
nothing inside it may need the host: no sync, no decision made on a value read back, no number that changes
from step to step baked into a kernel's arguments. LOMO's checked one-pass step with the deferred guard is
nearly like that already (fused_update.TritonAxpy reads whether the loss is finite from a flag on the device).
The graphs capture LOMO's own public phases (`LOMO.backward_pass`, `LOMO.norm`, `LOMO.decide`, the same that
an eager `LOMO.step` runs) under `capturing(lomo)`, which makes the rest so: every update, the norm weights'
too, is the kernel, which reads alpha (-lr) from a tensor on the device filled before each replay, and the
loss and norm stay on the device until the replay is done. They then go to the host as after an eager step,
and `check_previous_step()` checks them.
A clipped step (`clip_grad_norm`) has three graphs: the forward, the norm pass, and the update pass; between
the last two the host reads the norm (one sync, as in the eager step), skips the step or puts the clip factor
into alpha.

How a step goes: `loss = graphed.forward(inputs, targets)`, then `graphed.step(loss, lr)`:
- The first `warmup_steps` steps are eager (`model_loss`, `LOMO.step`: real training steps): they compile
  the Triton kernel and make cuBLAS's and NCCL's handles, which must not happen during a capture.
- The next forward() captures the forward on copies of its batch (static input tensors), and the next
  step() captures the backward pass(es) in graphs that share the first one's memory. Capturing records
  kernels without running any, and the hooks' Python runs during it, once; then each call replays its graphs.
- Every later forward() copies its batch into the static inputs and replays the forward graph; step()
  checks the previous step (as `LOMO.step` does before any weight moves), fills alpha, and replays the rest.
  The forward is its own graph so that the host waits for the previous step's norm while the GPU runs this
  step's forward, as in an eager step, instead of the GPU idling between two whole-step replays.
- The graphs keep what LOMO was at the capture: changing its settings (but the lr and the clip threshold,
  which the host reads each step) or its weights' tensors afterwards is refused at the next step (make a new
  GraphedStep).

Memory: the graphs share one private pool as large as the step's peak, for their whole life, beside the rest
of the caching allocator's memory. A clipped step keeps all of its norm pass's saved branch gradients on the
GPU there (a host copy would wait on events, which a capture cannot): offload.SavedBranchGrads' `gpu_gib`
must cover them, else the capture is refused (raise --branch-grads-gpu-gib, or --no-saved-branch-grads).
One batch shape is captured; a batch of another shape runs eagerly (with a warning the first time), in the
other memory: keep the shape fixed (train.py pads every batch to --seq-len).

Before the process group goes: `release_graphs()` (train.py and bench.py call it just before
`destroy_distributed()`, on error too). A captured all-reduce keeps its NCCL communicator in use for as long as
its graph exists, and destroying the group waits for that: a 7B run at tp = 2 whose graphs were still alive
there would never exit. An error's traceback keeps the step's frames, and the graphs, alive: hence one call
that frees every GraphedStep's graphs, wherever it is held.

Left out (refused with the reason, by `obstacle`): fp16 (its loss scale changes between steps), a rule that is
not an axpy (weight decay, AdaLomo) and value clipping (their PyTorch-op updates take the lr as a number), the
unchecked or synchronous guards, offloaded checkpoints (side-stream copies into host buffers chosen at run
time), and CPUs.
"""
import contextlib
import warnings
import weakref
from typing import Callable, Optional

import torch

import fused_update
import offload
from lomo import LOMO, StepResult
from step_result import DeferredGuard, copy_to_host


def _path(lomo: LOMO, kind):
    return next((path for path in lomo.fast_paths if isinstance(path, kind)), None)


def _unfit(lomo: LOMO):
    """The trained weights that the kernel would not update under a capture."""
    kernel, vectors = _path(lomo, fused_update.TritonAxpy), _path(lomo, fused_update.VectorGroup)
    claimed = set(kernel.claim(lomo)) if kernel is not None else set()
    batched = set(vectors.params) if vectors is not None else set()
    return [lomo.name_of(p) for p in lomo.params
            if p not in claimed and not (p in batched and fused_update.available(p, p))]


def obstacle(model: torch.nn.Module, lomo: LOMO) -> Optional[str]:
    """Why this LOMO's step cannot be captured as CUDA graphs, with the way around it; None if it can."""
    if lomo.loss_scaler is not None:
        return "bf16 weights: fp16's loss scale changes from step to step, which a graph would keep (--dtype bf16)"
    if not lomo.guard.checks and not lomo.needs_norm_pass:
        return "the checked step, whose updates read the lr on the device (drop --no-finite-checks)"
    if not isinstance(lomo.guard, DeferredGuard):
        return "step_result.DeferredGuard, whose checks stay on the device (speedups.apply attaches it)"
    if _path(lomo, fused_update.TritonAxpy) is None:
        return "fused_update.py's kernel (drop --no-fused-kernel)"
    if offload.checkpointing_of(model) == "host":
        return "checkpoints kept on the GPU (drop --offload-checkpoints)"
    if lomo.rule.axpy_alpha(1.0) is None:
        return (f"an update rule that is w += alpha * g, read on the device; {type(lomo.rule).__name__} is not "
                f"(with SGD: no --weight-decay)")
    unfit = _unfit(lomo)
    if unfit:
        return (f"every trained weight updated by fused_update.py's kernel, which needs bf16 weights on a GPU "
                f"with Triton, and no --weight-decay or --clip-grad-value; not so: {', '.join(unfit[:3])}"
                f"{' and more' if len(unfit) > 3 else ''}")
    return None


@contextlib.contextmanager
def capturing(lomo: LOMO):
    """While a pass is captured: every update through the kernel (the vectors' too), every saved branch
    gradient on the GPU. Refuses a weight the kernel cannot take (obstacle says so before)."""
    unfit = _unfit(lomo)
    if unfit:
        raise RuntimeError(f"{unfit[0]} cannot be updated by the kernel, which a CUDA graph of the step needs "
                           f"(fused_update.available)")
    kernel, vectors = _path(lomo, fused_update.TritonAxpy), _path(lomo, fused_update.VectorGroup)
    saving = [e for e in lomo.extensions if isinstance(e, offload.SavedBranchGrads)]
    kernel.capturing = True
    if vectors is not None:
        vectors.kernel = kernel
    for extension in saving:
        extension.all_on_gpu = True
    try:
        yield kernel
    finally:
        kernel.capturing = False
        if vectors is not None:
            vectors.kernel = None
        for extension in saving:
            extension.all_on_gpu = False


def device_pass(lomo: LOMO, loss: torch.Tensor, phase: str = "one-pass"):
    """One backward pass of a step with only device work, under `capturing(lomo)`: "one-pass" (updates held
    back on the device for a non-finite loss) and "norm" return (the mean loss, the norm) on the device; "update"
    (the clip factor is in the kernel's alpha) returns None. What the norm pass saved stays until end_step()."""
    mean_loss = lomo.mean_loss(loss) if phase != "update" else None
    # The kernel's flag: the loss's finiteness (an update pass runs only after the host found it finite).
    lomo.guard.begin_on_device(mean_loss if phase == "one-pass" else torch.ones((), device=loss.device))
    try:
        lomo.backward_pass(phase, loss, retain_graph=phase == "norm")
        return (mean_loss, lomo.norm()) if phase != "update" else None
    finally:
        lomo.pass_kind = None
        for p in lomo.params:
            p.grad = None


def begin_replayed_step(lomo: LOMO, lr: Optional[float] = None) -> StepResult:
    """Before the replays: LOMO's checks and count (begin_step) and this step's alpha into the kernel's buffer."""
    result = lomo.begin_step(lr)
    _path(lomo, fused_update.TritonAxpy).set_alpha(lomo.axpy_alpha(), lomo.params[0].device)
    return result


def end_replayed_one_pass(lomo: LOMO, result: StepResult, mean_loss, grad_norm) -> StepResult:
    """After a one-pass replay: the loss and the norm on their way to the host, checked by check_previous_step."""
    result.grad_norm = copy_to_host(grad_norm)
    lomo.guard.finish(result, copy_to_host(mean_loss), loss_decides=True)
    return result


def decide_replayed(lomo: LOMO, result: StepResult, mean_loss, grad_norm) -> bool:
    """After a clipped step's norm-pass replay: LOMO.decide (one host sync), and the clip factor into alpha."""
    if not lomo.decide(result, mean_loss, grad_norm):
        return False
    _path(lomo, fused_update.TritonAxpy).set_alpha(lomo.axpy_alpha(), lomo.params[0].device)
    return True


def saved_bytes(lomo: LOMO) -> int:
    return sum(e.saved_bytes() for e in lomo.extensions if isinstance(e, offload.SavedBranchGrads))


def release_saved(lomo: LOMO):
    for extension in lomo.extensions:
        extension.end_step()


_live_steps = weakref.WeakSet()  # every GraphedStep, for release_graphs()


def release_graphs():
    """Free the CUDA graphs of every GraphedStep in this process (each captures again at its next step). Call it
    before destroying the process group, which would wait for the communicators that the graphs hold."""
    for graphed in list(_live_steps):
        graphed.release()


class GraphedStep:
    """One LOMO training step as CUDA graph replays: `result = graphed.step(graphed.forward(inputs, targets), lr)`.
    `loss_of(inputs, targets)` makes the training loss of the model that `lomo` trains (the forward)."""

    def __init__(self, model: torch.nn.Module, lomo: LOMO, loss_of: Callable, warmup_steps: int = 1):
        reason = obstacle(model, lomo)
        if reason is not None:
            raise ValueError(f"a CUDA graph of the LOMO step needs {reason}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps}: at least one eager step must run before the capture "
                             f"(it compiles the kernel and makes the libraries' handles)")
        self.model, self.lomo, self.loss_of, self.warmup_steps = model, lomo, loss_of, warmup_steps
        self.eager_steps, self.replays = 0, 0  # how the steps ran, for reports
        self._forward_graph, self._backward_graphs = None, None  # the latter: one pass's graph, or two
        self._pending = None  # what forward() made for step(): "eager" or "graph"
        self._captured_settings = None
        self._warned_shape = False
        self._loss = self._mean_loss = self._norm = self._inputs = self._targets = self._alpha = None
        _live_steps.add(self)

    def release(self):
        """Free this step's graphs, their memory pool and the static batch; the next step captures them again,
        with no eager step first (the kernel and the libraries' handles exist already). Waits for a replay still
        running. A replayed forward's loss is dropped too: call it between steps, not between forward() and step()."""
        if self._forward_graph is not None:
            torch.cuda.synchronize(self._inputs.device)
        if self._loss is not None:
            self._loss.detach_()
        self._forward_graph = self._backward_graphs = self._loss = self._mean_loss = self._norm = None
        self._inputs = self._targets = None
        if self._pending == "graph":  # (an eager forward's loss does not live in the graphs' memory: it stays)
            self._pending = None
        release_saved(self.lomo)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's loss, queued on the GPU (not waited for): eagerly, or as a replay of the forward graph."""
        if self._pending is not None:
            raise RuntimeError("forward() twice without step(): each forward's loss must be stepped on first")
        if self._forward_graph is None and self.eager_steps < self.warmup_steps:
            return self._eager_forward(inputs, targets)
        if self._forward_graph is not None and not self._fits(inputs, targets):
            if not self._warned_shape:
                warnings.warn(f"cuda_graph.py: a batch of shape {tuple(inputs.shape)} instead of the captured "
                              f"{tuple(self._inputs.shape)} runs eagerly, with memory beside the graphs'; keep "
                              f"the batch shape fixed (train.py pads to --seq-len)")
                self._warned_shape = True
            return self._eager_forward(inputs, targets)
        if self._forward_graph is not None:
            # (Not before the backward's capture: the copy would bump the version of tensors its graph saved.)
            self._inputs.copy_(inputs, non_blocking=True)
            self._targets.copy_(targets, non_blocking=True)
        else:
            self._capture_forward(inputs, targets)
        self._forward_graph.replay()
        self._pending = "graph"
        return self._loss

    def step(self, loss: torch.Tensor, lr: Optional[float] = None) -> StepResult:
        """LOMO's step on the loss that forward() returned: `LOMO.step`, or replays of the backward graphs."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("step() without forward(): pass the loss that forward(inputs, targets) returned")
        if pending == "eager":
            self.eager_steps += 1
            result = self.lomo.step(loss, lr)
            loss.detach_()  # see _eager_forward
            return result
        if loss is not self._loss:
            raise RuntimeError("step() takes the loss that forward() returned (the forward graph's output)")
        lomo = self.lomo
        if self._backward_graphs is None:
            result = None
            try:
                result = begin_replayed_step(lomo, lr)  # checks the previous step, counts
                self._capture_backward()
            except BaseException:
                # No backward was replayed and no weight moved: the step is not counted, and the next one captures
                # again, from a forward of its own.
                if result is not None:
                    lomo.step_count -= 1
                self._loss.detach_()
                self._forward_graph = self._backward_graphs = self._loss = self._mean_loss = self._norm = None
                release_saved(lomo)
                raise
        else:
            self.check_unchanged()
            result = begin_replayed_step(lomo, lr)  # checks the previous step, counts, fills alpha
        self.replays += 1
        if len(self._backward_graphs) == 1:
            self._backward_graphs[0].replay()
            return end_replayed_one_pass(lomo, result, self._mean_loss, self._norm)
        norm_pass, update_pass = self._backward_graphs
        norm_pass.replay()
        if not decide_replayed(lomo, result, self._mean_loss, self._norm):  # one host sync, as in LOMO.step
            return result  # skipped: no weight moved
        update_pass.replay()
        return lomo.end_step(result)

    def _eager_forward(self, inputs, targets):
        loss = self.loss_of(inputs, targets)
        # After its step, an eager loss is detached from its graph in place (the caller may still hold it, as
        # train.py's loop does into the next forward). Why: autograd makes one AccumulateGrad node per weight
        # and reuses it while any graph holds it, and the node runs on the stream it was made on. Kept alive,
        # the nodes made on the default stream would run the captured backward's accumulations there, which a
        # capture on its own stream refuses ("would make the legacy stream depend on a capturing blocking
        # stream"). A view cannot be detached in place.
        if loss._base is not None:
            raise ValueError("loss_of returned a view of a tensor (say, losses[0]): return a tensor of its own "
                             "(losses.sum(), losses[0].clone()), which GraphedStep can detach after its step")
        self._pending = "eager"
        return loss

    def _fits(self, inputs, targets) -> bool:
        return all(new.shape == old.shape and new.dtype == old.dtype and new.device == old.device
                   for new, old in ((inputs, self._inputs), (targets, self._targets)))

    def check_unchanged(self):
        """Raise if LOMO changed since the capture in a way that the replays would not follow."""
        alpha = _path(self.lomo, fused_update.TritonAxpy).alpha
        if self._settings() != self._captured_settings or alpha is not self._alpha:
            raise RuntimeError("LOMO's settings, its trained weights' tensors or its alpha buffer changed since the "
                               "CUDA graphs were captured, and the graphs would not follow: make a new GraphedStep "
                               "after such a change")

    def _settings(self):
        """What the captured graphs keep of LOMO: which passes and updates they run, where the saved gradients
        wait, and the tensors of its trained weights. (The clip threshold and the lr are read on the host.)"""
        lomo = self.lomo
        return (lomo.clip_grad_norm is None, lomo.clip_grad_value, lomo.rule.axpy_alpha(1.0), type(lomo.guard),
                tuple(type(path) for path in lomo.fast_paths), lomo.loss_scaler is None, len(lomo.hooked),
                tuple((type(e), getattr(e, "gpu_gib", None)) for e in lomo.extensions),
                tuple((p.data_ptr(), p.requires_grad) for p in lomo.params))

    def _capture_forward(self, inputs, targets):
        # Each dtype's kernel compiled and its launcher checked now: that check reads a result back to the
        # host, which must not happen inside a capture (a step whose only eager updates were multi-tensor
        # adds has not run the kernel yet).
        for param in self.lomo.params:
            fused_update.prepare(param.device, param.dtype)
        # The batch copies live outside the graphs' pool, as long as the graphs do: the replays read them.
        self._inputs, self._targets = inputs.clone(), targets.clone()
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph syncs, collects and empties the allocator's cache (the eager steps' blocks) first, then
        # captures on its side stream, the same for every graph: backward runs on the stream of its forward, so
        # the backward's capture must be on the forward's.
        with torch.cuda.graph(graph):
            self._loss = self.loss_of(self._inputs, self._targets)
        self._forward_graph = graph

    def _capture_backward(self):
        lomo, pool = self.lomo, self._forward_graph.pool()  # one pool: the backward reads what the forward saved
        phases = ["norm", "update"] if lomo.needs_norm_pass else ["one-pass"]
        graphs = []
        for phase in phases:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), capturing(lomo):
                outputs = device_pass(lomo, self._loss, phase)
            graphs.append(graph)
            if phase != "update":
                self._mean_loss, self._norm = outputs
            budget = sum(e.gpu_gib for e in lomo.extensions if isinstance(e, offload.SavedBranchGrads))
            if phase == "norm" and saved_bytes(lomo) > budget * 2**30:
                raise ValueError(
                    f"the norm pass's saved branch gradients need {saved_bytes(lomo) / 2**30:.2f} GiB on the "
                    f"GPU under CUDA graphs, above SavedBranchGrads(gpu_gib={budget}): raise it "
                    f"(--branch-grads-gpu-gib), or drop them (train.py and bench.py "
                    f"--no-saved-branch-grads), or drop --cuda-graph")
        release_saved(lomo)
        self._loss.detach_()  # (its nodes remember the capture's stream: eager steps after it would sync on it)
        self._backward_graphs, self._captured_settings = graphs, self._settings()
        self._alpha = _path(lomo, fused_update.TritonAxpy).alpha
