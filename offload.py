"""Attaches to Transformer.run_blocks (activation checkpointing, `apply_checkpointing`) and to LOMO's step (the
extension `SavedBranchGrads`): each block recomputed in backward from its saved input, on the GPU or in pinned host
memory (optional: --offload-checkpoints). tests/test_offload.py holds the checkpointed model to plain autograd and
torch.utils.checkpoint bit for bit, and tests/test_saved_branch_grads.py holds the saved branch gradients to the
same step computing everything twice, bit for bit.

How it attaches: `apply_checkpointing(model)` sets `model.run_blocks` on that one model (an instance attribute,
which Python finds before the Transformer class's method) to a `CheckpointedBlocks`, which model.py's
hidden_states then calls for its block loop; `remove_checkpointing` deletes it, and the class's plain loop is
back. No block and no parameter is replaced or renamed. Blocks compiled later (speedups.compile_blocks) are
called compiled from inside the checkpoint.

Checkpointing keeps one (batch, seq, dim) input per block until backward reaches that block, and recomputes
the block from it there:

- forward: each block runs without building a graph (an autograd Function's forward), and only its input
  is kept: on the GPU, or copied to a pinned host buffer on a side CUDA stream, so that the copy overlaps
  the blocks that follow, and the GPU copy dropped.
- backward, block by block in reverse: the block's input (on the host: brought back, prefetched on the side
  stream while the block after it ran its attention's backward) is recomputed with grad, and its backward
  runs inside this one, as in torch.utils.checkpoint's original "reentrant" variant. The parameter
  gradients accumulate in that inner backward, so LOMO's hooks fire as without checkpointing. The
  recomputation runs inside `recomputing()`: its output only marks where that backward starts, and its saved
  tensors are read by that one backward, which fast_layers.py's feed-forward reads to skip w2's matmul (and,
  under tp, its all-reduce) and to write into what its backward unpacks. A plain model computes it all again.
- Backward may run twice over the same graph (LOMO's clipping pass): each pass recomputes every block again.
  The second pass need not compute the chain of input gradients again: it is the same in both passes (in
  LOMO's update pass each layer's input gradient is made before its weight moves). In a block
  x -> h = x + attention(attention_norm(x)) -> h + feed_forward(ffn_norm(h)), the gradients at the two
  norm outputs (the branch inputs) carry everything the chain needs from the branches. So with
  `SavedBranchGrads`, in LOMO's norm pass each block keeps those two gradients; in its update pass the
  recomputed block reads its branch inputs detached, so wq, wk, wv, w1 and w3 compute no input gradient (nor,
  under tp, their all-reduce), and the block's backward starts at the output and at the two norm outputs with
  their saved gradients. The norms and residuals still carry the gradient to x. The weights come out
  bit-identical (given deterministic kernels, as the two full passes need too: the block input and h each add
  exactly two gradient terms, so no order of addition can change a bit); for 7B at 4 x 512 tokens the update
  pass skips 575 of the 829 GFLOP of a block's input-gradient matmuls. attention_norm and ffn_norm must run
  once per block call (one saved gradient each).
  Where the saved gradients wait: two (batch, seq, dim) tensors per block, 1 GiB for 7B at 4 x 512. The
  first ones saved stay on the GPU, up to a budget (`SavedBranchGrads(gpu_gib=1.0)`); the rest are copied to
  pinned host memory (side stream, like the inputs) and prefetched one block ahead in the update pass
  (64 MiB on the GPU at 4 x 512). The update pass reaches the blocks in the order the norm pass saved them,
  so the ones kept on the GPU are used first, while the host ones are being fetched. Why not all on the host:
  the copies cost the CPU their stream, event and allocator bookkeeping, 17-50 ms a pass for 7B at 4 x 512
  on an H200's host, and an eager lomo-clip step there is as much CPU-bound as GPU-bound (PERFORMANCE.md,
  'Saved branch gradients'). Why not all on the GPU: 8 GiB at 16 x 1024.
- On the CPU the "host copy" is a plain copy: the code path runs, so tests can check it against autograd.

Why not torch.utils.checkpoint (non-reentrant): it does the same recompute, but through saved-tensor hooks in
Python, one call per tensor each block saves, in forward and in backward. Eager 7B steps on a fast GPU are
partly bound by the CPU that issues them, and this Function issues a step with less CPU (PERFORMANCE.md,
'offload.py'). The results are bit-identical (tests/test_offload.py).

Inputs in host memory: 512 MiB less GPU memory for 7B at 4 x 512 tokens (4 GiB at 16 x 1024), the largest
term of LOMO's memory above the weights, for two PCIe copies of each block input per step (16 MiB each at
4 x 512, well under a millisecond), hidden by the side stream behind the blocks' matmuls, and host memory
for the inputs of one step (of two, while the caller still holds the previous step's graph).

Left out: saving the branch gradients of compiled blocks (a compiled graph cannot be cut by a hook at its
recomputation: they compute both passes in full), offloading anything inside a block (it is recomputed
anyway), compressing what is offloaded, KV-cache generation and evaluation (which run the plain loop), and
restoring the RNG and autocast state for the recomputation, as torch.utils.checkpoint does (LLaMA has no
dropout, and the model runs in its own dtype).
Limitation: as with torch.utils.checkpoint's reentrant variant, backward must be `loss.backward()` over the
whole graph (LOMO, train.py and bench.py use nothing else): the inner backward accumulates the block's
parameter gradients into `.grad` whatever the outer call asked for. `torch.autograd.grad`, `backward(inputs=...)`
and `backward(create_graph=True)` raise an error that says so.
"""
import collections
import contextlib
import math
from typing import Optional

import torch


class HostStash:
    """The pinned host buffers that hold block inputs, reused from step to step, and the side stream that
    copies them. One per checkpointed model (`CheckpointedBlocks.stash`), and one for the saved branch gradients.

    Buffers are kept for one shape at a time: batches padded to their longest sequence change shape, and
    pinned buffers of every shape seen would pile up. A buffer is reused only on the device it was used for,
    whose side stream orders the copies into and out of it."""

    def __init__(self):
        self.free = {}  # (shape, dtype, device) -> buffers not holding anything now
        self.shape_in_use = None  # the key of the last save: free buffers of other keys are let go
        self.streams = {}  # CUDA device -> side stream

    def side_stream(self, device):
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    @torch.no_grad()  # a copy for backward's use, not a step of the graph
    def save(self, x: torch.Tensor) -> "HostCopy":
        key = (tuple(x.shape), x.dtype, x.device)
        if key != self.shape_in_use:
            self.free, self.shape_in_use = {key: self.free.get(key, [])}, key
        pool = self.free[key]
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
        if key == self.shape_in_use:  # (else dropped: the batches have another shape now)
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
        target.record_stream(stream)  # freed unread (an error before the fetch): not reused before the copy
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


# ----------------------------------------------------------------------------------------------------
# Checkpointing: the attachment, and the Function that checkpoints one block


def apply_checkpointing(model, host: bool = False):
    """Checkpoint each block of `model` (a model.py Transformer) in its training forwards (grad enabled, no KV
    cache): its input kept on the device, or with `host=True` in pinned host memory. In place; returns the
    model. Applied again, the latest `host` holds."""
    model.run_blocks = CheckpointedBlocks(model, host)
    return model


def remove_checkpointing(model):
    """The plain block loop again (model.py's Transformer.run_blocks)."""
    if isinstance(model.__dict__.get("run_blocks"), CheckpointedBlocks):
        del model.run_blocks
    return model


def checkpointing_of(model) -> Optional[str]:
    """None (no checkpointing), "device" (inputs kept on the device) or "host" (in pinned host memory)."""
    blocks = model.__dict__.get("run_blocks")
    if not isinstance(blocks, CheckpointedBlocks):
        return None
    return "host" if blocks.host else "device"


class CheckpointedBlocks:
    """What `apply_checkpointing` puts in place of one model's `run_blocks(h, cos, sin, cache)`. Forwards
    without grad (evaluation) or with a KV cache (generation) keep nothing for backward: they run the plain loop.
    `stash`: the HostStash of the inputs in host memory, made at the first offloaded forward."""

    def __init__(self, model, host: bool):
        self.model, self.host, self.stash = model, host, None

    def __call__(self, h, cos, sin, cache=None):
        if cache is not None or not torch.is_grad_enabled():
            return type(self.model).run_blocks(self.model, h, cos, sin, cache)
        if self.host and self.stash is None:
            self.stash = HostStash()
        return run_blocks_checkpointed(self.model.layers, h, cos, sin, self.stash if self.host else None)


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


# True while a checkpointed block is recomputed for its backward (see `recomputing`).
_recomputing = False


@contextlib.contextmanager
def recomputing():
    """Inside: a block is recomputed for one backward. Its output's value is never read (it only marks where
    that backward starts) and what it saves is read by that backward alone: fast_layers.py's feed-forward then
    skips w2's matmul and lets its backward overwrite what it saved."""
    global _recomputing
    outer, _recomputing = _recomputing, True
    try:
        yield
    finally:
        _recomputing = outer


def is_recomputing() -> bool:
    """Whether the forward running now is a checkpointed block's recomputation. (Read inside compiled blocks
    too: the compiler guards on this module's flag and keeps one graph for each value.)"""
    return _recomputing


class _CheckpointedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block, cos, sin, host_copy: Optional[HostCopy], grad_anchor: Optional[torch.Tensor]):
        # grad_anchor: None, or an empty tensor that requires grad, passed when x does not (a frozen embedding),
        # so that the output requires grad and backward reaches this block's weights.
        ctx.block, ctx.host_copy = block, host_copy
        ctx.branch_grads = None  # LOMO's norm pass fills it, its update pass empties it
        ctx.save_for_backward(cos, sin, x if host_copy is None else None)  # the input itself, or nothing here
        return block(x, cos, sin)  # autograd.Function's forward runs without building a graph

    @staticmethod
    def backward(ctx, grad_output):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "activation checkpointing (offload.py) needs backward over the whole graph, loss.backward(): "
                "torch.autograd.grad and backward(inputs=...) would still fill every block weight's .grad. "
                "Turn activation checkpointing off for that (offload.remove_checkpointing(model))")
        if torch.is_grad_enabled():
            raise RuntimeError(
                "activation checkpointing (offload.py) does not support backward(create_graph=True): the "
                "block's gradients would have no graph. Turn activation checkpointing off for that "
                "(offload.remove_checkpointing(model))")
        cos, sin, kept = ctx.saved_tensors
        host_copy = ctx.host_copy
        input_needs_grad = ctx.needs_input_grad[0]
        x = (kept if host_copy is None else host_copy.fetch()).detach().requires_grad_(input_needs_grad)
        block, roots = ctx.block, []
        phase, record = _branch_record(ctx)
        # What the next block's backward will fetch, prefetched during this one's.
        ahead = [host_copy.previous if host_copy is not None else None, record.next if phase == "reuse" else None]
        ahead = [item for item in ahead if item is not None]
        handles = _branch_taps(block, phase, record, roots)
        try:
            with torch.enable_grad(), _prefetch_after_feed_forward(block, ahead), recomputing():
                output = block(x, cos, sin)
        finally:
            for handle in handles:
                handle.remove()
        # Where backward starts: the output (unless neither the input nor any weight of the block trains),
        # and in LOMO's update pass the cut branch inputs with their saved gradients.
        starts = ([(output, grad_output)] if output.requires_grad else []) + roots
        if starts:
            # Backward needs the tensors' places in the graph, not their values: hold only the former, so the
            # output's memory is free during the block's backward.
            edges = [torch.autograd.graph.get_gradient_edge(tensor) for tensor, _ in starts]
            grads = [grad for _, grad in starts]
            del output, starts, roots[:]
            # The inner backward accumulates the block's parameter gradients (firing LOMO's hooks) and x.grad.
            torch.autograd.backward(edges, grads)
        return x.grad if input_needs_grad else None, None, None, None, None, None


@contextlib.contextmanager
def _prefetch_after_feed_forward(block, ahead: list):
    """While the block is recomputed, arrange for what the previous block's backward fetches (its input,
    its saved branch gradients: each with a `prefetch()`) to be prefetched as soon as the gradient reaches
    the attention's output, i.e. once the feed-forward's backward is done. That backward is the peak of the
    step, and the prefetched tensors would add to it; the attention's backward, which follows, is still
    long enough to hide the copy. A block without `.attention`, or a compiled one (a hook added inside a
    compiled block would not be traced), prefetches at once."""
    if not ahead:
        yield
        return

    def prefetch(*args):
        for item in ahead:
            item.prefetch()

    if not hasattr(block, "attention") or _is_compiled(block):
        prefetch()
        yield
        return

    def on_attention_output(module, inputs, output):
        if output.requires_grad:
            output.register_hook(prefetch)
        else:  # no gradient will reach it (a frozen block in LOMO's update pass)
            prefetch()

    handle = block.attention.register_forward_hook(on_attention_output)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------------
# Saved branch gradients: LOMO's update pass takes each block's chain of input gradients from its norm pass.

# The names of a block's two branch inputs: the modules whose outputs the attention and the feed-forward read.
BRANCH_INPUTS = ("attention_norm", "ffn_norm")
# While LOMO's norm pass runs: "save"; while its update pass runs: "reuse"; otherwise None (SavedBranchGrads).
_branch_phase = None
_last_saved = None  # pass 1: the record of the block backward reached last, to link the next one to it
_gpu_bytes_left = 0  # pass 1: how many more bytes of saved gradients may stay on the GPU
_saved_records = None  # pass 1: the list that branch_gradients("save") yields, of every record made
# Pinned host buffers for the saved gradients, reused from step to step (one pool for the process).
_branch_stash = HostStash()
# A saved gradient's GPU memory goes back to the allocator only once its copy to the host has run. The CPU
# issues the norm pass well ahead of the GPU; unbounded, it would free the gradients of many blocks whose
# copies have not run yet, and the allocator would reserve new memory for what follows (+0.58 GiB reserved
# for 7B at 4 x 512, +3.6 GiB at 16 x 1024, PERFORMANCE.md, 'Saved branch gradients'). So the CPU waits for
# the copy issued this many copies earlier before it goes on: at most that many gradients in flight (two
# blocks' worth).
COPIES_IN_FLIGHT = 4
_copies_in_flight = collections.deque()  # CUDA events, one after each copy, oldest first


@contextlib.contextmanager
def branch_gradients(phase: Optional[str], gpu_bytes: int = 0):
    """Inside: checkpointed blocks save ("save", LOMO's norm pass) or reuse ("reuse", its update pass) the
    gradient at each branch input; None does neither. While saving, the first `gpu_bytes` of gradients stay
    on the GPU and the rest go to host memory. Yields a list of the records made while saving: their
    `release()` lets the gradients go at once (a skipped step, whose graph the caller may still hold). The
    state is the process's: one LOMO backward at a time per process (as train.py and bench.py run), not two
    steps in two threads."""
    global _branch_phase, _last_saved, _gpu_bytes_left, _saved_records
    if phase not in (None, "save", "reuse"):
        raise ValueError(f"phase={phase!r}: use 'save', 'reuse' or None")
    outer = _branch_phase, _last_saved, _gpu_bytes_left, _saved_records
    records = []
    _branch_phase, _last_saved, _gpu_bytes_left, _saved_records = phase, None, gpu_bytes, records
    try:
        yield records
    finally:
        _branch_phase, _last_saved, _gpu_bytes_left, _saved_records = outer
        _copies_in_flight.clear()


class _KeptOnDevice:
    """A saved gradient that stays where it is: nothing to copy, prefetch or wait for. It is the tensor
    autograd handed to the hook, which the norm's backward then only reads; a branch input whose backward
    wrote into it would be caught at the fetch (the tensor's version counter)."""

    def __init__(self, grad: torch.Tensor):
        self.grad, self.version = grad, grad._version

    def prefetch(self):
        pass

    def fetch(self) -> torch.Tensor:
        grad, self.grad = self.grad, None  # not held here after use: its memory goes with the block's backward
        if grad._version != self.version:
            raise RuntimeError("a saved branch gradient was changed in place after it was saved (by the backward "
                               "of attention_norm or ffn_norm?): keep them in host memory, "
                               "offload.SavedBranchGrads(gpu_gib=0) (train.py/bench.py --branch-grads-gpu-gib 0), "
                               "or drop offload.SavedBranchGrads (bench.py --no-saved-branch-grads)")
        return grad


def _save_branch_grad(grad):
    """The gradient kept on the GPU while the budget lasts; else its host copy, started on the side stream,
    with the CPU kept at most COPIES_IN_FLIGHT copies ahead of the GPU."""
    global _gpu_bytes_left
    size = grad.numel() * grad.element_size()
    if size <= _gpu_bytes_left:
        _gpu_bytes_left -= size
        return _KeptOnDevice(grad)
    copy = _branch_stash.save(grad)
    if grad.is_cuda:
        event = torch.cuda.Event()
        event.record(_branch_stash.side_stream(grad.device))
        _copies_in_flight.append(event)
        if len(_copies_in_flight) > COPIES_IN_FLIGHT:
            _copies_in_flight.popleft().synchronize()
    return copy


class _BranchGradients:
    """One block's saved gradients: index of the branch input -> HostCopy or _KeptOnDevice."""

    def __init__(self):
        self.copies = {}
        self.next = None  # the record of the block that backward reaches after this one

    def prefetch(self):
        for copy in self.copies.values():
            copy.prefetch()

    def release(self):
        self.copies.clear()  # kept gradients freed, host buffers back to the pool


def _branch_taps(block, phase: Optional[str], record: Optional[_BranchGradients], roots: list):
    """Forward hooks on the block's branch inputs for its recomputation; returns their handles.

    "save": the gradient that reaches each branch input is kept, or copied to host memory, in `record` (a tensor
    hook sees the sum over all its readers, and under tensor parallelism the all-reduced sum: the hook
    goes before shard.py's copy_to_tp hook, `prepend`). "reuse": each branch input with a saved gradient
    is cut from the branch (the branch reads a detached copy, so none of its layers computes an input
    gradient: wq, wk and wv, w1 and w3, and under tp their all-reduce), and (input, saved gradient) goes
    to `roots` for the block's backward to start from."""
    if phase is None:
        return []

    def tap(index):
        def save(grad):
            if index in record.copies:
                raise RuntimeError(f"{type(block).__name__}.{BRANCH_INPUTS[index]} ran twice in one block call: its "
                                   f"gradient cannot be saved; drop offload.SavedBranchGrads from LOMO's extensions "
                                   f"(bench.py --no-saved-branch-grads)")
            record.copies[index] = _save_branch_grad(grad)

        def on_output(module, inputs, output):
            if phase == "save":
                if output.requires_grad:
                    output.register_hook(save)
                return None
            copy = record.copies.pop(index, None)
            if copy is None or not output.requires_grad:
                # Nothing saved, or nothing upstream trains that the cut would not already have reached (the
                # branch input took its gradient through the other branch, which is cut: a frozen block
                # below a trained attention_norm).
                return None
            roots.append((output, copy.fetch()))
            return output.detach()
        return on_output

    return [getattr(block, name).register_forward_hook(tap(i), prepend=True) for i, name in enumerate(BRANCH_INPUTS)]


def _is_compiled(block) -> bool:
    """block.compile() sets _compiled_call_impl; torch.compile(block) wraps it (the original in _orig_mod)."""
    return getattr(block, "_compiled_call_impl", None) is not None or hasattr(block, "_orig_mod")


def _branch_record(ctx):
    """(phase, record) for this block's backward: a new record to fill in LOMO's norm pass, the one that
    pass filled in its update pass (taken from ctx: used once, so its host buffers go back after), or
    (None, None)."""
    global _last_saved
    block = ctx.block
    if _branch_phase is None or not all(hasattr(block, name) for name in BRANCH_INPUTS):
        return None, None
    if _is_compiled(block):
        return None, None  # a compiled block's graph cannot be cut by a hook added at its recomputation
    if _branch_phase == "save":
        record = ctx.branch_grads = _BranchGradients()
        if _last_saved is not None:
            _last_saved.next = record
        _last_saved = record
        if _saved_records is not None:
            _saved_records.append(record)
        return "save", record
    record, ctx.branch_grads = ctx.branch_grads, None
    return ("reuse", record) if record is not None else (None, None)


class SavedBranchGrads:
    """An extension of LOMO's step (lomo.py): its norm pass saves each checkpointed block's two branch-input
    gradients, and its update pass starts each block's backward from them instead of computing the chain of
    input gradients again. Same weights, bit for bit; fewer FLOPs (and, under tp, two all-reduces fewer per
    block). It needs checkpointed, uncompiled blocks (`apply_checkpointing`); elsewhere it does nothing.

    gpu_gib: how many GiB of the saved gradients stay on the GPU; the rest wait in pinned host memory (0: all
    there, the least GPU memory). all_on_gpu: every one stays on the GPU, whatever gpu_gib says (set while a CUDA
    graph is captured: a capture cannot wait for host copies)."""

    def __init__(self, gpu_gib: float = 1.0):
        if not (math.isfinite(gpu_gib) and gpu_gib >= 0):
            raise ValueError(f"SavedBranchGrads(gpu_gib={gpu_gib}): give a finite number of GiB >= 0 (0: keep the "
                             f"norm pass's saved gradients in host memory only)")
        self.gpu_gib, self.all_on_gpu = gpu_gib, False
        self.records = []  # the norm pass's records, until the step ends

    def during(self, kind: str, lomo):
        """The context for one pass of a step: "norm" saves, "update" reuses, "one-pass" does nothing."""
        if kind == "norm":
            return self._saving()
        if kind == "update":
            return branch_gradients("reuse")
        if kind == "one-pass":
            return contextlib.nullcontext()
        raise ValueError(f"kind={kind!r}: use 'norm', 'update' or 'one-pass'")

    @contextlib.contextmanager
    def _saving(self):
        gpu_bytes = 2**62 if self.all_on_gpu else int(self.gpu_gib * 2**30)
        with branch_gradients("save", gpu_bytes) as records:
            self.records = records
            yield

    def end_step(self):
        """Let every saved gradient go: used up by the update pass, or (a skipped step, an error) not kept with
        the graph that the caller may still hold. Host buffers go back to the pool."""
        for record in self.records:
            record.release()
        self.records = []

    def saved_bytes(self) -> int:
        """Bytes of the kept records' saved gradients that are on the GPU now (a captured norm pass's, until the
        update pass uses them)."""
        return sum(copy.grad.numel() * copy.grad.element_size() for record in self.records
                   for copy in record.copies.values() if isinstance(copy, _KeptOnDevice) and copy.grad is not None)

    def detach(self):
        pass  # nothing of the model was changed
