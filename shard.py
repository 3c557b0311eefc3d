"""Tensor and data parallelism over torch.distributed, as plain functions applied to a `model.py` model.

- `init_distributed(tp)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
  MASTER_ADDR/PORT or a c10d rendezvous), picks NCCL on GPUs and gloo on CPUs, one GPU per process, and
  builds a dp x tp grid: tp groups are blocks of adjacent ranks, so a tp group sits inside one node
  (its all-reduces are on the critical path of every layer), and dp groups run across them. Without
  a launcher it returns a one-process grid and nothing is initialized.
- The two conjugate collectives (Megatron's f and g), each an autograd Function with both directions
  side by side: `copy_to_tp` (identity forward, all-reduce backward) and `reduce_from_tp` (all-reduce
  forward, identity backward).
- Column-parallel linear (wq, wk, wv, w1, w3, output: split the output features), row-parallel linear
  (wo, w2: split the input features) and vocab-parallel embedding (split the vocabulary rows). The
  loss over the vocabulary-split head lives in losses.py (fused with the head, no logits gathered).
  Per block: 2 all-reduces forward (after wo and w2) and 2 backward (at the outputs of attention_norm,
  read by wq/wk/wv, and of ffn_norm, read by w1/w3); a checkpointed block 1 more, after wo in its
  recomputation (with fast_layers.py, whose recomputation skips w2 and its all-reduce; 2 more without it).
- `build_model(args, grid, seed, ...)` builds on the meta device, swaps in the parallel layers, and
  materializes only this rank's shards, each the exact slice of the unsharded model's init.

Left out: sequence parallelism, async overlap of communication with compute, replicating kv heads
when tp > n_kv_heads (refused instead), pipeline parallelism.
"""
import datetime
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import ModelArgs, Transformer, init_parameter

# Which dimension of each weight is split across the tp group (nn.Linear stores [out, in]).
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}


# ----------------------------------------------------------------------------------------------------
# The process grid


@dataclass
class Grid:
    rank: int = 0
    world_size: int = 1
    tp: int = 1
    dp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    tp_group: Optional[object] = None  # None: no communication needed (size 1 or not distributed)
    dp_group: Optional[object] = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(tp: int = 1, device: str = "auto", backend: str = "auto",
                     timeout_minutes: float = 10.0) -> Grid:
    """Start-up from torchrun's environment; a plain `python train.py` gets a one-process grid. A collective that
    waits longer than `timeout_minutes` for a stalled rank fails (naming the collective and the peer), instead
    of hanging the job for torch's default half hour."""
    if not (math.isfinite(timeout_minutes) and timeout_minutes > 0):
        raise ValueError(f"--collective-timeout-min={timeout_minutes} must be a positive number of minutes")
    if tp < 1:
        raise ValueError(f"--tp={tp} must be at least 1")
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"unknown backend {backend!r}: use auto, nccl or gloo")
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world_size % tp != 0:
        raise ValueError(f"world size {world_size} is not divisible by --tp={tp}: launch a multiple of {tp} "
                         f"processes (torchrun --nproc_per_node), or choose a --tp that divides {world_size}")
    if world_size > local_world and local_world % tp != 0:
        raise ValueError(f"--tp={tp} does not divide the {local_world} processes per node: a tensor-parallel group "
                         f"would span two nodes; choose a --tp that divides --nproc_per_node={local_world}")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend nccl asked for, but this machine has no CUDA GPU: use --backend gloo (CPU)")
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU: use --device cpu")
        if local_world > torch.cuda.device_count():
            raise ValueError(f"{local_world} processes on this node but only {torch.cuda.device_count()} GPUs: "
                             f"use torchrun --nproc_per_node {torch.cuda.device_count()} (one process per GPU)")
        # One GPU per process, chosen by LOCAL_RANK; a single process may name its GPU (cuda:N).
        index = torch.device(device).index if world_size == 1 and device.startswith("cuda:") else local_rank
        torch.cuda.set_device(index)
        device_obj = torch.device("cuda", index)
    else:
        device_obj = torch.device("cpu")
    if world_size == 1:
        return Grid(device=device_obj)
    backend = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend=backend, timeout=timeout)
    grid = Grid(rank=rank, world_size=world_size, tp=tp, dp=world_size // tp, tp_rank=rank % tp,
                dp_rank=rank // tp, device=device_obj)
    # Every rank must create every group, in the same order, even the groups it is not in.
    for first in range(0, world_size, tp):
        group = dist.new_group(list(range(first, first + tp)), timeout=timeout)
        if first == rank - grid.tp_rank and tp > 1:
            grid.tp_group = group
    for offset in range(tp):
        group = dist.new_group(list(range(offset, world_size, tp)), timeout=timeout)
        if offset == grid.tp_rank and grid.dp > 1:
            grid.dp_group = group
    return grid


def destroy_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# The two conjugate collectives. All-reduce goes through one function so tests can count the calls.


def all_reduce(tensor, group, op=dist.ReduceOp.SUM):
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


class CopyToTensorParallel(torch.autograd.Function):
    """f: identity forward, all-reduce backward.

    Sits on the replicated input of a column-parallel layer: each rank multiplies the same x by its own
    slice of output features, so each computes only part of dL/dx; the parts are summed in backward.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous().clone(), ctx.group), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: all-reduce forward, identity backward.

    Sits on the output of a row-parallel layer: each rank multiplies its slice of the input features by
    its slice of the weight, a partial sum of the full product; the partials are summed in forward.
    The gradient of a sum with respect to each term is the gradient of the sum, so backward is identity.
    """

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous().clone(), group)  # a copy: the caller's tensor stays untouched

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x, group):
    return CopyToTensorParallel.apply(x, group) if group is not None else x


def reduce_from_tp(x, group):
    return ReduceFromTensorParallel.apply(x, group) if group is not None else x


# ----------------------------------------------------------------------------------------------------
# Parallel layers. Each holds only its shard; `weight.tensor_parallel_dim` says which dim is split.


class ColumnParallelLinear(nn.Module):
    """copy_input=False when the caller applies f once for several layers that share one input."""

    def __init__(self, in_features, out_features, grid: Grid, device=None, copy_input=True):
        super().__init__()
        self.group, self.copy_input = grid.tp_group, copy_input
        self.weight = nn.Parameter(torch.empty(out_features // grid.tp, in_features, device=device))
        self.weight.tensor_parallel_dim = 0

    def forward(self, x):
        if self.copy_input:
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight)  # output features stay split


class RowParallelLinear(nn.Module):
    def __init__(self, in_features, out_features, grid: Grid, device=None):
        super().__init__()
        self.group = grid.tp_group
        self.weight = nn.Parameter(torch.empty(out_features, in_features // grid.tp, device=device))
        self.weight.tensor_parallel_dim = 1

    def forward(self, x):  # x arrives split along its features (the heads / the FFN columns)
        return reduce_from_tp(F.linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r V/tp, (r+1) V/tp); each token's row comes from exactly one rank."""

    def __init__(self, vocab_size, dim, grid: Grid, device=None):
        super().__init__()
        self.group, self.vocab_start = grid.tp_group, grid.tp_rank * (vocab_size // grid.tp)
        self.weight = nn.Parameter(torch.empty(vocab_size // grid.tp, dim, device=device))
        self.weight.tensor_parallel_dim = 0

    def forward(self, tokens):
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(rows.masked_fill(outside[..., None], 0.0), self.group)


def gather_from_tp(local, grid: Grid, dim=-1):
    """All-gather a tensor split along `dim` (for generation's last-position logits; no autograd)."""
    if grid.tp_group is None:
        return local
    parts = [torch.empty_like(local) for _ in range(grid.tp)]
    dist.all_gather(parts, local.contiguous(), group=grid.tp_group)
    return torch.cat(parts, dim=dim)


# ----------------------------------------------------------------------------------------------------
# Pre-flight checks and module surgery


def check_tensor_parallel(args: ModelArgs, tp: int):
    """Every split must be whole; say which number is wrong and what to do."""
    for what, size in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
                       ("the FFN width", args.ffn_hidden_dim), ("vocab_size", args.vocab_size)):
        if size % tp != 0:
            hint = (" (pad the vocabulary: a tokenizer-sized vocabulary is padded to a multiple of tp by "
                    "padded_vocab_size)" if what == "vocab_size" else "")
            raise ValueError(f"--tp={tp} does not divide {what}={size}: each rank must hold a whole number of "
                             f"{'heads' if 'heads' in what else 'rows/columns'}; choose a tp that divides {size}{hint}")


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp, for a model trained from scratch on a tokenizer whose
    size tp does not divide. The extra rows are never a target, but they are classes of the softmax
    all the same (training pushes their logits down), so a padded model is not the unpadded one, and
    its checkpoints load only at a tp that divides the padded size. Checkpoints are never padded."""
    return (vocab_size + tp - 1) // tp * tp


def parallelize(model: Transformer, grid: Grid) -> Transformer:
    """Swap the model's layers for their tensor-parallel forms, in place, keeping the parameter names."""
    args = model.args
    check_tensor_parallel(args, grid.tp)
    device = model.tok_embeddings.weight.device

    def copy_norm_output(norm, inputs, output):
        return copy_to_tp(output, grid.tp_group)

    # Every column-parallel layer reads the output of a norm: wq, wk, wv read attention_norm's, w1 and w3
    # ffn_norm's, the head the final norm's. Applying f once to that output (a forward hook, so names
    # and model.py stay as they are) sums the input gradient of all its readers in one all-reduce.
    for norm in [layer.attention_norm for layer in model.layers] + [layer.ffn_norm for layer in model.layers]:
        norm.register_forward_hook(copy_norm_output)
    model.norm.register_forward_hook(copy_norm_output)
    for layer in model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        for name in ("wq", "wk", "wv"):
            old = getattr(attention, name)
            setattr(attention, name, ColumnParallelLinear(old.in_features, old.out_features, grid, device, False))
        attention.wo = RowParallelLinear(attention.wo.in_features, attention.wo.out_features, grid, device)
        ffn.w1 = ColumnParallelLinear(args.dim, args.ffn_hidden_dim, grid, device, copy_input=False)
        ffn.w3 = ColumnParallelLinear(args.dim, args.ffn_hidden_dim, grid, device, copy_input=False)
        ffn.w2 = RowParallelLinear(args.ffn_hidden_dim, args.dim, grid, device)
    model.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim, grid, device)
    model.output = ColumnParallelLinear(args.dim, args.vocab_size, grid, device, copy_input=False)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # both split the vocabulary rows alike
    return model


def split_dim_of(name: str, tp: int) -> Optional[int]:
    """The dimension along which a parameter (by its model.py name) is split, or None if replicated."""
    return SPLIT_DIM.get(name.split(".")[-2]) if tp > 1 else None


def shard_of(full: torch.Tensor, split_dim: Optional[int], grid: Grid) -> torch.Tensor:
    """This rank's slice of a full tensor (the whole tensor for replicated parameters)."""
    if split_dim is None or grid.tp == 1:
        return full
    return full.chunk(grid.tp, dim=split_dim)[grid.tp_rank]


@torch.no_grad()
def build_model(args: ModelArgs, grid: Grid, seed: int, dtype=torch.float32, init: bool = True) -> Transformer:
    """The model for this rank: built on the meta device (no memory), parallelized, then only this rank's
    shards are allocated and filled with their slice of the seeded init, one parameter at a time.
    init=False leaves the memory uninitialized, for a checkpoint to fill (or a benchmark)."""
    with torch.device("meta"):
        model = Transformer(args)
    if grid.tp > 1:
        parallelize(model, grid)
    # Cast on the meta device (free), then allocate: allocating first would hold an fp32 copy of the
    # model, which under a memory cap (or on a 24 GB card) is what runs out of memory.
    model.to(dtype).to_empty(device=grid.device)  # new Parameter objects: attributes set before are gone
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # to_empty made them two tensors again
    for name, param in model.named_parameters():
        split_dim = split_dim_of(name, grid.tp)
        if split_dim is not None:
            param.tensor_parallel_dim = split_dim  # read by LOMO's norm and by gather_full
        if not init:
            continue
        shape = list(param.shape)
        if split_dim is not None:
            shape[split_dim] *= grid.tp
        param.copy_(shard_of(init_parameter(name, shape, args, seed), split_dim, grid))
    return model


@torch.no_grad()
def gather_full(param: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The full tensor of a (possibly sharded) parameter, on every rank of its tp group."""
    split_dim = getattr(param, "tensor_parallel_dim", None)
    if split_dim is None or grid.tp_group is None:
        return param.detach().clone()
    return gather_from_tp(param.detach(), grid, dim=split_dim)
