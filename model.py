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
- SwiGLU feed-forward: w2(silu(w1 x) * w3 x).
- The output head is untied from the embedding by default; `tie_embeddings=True` shares them.
- `init_weights(model, seed)` is deterministic: each parameter's values depend only on the seed and the
  parameter's name (not on the order of construction or the device count).
- A `KVCache` for generation: each new token attends to the stored keys and values of earlier ones.
- Llama 3.1's RoPE frequency scaling (`use_scaled_rope`, Meta's name): long wavelengths slowed by a factor,
  short ones kept, a smooth blend between (`scaled_rope_frequencies`).

This file is the reference: every forward is the plain expression, and no forward takes an argument about
speed. What makes training faster or smaller is attached from outside, each attachment swapping modules or
methods in place with every parameter name unchanged: fast_layers.py (autograd Functions that keep less for
backward, held to this file bit for bit by tests/test_model.py), offload.py (activation checkpointing, through
`Transformer.run_blocks`), gram_norm.py (LOMO's norm pass), speedups.compile_blocks (torch.compile).

Left out on purpose: process groups (shard.py rewrites this model for tensor parallelism), files
(checkpoint.py), optimizers (lomo.py), dropout (LLaMA uses none), other RoPE scalings (linear, YaRN, ...).
"""
import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# The label of a position that carries no loss (prompt tokens, padding): cross_entropy's ignore_index.
IGNORE_INDEX = -100
# The parameter dtypes by the names that train.py and bench.py take (--dtype).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    use_scaled_rope: bool = False  # Llama 3.1-3.3's frequency scaling, with the four numbers below
    rope_scaling_factor: float = 8.0  # Llama 3.2 uses 32
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192  # the context the model was pretrained at before scaling
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
        if self.use_scaled_rope and not (0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                                         and self.rope_scaling_factor > 0 and self.rope_original_max_seq_len > 0):
            raise ValueError(f"scaled RoPE needs 0 < rope_low_freq_factor ({self.rope_low_freq_factor}) < "
                             f"rope_high_freq_factor ({self.rope_high_freq_factor}) and a positive "
                             f"rope_scaling_factor ({self.rope_scaling_factor}) and rope_original_max_seq_len "
                             f"({self.rope_original_max_seq_len})")
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


SCALED_ROPE_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                      "rope_original_max_seq_len")


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
        # another order (a few outputs in a million differ by one bf16 ulp).
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


def rotary_cos_sin(head_dim: int, seq_len: int, theta: float, device=None, args: Optional[ModelArgs] = None):
    """cos and sin of position * inv_freq, shape (seq_len, head_dim // 2), computed in fp32; with the
    frequencies scaled where `args.use_scaled_rope`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if args is not None and args.use_scaled_rope:
        inv_freq = scaled_rope_frequencies(inv_freq, args)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def scaled_rope_frequencies(inv_freq, args: ModelArgs):
    """Llama 3.1's scaling (Meta's `apply_scaling`): a frequency whose wavelength is shorter than
    original / high_freq_factor is kept, one longer than original / low_freq_factor is divided by the factor,
    and those between blend the two linearly in original / wavelength."""
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    smooth = (args.rope_original_max_seq_len / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    kept = torch.where(wavelength > args.rope_original_max_seq_len / low, inv_freq / factor, blended)
    return torch.where(wavelength < args.rope_original_max_seq_len / high, inv_freq, kept)


def apply_rotary(x, cos, sin):
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its angle (Meta's layout).

    x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim // 2). This is Meta's complex product
    (x[2i] + j x[2i+1]) * e^{j angle}, written with real numbers, in fp32, cast back to x's dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, cache: Optional[dict] = None):
        batch, seq, _ = x.shape
        # The head counts are read from the weights, not from args: after tensor-parallel sharding a
        # rank holds n_heads / tp query heads and n_kv_heads / tp key/value heads, and this code is unchanged.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
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

    def rotate(self, x, cos, sin):
        # A method of its own so that fast_layers.py can put its rotation here without copying forward.
        return apply_rotary(x, cos, sin)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, hidden, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache: Optional[dict] = None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return h + self.feed_forward(self.ffn_norm(h))


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
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

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
        cos, sin = rotary_cos_sin(self.args.head_dim, start + seq, self.args.rope_theta, tokens.device, self.args)
        h = self.run_blocks(self.tok_embeddings(tokens), cos[start:], sin[start:], cache)
        if cache is not None:
            cache.length += seq
        return self.norm(h)

    def run_blocks(self, h, cos, sin, cache: Optional["KVCache"] = None):
        """h through every block. A method of its own so that activation checkpointing (offload.py) can take
        the loop's place on one model without touching the blocks."""
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache.layers[i] if cache is not None else None)
        return h


class KVCache:
    """The keys and values of every position seen so far, per layer, so that generating one more token
    costs one position's work instead of the whole prefix's. (A list that grows by concatenation:
    simple, and fast enough for the short samples this project prints.)"""

    def __init__(self, n_layers: int):
        self.layers = [dict() for _ in range(n_layers)]
        self.length = 0


def token_losses(logits, labels):
    """Next-token loss of every position in fp32, 0 where the label is IGNORE_INDEX; shape labels.shape.

    labels are already shifted (labels[t] is the token after tokens[t]); fp32 because a softmax over
    32000 classes in bf16 loses the small probabilities the loss is made of.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(labels.shape)


def cross_entropy_loss(logits, labels):
    """Mean next-token loss over positions whose label is not IGNORE_INDEX."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


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
