"""Attaches to model.py's RMSNorm, Attention and FeedForward (and to shard.py's row-parallel w2): the same layers
through autograd Functions that keep less memory for backward; tests/test_model.py holds them to model.py's plain
expressions bit for bit (the rotary within rounding where it is not).

`apply(model)` swaps each layer's class in place for a subclass below (`module.__class__ = ...`): no module is
replaced and no parameter is renamed, so checkpoints, shard.py's split-by-name and the seeded init see the same
model. What each one removes from a LOMO step, for 7B at 4 x 512 tokens, at the peak of its backward:

- `FastRMSNorm`: autograd would keep the normalized x for the weight's gradient (16 MiB per norm, two norms alive
  at the peak); `_NormThenScale` keeps only x and recomputes the normalization in backward.
- `FastAttention.rotate`: each (x[2i], x[2i+1]) pair is viewed as one complex number, so the rotation is one
  elementwise kernel inside an autograd Function (`_Rotation`) whose backward rotates the gradient back by the
  same angles: it keeps only the angles, not the fp32 copies of q and k that autograd would save (64 MiB per
  block).
- `FusedFeedForward`: w2 (`SwiGLUDown`, still an nn.Linear with the same weight and name) takes the two halves
  (gate, up) and applies SwiGLU itself, so that one Function covers both (`swiglu_down`): gate and up are saved,
  their product is recomputed, and the weight's gradient is made while only one (tokens x hidden) temporary
  exists. Under tensor parallelism (shard.py made w2 a RowParallelLinear) the same on this rank's columns, then
  the sum (`RowParallelSwiGLUDown`).
- In offload.py's recomputation of a checkpointed block (`offload.is_recomputing()`), w2's output is never read
  (it only marks where the block's backward starts), so its matmul (185 GFLOP a block) and, under tp, its
  all-reduce are skipped, and backward writes into what it unpacked (43 MiB less): nothing reads that again.

Under torch.compile (speedups.compile_blocks) each layer is the plain expression, whose saved tensors the compiler
plans itself (it cannot generate complex kernels either), except in the recomputation, where the compiler traces
`_SwiGLUDown` so that w2's matmul is skipped there too. Without grad (inference, and a checkpointed block's first
forward) SwiGLU works in place and overwrites the gate.

Apply it after shard.parallelize (which makes new w2 layers) and before gram_norm.GramNorms (which swaps the
fused w2 for its Gram twin). Applying it twice changes nothing. Left out: fused GPU kernels of our own (these are
PyTorch ops), and double backward (create_graph=True) through these layers.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import offload
import shard
from model import Attention, FeedForward, RMSNorm, apply_rotary


def apply(model: nn.Module) -> nn.Module:
    """Swap every RMSNorm, Attention and FeedForward of `model` for its fast form, in place; returns the model."""
    for module in list(model.modules()):
        if type(module) is RMSNorm:
            module.__class__ = FastRMSNorm
        elif type(module) is Attention:
            module.__class__ = FastAttention
        elif type(module) is FeedForward:
            module.w2.__class__ = _fused_down_class(module.w2)
            module.__class__ = FusedFeedForward
    return model


def _fused_down_class(w2):
    if type(w2) is nn.Linear and w2.bias is None:
        return SwiGLUDown
    if type(w2) is shard.RowParallelLinear:
        return RowParallelSwiGLUDown
    raise TypeError(f"fast_layers.apply: the feed-forward's w2 is a {type(w2).__name__}, not a bias-free nn.Linear or "
                    f"shard.RowParallelLinear: apply fast_layers after shard.parallelize and before "
                    f"gram_norm.GramNorms (or detach the GramNorms first)")


# ----------------------------------------------------------------------------------------------------
# RMSNorm


class FastRMSNorm(RMSNorm):
    def forward(self, x):
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return super().forward(x)
        return _NormThenScale.apply(x, self.weight, self.eps)


class _NormThenScale(torch.autograd.Function):
    """rms_norm(x) * weight with autograd's gradients, bit for bit, saving only x (and the weight). Backward
    recomputes the normalization (one elementwise pass) and differentiates F.rms_norm on the recomputation."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, (x.shape[-1],), eps=eps) * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(ctx.needs_input_grad[0])
            normalized = F.rms_norm(x, (x.shape[-1],), eps=ctx.eps)
        grad_weight = (grad * normalized.detach()).sum_to_size(weight.shape) if ctx.needs_input_grad[1] else None
        grad_x = torch.autograd.grad(normalized, x, grad * weight)[0] if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, None


# ----------------------------------------------------------------------------------------------------
# Rotary embeddings


class FastAttention(Attention):
    def rotate(self, x, cos, sin):
        if torch.compiler.is_compiling():
            return apply_rotary(x, cos, sin)  # real numbers, which the compiler fuses into one kernel
        return complex_rotary(x, cos, sin)


def complex_rotary(x, cos, sin):
    """model.apply_rotary as one complex product per pair, whose backward keeps only the angles."""
    return _Rotation.apply(x, torch.complex(cos, sin)[:, None, :])  # broadcast over heads


def _rotate(x, rotation):
    x32 = x.float()
    if x32.stride(-1) != 1:  # view_as_complex needs each (real, imag) pair adjacent in memory
        x32 = x32.contiguous()
    pairs = torch.view_as_complex(x32.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class _Rotation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rotation):
        ctx.save_for_backward(rotation)
        return _rotate(x, rotation)

    @staticmethod
    def backward(ctx, grad):
        (rotation,) = ctx.saved_tensors
        return _rotate(grad, rotation.conj()), None  # a rotation's adjoint is the rotation back


# ----------------------------------------------------------------------------------------------------
# The feed-forward: w2 applies SwiGLU itself


class FusedFeedForward(FeedForward):
    def forward(self, x):
        return self.w2(self.w1(x), self.w3(x))  # w2 is a SwiGLUDown: w2(silu(gate) * up)


class SwiGLUDown(nn.Linear):
    """w2 given the two halves: w2(silu(gate) * up), the same weight as the nn.Linear it was.

    `weight_gradient`: None (the weight's gradient is made as F.linear's backward makes it), or a function
    (weight, grad_2d, input_2d) -> the gradient, or None where it gave LOMO the gradient's norm instead
    (gram_norm.py's twin of this layer sets it)."""

    weight_gradient = None

    def forward(self, gate, up):
        unread = offload.is_recomputing()
        return swiglu_down(gate, up, self.weight, overwrite_saved=unread, output_unread=unread,
                           weight_gradient=self.weight_gradient)


class RowParallelSwiGLUDown(shard.RowParallelLinear):
    """w2 under tp: SwiGLUDown on this rank's FFN columns (gate and up arrive split), then the sum."""

    weight_gradient = None

    def forward(self, gate, up):
        unread = offload.is_recomputing()
        partial = swiglu_down(gate, up, self.weight, overwrite_saved=unread, output_unread=unread,
                              weight_gradient=self.weight_gradient)
        # An unread output (offload.py's recomputation) is a stand-in: no sum to make, and the sum's backward is
        # the identity, so leaving it out changes no gradient. One all-reduce fewer per block and pass.
        return partial if unread else shard.reduce_from_tp(partial, self.group)


def swiglu_down(gate, up, weight, overwrite_saved: bool = False, output_unread: bool = False, weight_gradient=None):
    """F.linear(silu(gate) * up, weight), with autograd's gradients bit for bit and less memory.

    The backward of a block's feed-forward is the peak of a LOMO step. Plain autograd holds there, for 7B at
    4 x 512 tokens: gate and up (43 MiB each, saved for SwiGLU), their product (43, saved for w2's weight
    gradient), the product's gradient (43) and w2's weight gradient (86). As one Function:
    - forward saves only gate and up (and the weight); the product is dropped and recomputed in backward;
    - backward makes w2's weight gradient first, while only one (tokens x hidden) temporary exists;
    - `overwrite_saved=True` (the block is recomputed for this one backward, so what backward unpacks is read by
      nothing else) lets backward write the gradients of gate and up into the saved tensors' own memory: 43 MiB
      less at the peak. Otherwise they are autograd's real saved tensors, which a second backward over a
      retained graph (LOMO's clipping pass) reads again, so backward leaves them alone.
    - `output_unread=True`: backward needs gate and up, never this output's value, so the matmul is skipped and
      a zero of the output's shape (one element, expanded) stands for it. The block then returns h + 0: a
      forward hook on the block, its feed_forward or w2 that reads it in the recomputation sees that, and one
      that edits it in place raises (the stand-in is an expanded view).
    """
    if torch.compiler.is_compiling():
        if output_unread and torch.is_grad_enabled():  # traced as the Function: no matmul, eager's backward
            return _SwiGLUDown.apply(gate, up, weight, overwrite_saved, True, None)
        return F.linear(F.silu(gate) * up, weight)
    if not torch.is_grad_enabled():
        # Inference, and a checkpointed block's first forward: nothing is saved, so the product overwrites gate
        # (the w1 output, read nowhere else) and no third tensor is made.
        return F.linear(F.silu(gate, inplace=True).mul_(up), weight)
    return _SwiGLUDown.apply(gate, up, weight, overwrite_saved, output_unread, weight_gradient)


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, overwrite_saved, output_unread, weight_gradient):
        ctx.save_for_backward(gate, up, weight)
        # ctx.weight: the Parameter itself, for weight_gradient (LOMO reads its tensor_parallel_dim).
        ctx.overwrite_saved, ctx.weight, ctx.weight_gradient = overwrite_saved, weight, weight_gradient
        if output_unread:
            return gate.new_zeros(()).expand(*gate.shape[:-1], weight.shape[0])
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # The same kernels as autograd's backward of F.linear(F.silu(gate) * up, weight), in another order.
        gate, up, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])
        product = F.silu(gate) * up  # recomputed
        product_2d = product.view(-1, product.shape[-1])
        grad_weight = None
        if ctx.needs_input_grad[2]:
            if ctx.weight_gradient is not None:
                grad_weight = ctx.weight_gradient(ctx.weight, grad_2d, product_2d)
            else:
                grad_weight = grad_2d.t().mm(product_2d)  # what F.linear's backward computes
        del product, product_2d  # the weight's gradient stays alive until this returns; the product need not
        grad_product = grad_2d.mm(weight).view(gate.shape)
        if ctx.overwrite_saved:
            # gate's gradient into up's memory, then silu(gate) into gate's own, and up's gradient into
            # grad_product's: no new (tokens x hidden) tensor at all.
            grad_gate = torch.ops.aten.silu_backward.grad_input(up.mul_(grad_product), gate, grad_input=up)
            grad_up = grad_product.mul_(F.silu(gate, inplace=True))
        else:
            silu_gate = F.silu(gate)
            grad_up = silu_gate.mul_(grad_product)
            grad_gate = torch.ops.aten.silu_backward.grad_input(grad_product.mul_(up), gate, grad_input=grad_product)
        return grad_gate, grad_up, grad_weight, None, None, None
