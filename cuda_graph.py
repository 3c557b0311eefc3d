"""A LOMO step as two CUDA graphs (the forward; backward with the updates): captured once, then replayed, so
that no kernel launch costs the CPU.

Why: an eager 7B step launches thousands of kernels (forward, the recomputed blocks, backward, 226 hook
updates), each costing the CPU some microseconds. At small batches, and at tp = 2 where each GPU's share
of every matmul halves but the launches do not, the GPU waits for the CPU that issues them
(PERF_NOTES.md). A CUDA graph records kernels once; a replay launches all of them with one call.

Why LOMO's step can be graphed: a graph replays the kernels it recorded, with the same arguments, and
runs no Python. So nothing in the step may need the host: no sync, no decision made on a value read back,
no number that changes from step to step baked into a kernel's arguments. LOMO's checked one-pass step
(lomo.py's default) is already like that: fused_update.py's kernel reads whether the loss is finite from a
flag on the device, and reads alpha (-lr) from a tensor on the device that is filled before each replay.
The loss and the gradient norm go to the host after the replay, exactly as after an eager step, and
`check_previous_step()` checks them as it does for one.

How a step goes, as two graphs: `loss = graphed.forward(inputs, targets)`, then `graphed.step(loss, lr)`:
- The first `warmup_steps` steps are eager (`model_loss`, `LOMO.step`: real training steps): they compile
  the Triton kernel and make cuBLAS's and NCCL's handles, which must not happen during a capture.
- The next forward() captures the forward on copies of its batch (static input tensors), and the next
  step() captures LOMO's backward with its updates (`LOMO.device_pass`) in a second graph that shares the
  first one's memory. Capturing records kernels without running any, and the hooks' Python runs during
  it, once; then each call replays its graph, which is that step.
- Every later forward() copies its batch into the static inputs and replays the forward graph; step()
  checks the previous step (`check_previous_step`, as `LOMO.step` does before any weight moves), fills
  alpha with its lr, and replays the backward graph.
  Two graphs, not one, so that the host waits for the previous step's norm while the GPU runs this step's
  forward, as in an eager step, instead of the GPU idling between two whole-step replays.

Memory: the two graphs keep one private pool as large as the step's peak, for their whole life, beside the
rest of the caching allocator's memory; a batch of another shape than the captured one runs eagerly (with a warning
the first time), in that other memory. Keep the shape fixed (train.py pads every batch to --seq-len).

Left out (refused with the reason): clipping by global norm and fp16 (a norm pass, and the host decides
between the two passes), value clipping and weight decay (their PyTorch-op updates take the lr as a
number), `check_finite=False` (those updates too), offloaded checkpoints (side-stream copies into host
buffers chosen at run time), and CPUs (CUDA graphs are NVIDIA's). A graph per batch shape.
"""
import warnings
from typing import Callable, Optional

import torch

from lomo import LOMO
from step_result import StepResult


def obstacle(model: torch.nn.Module, lomo: LOMO) -> Optional[str]:
    """Why this LOMO's step cannot be one CUDA graph, with the way around it; None if it can."""
    if lomo.needs_norm_pass:
        return ("a one-pass step: clipping by global norm and fp16's loss scaling take a norm pass, between whose "
                "two passes the host decides (drop --clip-grad-norm, train in bf16, or drop --cuda-graph)")
    if not lomo.check_finite:
        return "the checked step, whose updates read the lr on the device (drop --no-finite-checks)"
    if not lomo.fused_kernel:
        return "fused_update.py's kernel (drop --no-fused-kernel)"
    if getattr(model, "activation_checkpointing", False) and getattr(model, "offload_checkpoints", False):
        return "checkpoints kept on the GPU (drop --offload-checkpoints)"
    unfit = [lomo._names.get(id(p), "a weight") for p in lomo.params if not lomo._can_fuse(p, p)]
    if unfit:
        return (f"every trained weight updated by fused_update.py's kernel, which needs bf16 or fp16 weights on "
                f"a GPU with Triton, and no --weight-decay or --clip-grad-value; not so: {', '.join(unfit[:3])}"
                f"{' and more' if len(unfit) > 3 else ''}")
    return None


class GraphedStep:
    """One LOMO training step as two CUDA graph replays: `result = graphed.step(graphed.forward(inputs, targets),
    lr)`. `loss_of(inputs, targets)` makes the training loss of the model that `lomo` trains (the forward)."""

    def __init__(self, model: torch.nn.Module, lomo: LOMO, loss_of: Callable, warmup_steps: int = 1):
        reason = obstacle(model, lomo)
        if reason is not None:
            raise ValueError(f"a CUDA graph of the LOMO step needs {reason}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps}: at least one eager step must run before the capture "
                             f"(it compiles the kernel and makes the libraries' handles)")
        self.model, self.lomo, self.loss_of, self.warmup_steps = model, lomo, loss_of, warmup_steps
        self.eager_steps, self.replays = 0, 0  # how the steps ran, for reports
        self._forward_graph = self._backward_graph = None
        self._pending = None  # what forward() made for step(): "eager" or "graph"
        self._warned_shape = False

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
            # The batch copies live outside the graphs' pool, as long as the graphs do: the replays read them.
            self._inputs, self._targets = inputs.clone(), targets.clone()
            graph = torch.cuda.CUDAGraph()
            # torch.cuda.graph syncs, collects and empties the allocator's cache (the eager steps' blocks) first,
            # then captures on its side stream (the same stream for both graphs: backward runs on the stream
            # of its forward, so the backward's capture must be on the forward's).
            with torch.cuda.graph(graph):
                self._loss = self.loss_of(self._inputs, self._targets)
            self._forward_graph = graph
        self._forward_graph.replay()
        self._pending = "graph"
        return self._loss

    def step(self, loss: torch.Tensor, lr: Optional[float] = None) -> StepResult:
        """LOMO's step on the loss that forward() returned: `LOMO.step`, or a replay of the backward graph."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("step() without forward(): pass the loss that forward(inputs, targets) returned")
        if pending == "eager":
            self.eager_steps += 1
            result = self.lomo.step(loss, lr)
            _drop_graph(loss)
            return result
        if loss is not self._loss:
            raise RuntimeError("step() takes the loss that forward() returned (the forward graph's output)")
        device = self.lomo.params[0].device
        result = self.lomo.begin_graphed_step(device, lr)  # checks the previous step, counts, fills alpha
        if self._backward_graph is None:
            graph = torch.cuda.CUDAGraph()
            # In the forward graph's memory pool: the backward reads what the forward saved there, and frees it.
            with torch.cuda.graph(graph, pool=self._forward_graph.pool()):
                self._mean_loss, self._norm = self.lomo.device_pass(self._loss)
            self._backward_graph = graph
            _drop_graph(self._loss)  # (its nodes remember the capture's stream: eager steps after it would sync on it)
        self._backward_graph.replay()
        self.replays += 1
        return self.lomo.end_graphed_step(result, self._mean_loss, self._norm)

    def _eager_forward(self, inputs, targets):
        self._pending = "eager"
        return self.loss_of(inputs, targets)

    def _fits(self, inputs, targets) -> bool:
        return all(new.shape == old.shape and new.dtype == old.dtype and new.device == old.device
                   for new, old in ((inputs, self._inputs), (targets, self._targets)))


def _drop_graph(loss: torch.Tensor):
    """Detach a loss whose backward has run from its autograd graph, in place (the caller may still hold it).

    Why: autograd makes one AccumulateGrad node per weight and reuses it while any graph holds it, and the node
    runs on the stream it was made on. Kept alive by an eager step's loss, the nodes made on the default stream
    would run the captured backward's accumulations there, which a capture on its own stream refuses ("would
    make the legacy stream depend on a capturing blocking stream"). A loss that is a view cannot be detached in
    place: then the caller must let it go before the capture."""
    if loss._base is None:
        loss.detach_()
