"""Activation checkpointing of the blocks, one autograd Function per block; the saved block inputs on the
GPU, or in pinned host memory (optional: --offload-checkpoints).

Checkpointing keeps one (batch, seq, dim) input per block until backward reaches that block, and recomputes
the block from it there:

- forward: each block runs without building a graph (an autograd Function's forward), and only its input
  is kept: on the GPU, or copied to a pinned host buffer on a side CUDA stream, so that the copy overlaps
  the blocks that follow, and the GPU copy dropped.
- backward, block by block in reverse: the block's input (on the host: brought back, prefetched on the side
  stream while the block after it ran its attention's backward) is recomputed with grad, and its backward
  runs inside this one, as in torch.utils.checkpoint's original "reentrant" variant. The parameter
  gradients accumulate in that inner backward, so LOMO's hooks fire as without checkpointing.
- Backward may run twice over the same graph (LOMO's clipping pass): each pass recomputes every block again.
- On the CPU the "host copy" is a plain copy: the code path runs, so tests can check it against autograd.

Why not torch.utils.checkpoint (non-reentrant, which the model used before): it does the same recompute,
but through saved-tensor hooks in Python, one call per tensor each block saves, in forward and in backward.
Eager 7B steps on a fast GPU are partly bound by the CPU that issues them, and this Function issues a step
with less CPU (PERF_NOTES.md, change 27). The results are bit-identical (tests/test_offload.py).

Inputs in host memory: 512 MiB less GPU memory for 7B at 4 x 512 tokens (4 GiB at 16 x 1024), the largest
term of LOMO's memory above the weights, for two PCIe copies of each block input per step (16 MiB each at
4 x 512, well under a millisecond), hidden by the side stream behind the blocks' matmuls, and host memory
for the inputs of one step (of two, while the caller still holds the previous step's graph).

Left out: offloading anything inside a block (it is recomputed anyway), compressing what is offloaded,
KV-cache generation (which runs without checkpointing), and restoring the RNG and autocast state for the
recomputation, as torch.utils.checkpoint does (LLaMA has no dropout, and the model runs in its own dtype).
Limitation: as with torch.utils.checkpoint's reentrant variant, backward must be `loss.backward()` over the
whole graph (LOMO, train.py and bench.py use nothing else): the inner backward accumulates the block's
parameter gradients into `.grad` whatever the outer call asked for. `torch.autograd.grad`, `backward(inputs=...)`
and `backward(create_graph=True)` raise an error that says so.
"""
import contextlib
from typing import Optional

import torch


class HostStash:
    """The pinned host buffers that hold block inputs, reused from step to step, and the side stream that
    copies them. One per model (`Transformer.host_stash`)."""

    def __init__(self):
        self.free = {}  # (shape, dtype) -> buffers not holding anything now
        self.streams = {}  # CUDA device -> side stream

    def side_stream(self, device):
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    @torch.no_grad()  # a copy for backward's use, not a step of the graph
    def save(self, x: torch.Tensor) -> "HostCopy":
        key = (tuple(x.shape), x.dtype)
        pool = self.free.setdefault(key, [])
        buffer = pool.pop() if pool else torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
        if x.is_cuda:
            stream = self.side_stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))  # x is complete on the main stream
            with torch.cuda.stream(stream):
                buffer.copy_(x, non_blocking=True)
            x.record_stream(stream)  # the allocator keeps x's memory until the copy has read it
        else:
            buffer.copy_(x)
        return HostCopy(self, key, buffer, x.device)

    def release(self, key, buffer):
        self.free[key].append(buffer)  # the next copy into it queues behind every earlier copy


class HostCopy:
    """One block input in host memory. `fetch` returns it on the device; `prefetch` starts that copy early.
    When the autograd graph that holds it is freed, its buffer goes back to the stash."""

    def __init__(self, stash: HostStash, key, buffer: torch.Tensor, device: torch.device):
        self.stash, self.key, self.buffer, self.device = stash, key, buffer, device
        self.previous = None  # the input of the block before, fetched next in backward
        self.prefetched = None

    @torch.no_grad()
    def prefetch(self):
        if self.prefetched is not None:
            return
        if self.device.type != "cuda":
            self.prefetched = self.buffer.clone()
            return
        main = torch.cuda.current_stream(self.device)
        # Allocated on the main stream, which is the stream that reads it; the side stream first waits for
        # the main stream's queued work, so no earlier user of that memory is still running.
        target = torch.empty(self.buffer.shape, dtype=self.buffer.dtype, device=self.device)
        stream = self.stash.side_stream(self.device)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            target.copy_(self.buffer, non_blocking=True)
        self.prefetched = target

    def fetch(self) -> torch.Tensor:
        self.prefetch()  # a no-op when already started
        x, self.prefetched = self.prefetched, None  # not held here after use: backward may run again
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_stream(self.stash.side_stream(self.device))
        return x

    def __del__(self):
        if self.stash is not None:
            self.stash.release(self.key, self.buffer)


class _CheckpointedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block, cos, sin, host_copy: Optional[HostCopy], grad_anchor: Optional[torch.Tensor]):
        # grad_anchor: None, or an empty tensor that requires grad, passed when x does not (a frozen embedding),
        # so that the output requires grad and backward reaches this block's weights.
        ctx.block, ctx.host_copy = block, host_copy
        ctx.save_for_backward(cos, sin, x if host_copy is None else None)  # the input itself, or nothing here
        return block(x, cos, sin)  # autograd.Function's forward runs without building a graph

    @staticmethod
    def backward(ctx, grad_output):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "activation checkpointing (offload.py) needs backward over the whole graph, loss.backward(): "
                "torch.autograd.grad and backward(inputs=...) would still fill every block weight's .grad. "
                "Turn activation checkpointing off for that (model.activation_checkpointing = False)")
        if torch.is_grad_enabled():
            raise RuntimeError(
                "activation checkpointing (offload.py) does not support backward(create_graph=True): the "
                "block's gradients would have no graph. Turn activation checkpointing off for that")
        cos, sin, kept = ctx.saved_tensors
        host_copy = ctx.host_copy
        input_needs_grad = ctx.needs_input_grad[0]
        x = (kept if host_copy is None else host_copy.fetch()).detach().requires_grad_(input_needs_grad)
        previous = host_copy.previous if host_copy is not None else None
        with torch.enable_grad(), _prefetch_after_feed_forward(ctx.block, previous):
            # checkpointed=True: this graph is backwarded once, so the block's backward may reuse the memory
            # of what it saved (model.swiglu_down).
            output = ctx.block(x, cos, sin, checkpointed=True)
        if output.requires_grad:  # (not when neither the input nor any weight of the block trains)
            # Backward needs the output's place in the graph, not its values: hold only the former, so the
            # output's memory is free during the block's backward.
            output = torch.autograd.graph.get_gradient_edge(output)
            # The inner backward accumulates the block's parameter gradients (firing LOMO's hooks) and x.grad.
            torch.autograd.backward(output, grad_output)
        return x.grad if input_needs_grad else None, None, None, None, None, None


@contextlib.contextmanager
def _prefetch_after_feed_forward(block, previous: Optional[HostCopy]):
    """While the block is recomputed, arrange for the previous block's input to be prefetched as soon as
    the gradient reaches the attention's output, i.e. once the feed-forward's backward is done. That
    backward is the peak of the step, and the prefetched input would add to it; the attention's backward,
    which follows, is still long enough to hide the copy. A block without `.attention`, or a compiled one
    (a hook added inside a compiled block would not be traced), prefetches at once."""
    if previous is None:
        yield
        return
    if not hasattr(block, "attention") or getattr(block, "_compiled_call_impl", None) is not None:
        previous.prefetch()
        yield
        return

    def on_attention_output(module, inputs, output):
        output.register_hook(lambda grad: previous.prefetch())

    handle = block.attention.register_forward_hook(on_attention_output)
    try:
        yield
    finally:
        handle.remove()


def run_blocks_checkpointed(blocks, h, cos, sin, stash: Optional[HostStash] = None):
    """h -> blocks[-1](... blocks[0](h)), with each block checkpointed: its input kept on the device, or with
    a stash in host memory."""
    # A frozen embedding (h needs no gradient): the first block gets an anchor so that backward still reaches
    # the blocks, without h itself taking a gradient that nothing reads.
    grad_anchor = None if h.requires_grad else torch.empty(0, device=h.device, requires_grad=True)
    previous = None
    for block in blocks:
        host_copy = stash.save(h) if stash is not None else None
        if host_copy is not None:
            host_copy.previous = previous
        h = _CheckpointedBlock.apply(h, block, cos, sin, host_copy, grad_anchor)
        previous, grad_anchor = host_copy, None
    return h
