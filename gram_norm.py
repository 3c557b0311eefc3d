"""A linear layer's weight-gradient norm without the weight gradient: LOMO's clipping pass made cheaper.

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

Only in LOMO's norm pass (`recording`), and only where the plain norm is what is needed: LOMO leaves it
off under data parallelism (the norm is of the average over replicas, whose Gram needs every replica's
tokens), with value clipping (the norm is of the clipped gradient) and in fp16 (a scaled gradient's Gram
can overflow). Under tensor parallelism each rank's Gram norm is its own shard's, like LOMO's other
sharded norms. A weight that one backward reaches through two uses (a layer called twice) would need
the cross terms of its uses; LOMO refuses it with an error naming the weight. Left out: torch.compile'd
blocks use plain F.linear (a compiled backward cannot switch between the two passes); the output head
when the training loss is losses.py's fused one (it makes the head's gradient itself, in chunks); double
backward (create_graph=True) through a layer LOMO has turned this on for.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


def linear(x, weight, gram_norm: bool):
    """F.linear(x, weight); with `gram_norm` (set by LOMO on layers when its norm pass can use it) through
    an autograd Function whose backward can give the weight's gradient norm instead of the gradient."""
    if gram_norm and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _Linear.apply(x, weight)
    return F.linear(x, weight)


def takes(tokens: int, d_in: int, d_out: int) -> bool:
    """Whether a backward now gives a norm instead of a gradient for this layer shape."""
    return _recorder is not None and tokens * (d_in + d_out) <= d_in * d_out


def record(weight, grad_2d, input_2d, shared_input: bool = True):
    """Give LOMO the norm of grad_2d^T input_2d (the weight's gradient), computed from two Grams.
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
