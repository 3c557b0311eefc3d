"""Attaches to LOMO's step (the extension `GramNorms`) and to the model's linear layers: in LOMO's norm pass a
linear layer's weight-gradient norm comes without the weight gradient, from two Gram matrices.
tests/test_gram_norm.py holds the norms to autograd's gradients in float64, the layers outside a norm pass to
autograd bit for bit, and a clipped LOMO step with it to torch.optim.SGD after clip_grad_norm_.

Clipping by global norm makes LOMO run backward twice (lomo.py): pass 1 needs only ||grad W|| of every
weight, pass 2 applies the update. For a linear layer y = x W^T over N tokens (x: N x d_in, the output's
gradient g: N x d_out) the weight gradient is g^T x, and

    ||g^T x||_F^2 = trace(x^T g g^T x) = sum_ij (g g^T)_ij * (x x^T)_ij,

the sum of the elementwise product of two N x N Gram matrices. This is the "ghost norm" of per-example
clipping (Goodfellow, "Efficient per-example gradient computations", 2015; Li et al., "Large language
models can be strong differentially private learners", 2022), here applied to the whole batch's gradient.
The two Grams cost 2 N^2 (d_in + d_out) FLOPs against 2 N d_in d_out for g^T x, and layers that read one
input (q, k and v; w1 and w3) share the Gram of x. For 7B at 4 x 512 tokens (N = 2048) that takes pass 1's
weight-gradient matmuls from 829 to 552 GFLOP per block, and no weight gradient is written or read.
The rule: the Gram way when N (d_in + d_out) <= d_in d_out (it costs no more even without a shared
input), else g^T x as usual, whose norm LOMO's hook takes. Large batches therefore take the usual way.

How it attaches: `GramNorms(model)` swaps each eligible layer's class, in place, for its Gram twin below
(`module.__class__ = ...`; names and weights unchanged), whose backward can give a norm instead of a gradient
while `recording` is on; `detach()` swaps them back. Eligible: nn.Linear, shard.py's column- and row-parallel
linear and fast_layers.py's fused w2 (plain and row-parallel), whose weight is trained and used by that module
alone (a head tied to the embedding gets gradient from two uses, whose Grams cannot give the norm of the sum).
A weight that one backward reaches through two uses anyway (a layer called twice) would need the cross terms
of its uses; its second record is refused with an error naming the weight, before any weight moves.

Only where the plain norm is what is needed, which speedups.py checks before it constructs GramNorms: not under
data parallelism (the norm is of the average over replicas, whose Gram needs every replica's tokens), with
value clipping (the norm is of the clipped gradient) or in fp16 (a scaled gradient's Gram can overflow), and
only with a norm pass. Under tensor parallelism each rank's Gram norm is its own shard's, like LOMO's other
sharded norms. Left out: torch.compile'd blocks use plain F.linear (a compiled backward cannot switch between
the two passes); the output head when the training loss is losses.py's fused one (it makes the head's gradient
itself, in chunks); double backward (create_graph=True) through an attached layer.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import fast_layers
import shard

# While LOMO's norm pass runs: the function that takes (weight, norm of its gradient). None otherwise.
_recorder = None
# The Gram of the last input, [(input, Gram)] or [], so that q, k and v (and w1 and w3), whose backward
# run one after another, compute theirs once. Holding the input keeps its memory from being reused, so a
# match on address, shape, strides and version is safe.
_input_grams = []


@contextlib.contextmanager
def recording(record):
    """Inside: linear layers whose weight gradient is cheaper by Grams give `record(weight, norm)` instead
    of a gradient. `record=None` makes this a no-op, so callers need no branch."""
    global _recorder
    _recorder = record
    try:
        yield
    finally:
        _recorder = None
        _input_grams.clear()


def linear(x, weight):
    """F.linear(x, weight), through an autograd Function whose backward can give the weight's gradient norm
    instead of the gradient (in eager mode with grad; the plain F.linear otherwise)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _Linear.apply(x, weight)
    return F.linear(x, weight)


def takes(tokens: int, d_in: int, d_out: int) -> bool:
    """Whether a backward now gives a norm instead of a gradient for this layer shape."""
    return _recorder is not None and tokens * (d_in + d_out) <= d_in * d_out


def record(weight, grad_2d, input_2d, shared_input: bool = True):
    """Give the recorder the norm of grad_2d^T input_2d (the weight's gradient), computed from two Grams.
    shared_input=False (w2, whose backward starts each block's): nothing after it reads what came before,
    so the kept Gram goes first; at that point, the peak of a block's backward, it would only take memory."""
    if not shared_input:
        _input_grams.clear()
    input_gram = _shared_gram(input_2d) if shared_input else _gram(input_2d)
    squared = torch.dot(_gram(grad_2d).view(-1), input_gram.view(-1))
    # abs: rounding can take a ~0 squared norm just below 0. Not clamp: an overflow to -inf must stay
    # non-finite (so LOMO skips the step), as must NaN.
    _recorder(weight, squared.abs().sqrt())


def _gram(m):
    """m m^T, accumulated and returned in fp32 (float64 for float64 inputs)."""
    accumulate = torch.promote_types(m.dtype, torch.float32)
    if m.dtype != accumulate and m.is_cuda:
        try:
            return torch.mm(m, m.t(), out_dtype=accumulate)  # cuBLAS: bf16 inputs, fp32 output, no copies
        except (TypeError, RuntimeError):
            pass  # a torch without mm's out_dtype: round to bf16 first (relative error ~0.4% per entry)
    return torch.mm(m, m.t()).to(accumulate)


def _shared_gram(x):
    for seen, gram in _input_grams:
        if (seen.data_ptr() == x.data_ptr() and seen.dtype == x.dtype and seen.shape == x.shape
                and seen.stride() == x.stride() and seen._version == x._version):
            return gram
    _input_grams.clear()  # before the new Gram is made: one kept at a time
    gram = _gram(x)
    _input_grams.append((x, gram))
    return gram


class _Linear(torch.autograd.Function):
    """F.linear with autograd's own backward kernels, except in a norm pass where `takes` says so."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        ctx.weight = weight  # the Parameter itself (LOMO sorts norms by its tensor_parallel_dim)
        return F.linear(x, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_x, None
        grad_2d, x_2d = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        if takes(x_2d.shape[0], x_2d.shape[1], grad_2d.shape[1]):
            record(ctx.weight, grad_2d, x_2d)
            return grad_x, None  # no gradient reaches the weight, so LOMO's hook does not run for it
        return grad_x, grad_2d.t().mm(x_2d)


def fused_down_weight_gradient(weight, grad_2d, input_2d):
    """fast_layers.SwiGLUDown's weight_gradient for its Gram twin: None where the norm was recorded instead."""
    if takes(*input_2d.shape, grad_2d.shape[1]):
        record(weight, grad_2d, input_2d, shared_input=False)
        return None
    return grad_2d.t().mm(input_2d)


# ----------------------------------------------------------------------------------------------------
# The Gram twins of the linear layers, and the extension that attaches them


class GramLinear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight)


class GramColumnParallelLinear(shard.ColumnParallelLinear):
    def forward(self, x):
        if self.copy_input:
            x = shard.copy_to_tp(x, self.group)
        return linear(x, self.weight)


class GramRowParallelLinear(shard.RowParallelLinear):
    def forward(self, x):
        return shard.reduce_from_tp(linear(x, self.weight), self.group)


class GramSwiGLUDown(fast_layers.SwiGLUDown):
    weight_gradient = staticmethod(fused_down_weight_gradient)


class GramRowParallelSwiGLUDown(fast_layers.RowParallelSwiGLUDown):
    weight_gradient = staticmethod(fused_down_weight_gradient)


TWINS = {nn.Linear: GramLinear, shard.ColumnParallelLinear: GramColumnParallelLinear,
         shard.RowParallelLinear: GramRowParallelLinear, fast_layers.SwiGLUDown: GramSwiGLUDown,
         fast_layers.RowParallelSwiGLUDown: GramRowParallelSwiGLUDown}


class GramNorms:
    """An extension of LOMO's step (lomo.py): in its norm pass the eligible linear layers give their weight's
    gradient norm from Grams, and no gradient. Attaches at construction; `layers`: the attached modules.
    params: the trained parameters (default: those of `model` with requires_grad)."""

    def __init__(self, model: nn.Module, params=None):
        trained = {id(p) for p in (params if params is not None else model.parameters()) if p.requires_grad}
        if any(type(module) in TWINS.values() for module in model.modules()):
            raise ValueError("GramNorms is already attached to this model: detach() the other one first")
        uses = {}
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None:
                    uses[id(param)] = uses.get(id(param), 0) + 1
        self.layers, self._classes = [], []
        for module in model.modules():
            twin = TWINS.get(type(module))
            if (twin is None or getattr(module, "bias", None) is not None or id(module.weight) not in trained
                    or uses[id(module.weight)] != 1):
                continue
            self._classes.append(type(module))
            module.__class__ = twin
            self.layers.append(module)
        self._weights = {id(layer.weight) for layer in self.layers}
        self._seen = set()  # the weights recorded in this norm pass

    def during(self, kind: str, lomo):
        """The context for one pass of a step: in the norm pass, the attached layers record norms into LOMO's."""
        if kind != "norm":
            return contextlib.nullcontext()
        self._seen = set()
        return recording(lambda weight, norm: self._keep(lomo, weight, norm))

    def _keep(self, lomo, weight, norm):
        if id(weight) not in self._weights:
            return  # not a layer this attached (another model's, say): not this step's gradient
        if id(weight) in self._seen:
            raise RuntimeError(
                f"{lomo.name_of(weight)} is used more than once in one forward (a layer called twice?), so its "
                f"gradient norm cannot come from Gram matrices; no weight has moved. Construct LOMO without "
                f"gram_norm.GramNorms (bench.py --no-gram-norms)")
        self._seen.add(id(weight))
        lomo.add_norm(norm, sharded=hasattr(weight, "tensor_parallel_dim"))

    def end_step(self):
        self._seen = set()

    def detach(self):
        """Swap every attached layer back to its own class."""
        for layer, cls in zip(self.layers, self._classes):
            layer.__class__ = cls
        self.layers, self._classes, self._weights = [], [], set()
