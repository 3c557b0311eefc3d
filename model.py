"""The LLaMA transformer, in plain PyTorch: a readable, trainable copy of Meta's reference model.

Choices, each matching Meta's `llama/model.py` so that its checkpoints load without renaming:
- `ModelArgs` uses params.json's field names, so `ModelArgs(**json.load(f))` works; the FFN width and
  head_dim are derived the way Meta derives them (11008 for 7B).
- Pre-norm blocks: x + attention(attention_norm(x)), then x + feed_forward(ffn_norm(x)); a final norm
  and an output head. No biases anywhere. Parameter names are Meta's (wq, wk, wv, wo, w1, w2, w3, ...).
- RMSNorm is computed in fp32 and cast back, because the mean of squares of a bf16/fp16 activation
  loses too many bits (and can overflow in fp16).
- Rotary embeddings in Meta's layout: each head's dims (2i, 2i+1) form one rotated pair ("interleaved").
  Hugging Face checkpoints use the other layout (i, i + head_dim/2); the loader permutes their q/k rows.
- Grouped-query attention: n_kv_heads key/value heads serve n_heads query heads; query head j reads
  kv head j // (n_heads / n_kv_heads). Attention is `F.scaled_dot_product_attention` with a causal
  mask, which picks a fused kernel on GPUs and softmaxes in fp32 internally.
- SwiGLU feed-forward: w2(silu(w1 x) * w3 x); w2 (`SwiGLUDown`, still an nn.Linear) applies SwiGLU itself, so
  one autograd Function covers both and its backward keeps less (`swiglu_down`).
- The output head is untied from the embedding by default; `tie_embeddings=True` shares them.
- `init_weights(model, seed)` is deterministic: each parameter's values depend only on the seed and the
  parameter's name (not on the order of construction or the device count).
- Activation checkpointing per block is one switch (`model.activation_checkpointing = True`, offload.py);
  a second (`model.offload_checkpoints = True`) keeps the saved block inputs in host memory.
- A `KVCache` for generation: each new token attends to the stored keys and values of earlier ones.

Left out on purpose: process groups (shard.py rewrites this model for tensor parallelism), files
(checkpoint.py), optimizers (lomo.py), dropout (LLaMA uses none), RoPE frequency scaling (Llama 3.1).
"""
import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import gram_norm
from offload import HostStash, run_blocks_checkpointed


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None means multi-head attention (n_kv_heads = n_heads)
    vocab_size: int = -1  # -1 means "take it from the tokenizer" (Meta's convention)
    multiple_of: int = 256  # the FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False  # not a Meta field: LLaMA-1/2 never tie; some small models do

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}: "
                             f"choose n_heads among the divisors of dim (head_dim = dim / n_heads)")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}: "
                             f"each key/value head must serve a whole number of query heads")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"head_dim={self.dim // self.n_heads} is odd: rotary embeddings rotate "
                             f"pairs of dimensions, so dim / n_heads must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Meta's rule: start from 4*dim, take 2/3 of it (SwiGLU has three matrices instead of two, so
        # this keeps the parameter count of a 4*dim MLP), scale, round up to a multiple of multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# Named sizes. The real shapes are LLaMA-1 (Touvron et al. 2023, Table 2) and Llama-2's params.json;
# their vocabulary is 32000. "tiny" is for tests and the default CPU run; its vocabulary comes from the
# tokenizer trained on the bundled corpus.
LLAMA_SIZES = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, max_seq_len=256),
    "1B": dict(dim=2048, n_layers=16, n_heads=16, vocab_size=32000, multiple_of=256, norm_eps=1e-5),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-6),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, norm_eps=1e-6),
    "30B": dict(dim=6656, n_layers=60, n_heads=52, vocab_size=32000, multiple_of=256, norm_eps=1e-6),
    "65B": dict(dim=8192, n_layers=80, n_heads=64, vocab_size=32000, multiple_of=256, norm_eps=1e-5),
    "llama2-7B": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5,
                      max_seq_len=4096),
    "llama2-13B": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, norm_eps=1e-5,
                       max_seq_len=4096),
    "llama2-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                       ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=4096),
}


def model_args(name: str, **overrides) -> ModelArgs:
    """ModelArgs for a named size, with fields overridden (e.g. vocab_size from the tokenizer)."""
    if name not in LLAMA_SIZES:
        raise ValueError(f"unknown model size {name!r}: choose one of {sorted(LLAMA_SIZES)}")
    return ModelArgs(**{**LLAMA_SIZES[name], **overrides})


# ----------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in fp32, rounded back to x's dtype, then the weight, as Meta does.
        # F.rms_norm computes in fp32 internally and rounds once: on the CPU it is bit-identical to
        # normalizing x.float() and casting back (tests/test_model.py), on CUDA its fused kernel sums in
        # another order (a few outputs in a million differ by one bf16 ulp). The weight is applied after
        # the rounding, as in Meta's code.
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight
        return _NormThenScale.apply(x, self.weight, self.eps)


class _NormThenScale(torch.autograd.Function):
    """rms_norm(x) * weight with autograd's gradients, bit for bit, saving only x (and the weight).

    Autograd would also keep the normalized x for the weight's gradient: 16 MiB per norm for 7B at 4 x 512
    tokens, two norms alive at the peak of a LOMO step. Backward recomputes it instead (one elementwise
    pass) and differentiates F.rms_norm on the recomputation."""

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


def rotary_cos_sin(head_dim: int, seq_len: int, theta: float, device=None):
    """cos and sin of position * inv_freq, shape (seq_len, head_dim // 2), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its angle (Meta's layout).

    x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim // 2). This is Meta's complex product
    (x[2i] + j x[2i+1]) * e^{j angle} in fp32, cast back to x's dtype. In eager mode each pair is viewed
    as one complex number, so the rotation is a single elementwise kernel, inside an autograd Function
    whose backward rotates the gradient back by the same angles: it keeps only the angles, not the fp32
    copies of q and k that autograd would save (64 MiB per block for 7B at 4 x 512 tokens, at the peak
    of a LOMO step). torch.compile cannot generate complex kernels, so under it the same product is written
    with real numbers, which it fuses into one kernel and whose memory it plans itself.
    """
    if torch.compiler.is_compiling():
        return _apply_rotary_real(x, cos, sin)
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


def _apply_rotary_real(x, cos, sin):
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Linear(nn.Linear):
    """nn.Linear without bias (LLaMA has none). `gram_norm` is set by LOMO when its clipping pass can take
    this layer's weight-gradient norm from two Gram matrices instead of the gradient (gram_norm.py)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)
        self.gram_norm = False

    def forward(self, x):
        return gram_norm.linear(x, self.weight, self.gram_norm)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)

    def forward(self, x, cos, sin, cache: Optional[dict] = None):
        batch, seq, _ = x.shape
        # The head counts are read from the weights, not from args: after tensor-parallel sharding a
        # rank holds n_heads / tp query heads and n_kv_heads / tp key/value heads, and this code is unchanged.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        if cache is not None:  # generation: attend to the keys and values of earlier positions too
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if k.shape[1] != q.shape[1]:
            # Grouped-query attention: query head j uses kv head j // n_rep, i.e. repeat_interleave.
            n_rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        past = k.shape[2] - seq
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i sits at position past + i and sees keys 0 .. past + i
            visible = torch.ones(seq, past + seq, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = Linear(args.dim, hidden)  # gate
        self.w2 = SwiGLUDown(hidden, args.dim)  # down: takes (gate, up), applies SwiGLU itself
        self.w3 = Linear(args.dim, hidden)  # up

    def forward(self, x, checkpointed: bool = False, output_unread: bool = False):
        return self.w2(self.w1(x), self.w3(x), checkpointed, output_unread)


class SwiGLUDown(Linear):
    """w2, the feed-forward's down projection, given the two halves: w2(silu(gate) * up). An nn.Linear with
    the same weight and name; it applies SwiGLU itself so that one autograd Function covers both steps
    (`swiglu_down`). shard.py's row-parallel form takes the same arguments."""

    def forward(self, gate, up, checkpointed: bool = False, output_unread: bool = False):
        return swiglu_down(gate, up, self.weight, checkpointed, self.gram_norm, output_unread)


def swiglu_down(gate, up, weight, checkpointed: bool = False, gram_norm: bool = False, output_unread: bool = False):
    """F.linear(silu(gate) * up, weight), with autograd's gradients bit for bit and less memory.

    The backward of a block's feed-forward is the peak of a LOMO step. Plain autograd holds there, for 7B
    at 4 x 512 tokens: gate and up (43 MiB each, saved for SwiGLU), their product (43, saved for w2's weight
    gradient), the product's gradient (43) and w2's weight gradient (86). As one Function:
    - forward saves only gate and up (and the weight); the product is dropped and recomputed in backward;
    - backward makes w2's weight gradient first, while only one (tokens x hidden) temporary exists;
    - `checkpointed=True` (the block runs under activation checkpointing, so what backward unpacks was
      recomputed for this backward alone and nothing reads it again) lets backward write the gradients of
      gate and up into the saved tensors' own memory: 43 MiB less at the peak. Without checkpointing they
      are autograd's real saved tensors, which a second backward over a retained graph (LOMO's clipping
      pass) reads again, so backward leaves them alone.
    - `output_unread=True` (offload.py's recomputation of a checkpointed block, whose output only marks where
      the block's backward starts): backward needs gate and up, never this output's value, so the matmul is
      skipped and a zero of the output's shape (one element, expanded) stands for it: w2's forward, 185 GFLOP
      a block for 7B at 4 x 512 tokens, is not computed a second time (under tp, nor is its all-reduce).
    Under torch.compile it is the plain expression, whose saved tensors the compiler plans itself, except with
    `output_unread`, where the compiler traces this Function (without Gram norms, which compiled blocks never
    take) so that the matmul is skipped there too. Without
    grad (inference) SwiGLU works in place and overwrites `gate`. `gram_norm`: as model.Linear's (set by
    LOMO), w2's weight-gradient norm may come from Grams in a norm pass (gram_norm.py)."""
    if torch.compiler.is_compiling():
        if output_unread and torch.is_grad_enabled():  # traced as the Function: no matmul, eager's backward
            return _SwiGLUDown.apply(gate, up, weight, checkpointed, False, True)
        return F.linear(F.silu(gate) * up, weight)
    if not torch.is_grad_enabled():
        # Inference, and a checkpointed block's first forward under offloading: nothing is saved, so the
        # product overwrites gate (the w1 output, read nowhere else) and no third tensor is made.
        return F.linear(F.silu(gate, inplace=True).mul_(up), weight)
    return _SwiGLUDown.apply(gate, up, weight, checkpointed, gram_norm, output_unread)


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, checkpointed, use_gram_norm, output_unread=False):
        ctx.save_for_backward(gate, up, weight)
        ctx.overwrite_saved, ctx.weight, ctx.use_gram_norm = checkpointed, weight, use_gram_norm
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
            if ctx.use_gram_norm and gram_norm.takes(*product_2d.shape, grad_2d.shape[1]):  # LOMO's norm pass
                gram_norm.record(ctx.weight, grad_2d, product_2d, shared_input=False)
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


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache: Optional[dict] = None, checkpointed: bool = False,
                output_unread: bool = False):
        """checkpointed: this call runs under activation checkpointing; output_unread: nothing will read the
        returned tensor's value, only backward through it (offload.py's recomputation). See swiglu_down. Then
        the returned value is h + 0 (under tp, without the sum of w2's partials): a forward hook on the block,
        its feed_forward or w2 that reads it in the recomputation sees that, and one that edits it in place
        raises (the stand-in zero is an expanded view)."""
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return h + self.feed_forward(self.ffn_norm(h), checkpointed, output_unread)

    def branch_inputs(self):
        """The modules whose outputs are the two branches' inputs. A block's backward turns the gradient at
        each into its input's gradient; LOMO's second clipping pass takes those from its first (offload.py)."""
        return self.attention_norm, self.ffn_norm


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(f"vocab_size={args.vocab_size}: set it from the tokenizer before building the model "
                             f"(Meta's params.json uses -1 for 'take it from tokenizer.model')")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Recompute each block's activations in backward instead of storing them: memory falls from
        # all intermediate activations to one (batch, seq, dim) input per block, for ~1/3 more compute.
        self.activation_checkpointing = False
        # With checkpointing, keep each block's saved input in pinned host memory (offload.py) instead of
        # on the GPU: LOMO's peak falls to about inference's, for two PCIe copies per block per step.
        self.offload_checkpoints = False
        self._host_stash = None

    def forward(self, tokens, cache: Optional["KVCache"] = None):
        """tokens: (batch, seq) int64 -> logits (batch, seq, vocab) in the parameters' dtype.

        With a KVCache (generation), tokens continue the positions the cache has already seen.
        """
        return self.output(self.hidden_states(tokens, cache))

    def hidden_states(self, tokens, cache: Optional["KVCache"] = None):
        """The final norm's output (batch, seq, dim): what the head reads. Training feeds it to
        losses.model_loss, which applies the head chunk by chunk instead of making all the logits."""
        start, seq = (cache.length if cache is not None else 0), tokens.shape[1]
        if start + seq > self.args.max_seq_len:
            raise ValueError(f"sequence length {start + seq} exceeds max_seq_len={self.args.max_seq_len}: "
                             f"shorten the sequences (--seq-len) or raise max_seq_len")
        cos, sin = rotary_cos_sin(self.args.head_dim, start + seq, self.args.rope_theta, device=tokens.device)
        cos, sin = cos[start:], sin[start:]
        h = self.tok_embeddings(tokens)
        if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
            # Each block recomputed in backward from its saved input (offload.py), on the GPU or in host memory.
            stash = None
            if self.offload_checkpoints:
                stash = self._host_stash = self._host_stash or HostStash()
            return self.norm(run_blocks_checkpointed(self.layers, h, cos, sin, stash))
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.length += seq
        return self.norm(h)


def compile_blocks(model: Transformer, backend: str = "inductor", backward_twice: bool = False):
    """torch.compile each block in place (optional: --compile). Names and parameters are unchanged, so
    checkpoints, sharding and LOMO's hooks see the same model; only the block's elementwise work (norms,
    rotary, SwiGLU, residuals) is fused into fewer kernels and launched with less CPU time.

    backward_twice: LOMO will run backward twice over one graph (clipping by norm, or fp16). Compiled
    backward reuses ("donates") the buffers it saved by default, which refuses a second backward with an
    error; this turns the donation off (for the whole process: compilation happens later, lazily)."""
    if backward_twice:
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False
    for layer in model.layers:
        layer.compile(backend=backend)
    return model


class KVCache:
    """The keys and values of every position seen so far, per layer, so that generating one more token
    costs one position's work instead of the whole prefix's. (A list that grows by concatenation:
    simple, and fast enough for the short samples this project prints.)"""

    def __init__(self, n_layers: int):
        self.layers = [dict() for _ in range(n_layers)]
        self.length = 0


def token_losses(logits, labels):
    """Next-token loss of every position in fp32, 0 where the label is -100; shape labels.shape.

    labels are already shifted (labels[t] is the token after tokens[t]); fp32 because a softmax over
    32000 classes in bf16 loses the small probabilities the loss is made of.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="none").view(labels.shape)


def cross_entropy_loss(logits, labels):
    """Mean next-token loss over positions whose label is not -100."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------------------------------
# Initialization


def init_std(name: str, args: ModelArgs) -> Optional[float]:
    """Standard deviation of the normal init for a parameter name; None for norm weights (ones).

    GPT-2's scheme, as nanoGPT uses it (HF LLaMA uses N(0, 0.02) without the scaling): N(0, 0.02) for
    every matrix, with the two matrices that write into the residual stream (wo, w2) scaled down by
    1/sqrt(2 * n_layers), so the residual stream's variance does not grow with depth.
    """
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("wo.weight", "w2.weight")):
        return 0.02 / math.sqrt(2 * args.n_layers)
    return 0.02


def init_parameter(name: str, shape, args: ModelArgs, seed: int, device=None, dtype=torch.float32):
    """The full initial value of one parameter, a function of (seed, name) only.

    Each parameter draws from its own generator seeded by the seed and a hash of its name, so a model
    built in another order, on another device count, or one slice at a time (tensor parallelism)
    gets the same numbers.
    """
    std = init_std(name, args)
    if std is None:
        return torch.ones(shape, device=device, dtype=dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    # Drawn on the CPU in fp32 so that the numbers do not depend on the device or dtype.
    return torch.randn(shape, generator=generator).mul_(std).to(device=device, dtype=dtype)


@torch.no_grad()
def init_weights(model: Transformer, seed: int):
    for name, param in model.named_parameters():
        param.copy_(init_parameter(name, param.shape, model.args, seed, device=param.device, dtype=param.dtype))
    return model
