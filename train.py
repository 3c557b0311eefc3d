"""Train a LLaMA model with LOMO. `python train.py` alone trains the tiny model on the bundled corpus on
the CPU in a few minutes: validation loss before and after, a progress bar, a sample, metrics.jsonl.

It reads top to bottom: flags -> device and dtype -> tokenizer and data -> model -> LOMO -> loop.
Every step writes one JSON object to <out>/metrics.jsonl (loss, lr, grad_norm when computed, skipped,
loss_scale, tokens_per_s); evaluation rows also carry val_loss and val_ppl, and the last row is one.

Several processes: `torchrun --nproc_per_node N train.py --tp T` runs N/T data-parallel replicas of a
model split T ways (shard.py); plain `python train.py` is one process with no launcher.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import torch.distributed as dist

from data import TextDataset, Tokenizer, cached_tokenizer, check_token_ids
from generate import generate
from lomo import LOMO
from model import LLAMA_SIZES, cross_entropy_loss, model_args
from shard import (build_model, check_tensor_parallel, destroy_distributed, gather_from_tp, init_distributed,
                   padded_vocab_size, vocab_parallel_cross_entropy)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"named size: {', '.join(LLAMA_SIZES)}")
    p.add_argument("--corpus", default=str(Path(__file__).parent / "data" / "botchan.txt"), help="a UTF-8 text file")
    p.add_argument("--tokenizer", default=None, help="a SentencePiece tokenizer.model; default: train one on the corpus")
    p.add_argument("--vocab-size", type=int, default=2048, help="size of the tokenizer trained on the corpus")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step per data-parallel rank")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.0, help="SGD learning rate (LOMO is plain SGD: rates are "
                   "far larger than AdamW's)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 penalty added to the gradient, as torch SGD")
    p.add_argument("--clip-grad-norm", type=float, default=None, help="clip by global norm (costs a second backward)")
    p.add_argument("--clip-grad-value", type=float, default=None, help="clip each gradient element to +-value")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (fp16 uses dynamic loss scaling)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda if available); under torchrun "
                   "each process takes the GPU of its LOCAL_RANK")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size; data parallelism is the rest of the world")
    p.add_argument("--backend", default="auto", help="auto (nccl on GPUs, gloo on CPUs), nccl or gloo")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-every", type=int, default=200, help="evaluate every N steps (and before and after)")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--sample-tokens", type=int, default=48, help="length of the sample printed at the end")
    p.add_argument("--out", default="out", help="output folder for metrics.jsonl")
    return p.parse_args(argv)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA GPU: use --device cpu")
    return device


@torch.no_grad()
def evaluate(model, dataset, loss_fn, batch_size, max_batches, device):
    """Mean validation loss over the fixed validation windows, and its perplexity. Every rank evaluates
    the same windows (the tp ranks must; the dp ranks simply agree)."""
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in dataset.val_batches(batch_size, max_batches):
        total += float(loss_fn(model(inputs.to(device)), targets.to(device))) * targets.numel()
        count += targets.numel()
    model.train()
    return total / count, math.exp(total / count)


def main(argv=None):
    args = parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
    dtype = resolve_dtype(args.dtype)
    resolve_device(args.device)  # refuse an unknown device before starting any process group
    grid = init_distributed(args.tp, args.device, args.backend)
    try:
        return train(args, grid, dtype)
    finally:
        destroy_distributed()  # also on error, so no rank is left waiting in a collective


def train(args, grid, dtype):
    device = grid.device
    print0 = print if grid.is_main else (lambda *a, **k: None)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print0(f"processes: {grid.world_size} = dp {grid.dp} x tp {grid.tp}, device {device}{name}, "
           f"torch {torch.__version__}")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if grid.is_main:
        out.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------------------------- tokenizer, data
    cache = Path(__file__).parent / "data" / ".cache"
    if not args.tokenizer and grid.is_main:
        cached_tokenizer(args.corpus, args.vocab_size, cache)  # rank 0 trains it once; the rest read it
    if grid.world_size > 1:
        dist.barrier()
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else cached_tokenizer(args.corpus, args.vocab_size, cache)
    margs = model_args(args.model)
    if margs.vocab_size <= 0:  # sizes without a fixed vocabulary (tiny) take the tokenizer's
        margs.vocab_size = padded_vocab_size(tokenizer.vocab_size, grid.tp)
        if margs.vocab_size != tokenizer.vocab_size:
            print0(f"vocabulary padded from {tokenizer.vocab_size} to {margs.vocab_size} so that tp={grid.tp} "
                   f"divides it; the extra rows are never targets")
    if args.seq_len > margs.max_seq_len:
        raise ValueError(f"--seq-len={args.seq_len} exceeds the {args.model} model's max_seq_len={margs.max_seq_len}: "
                         f"use --seq-len <= {margs.max_seq_len}")
    if tokenizer.vocab_size > margs.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the {args.model} model only "
                         f"{margs.vocab_size}: use a matching tokenizer or model")
    check_tensor_parallel(margs, grid.tp)
    dataset = TextDataset(args.corpus, tokenizer, args.seq_len)
    check_token_ids(dataset.train, margs.vocab_size, f"corpus {args.corpus}")
    print0(f"data: {len(dataset.train):,} training and {len(dataset.val):,} validation tokens, "
           f"vocabulary {tokenizer.vocab_size} ({tokenizer.path.name})")

    # -------------------------------------------------------------------------------- model
    # Built on the meta device; each rank allocates only its shards, the slices of the seed's full init.
    model = build_model(margs, grid, args.seed, dtype)
    model.activation_checkpointing = args.activation_checkpointing
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"model: {args.model} {margs}\n  {n_params:,} parameters per rank, {dtype}")

    def loss_fn(logits, targets):
        if grid.tp > 1:
            return vocab_parallel_cross_entropy(logits, targets, grid)
        return cross_entropy_loss(logits, targets)

    # -------------------------------------------------------------------------------- LOMO
    lomo = LOMO(model, lr=args.lr, weight_decay=args.weight_decay, clip_grad_norm=args.clip_grad_norm,
                clip_grad_value=args.clip_grad_value, tp_group=grid.tp_group, dp_group=grid.dp_group)
    print0(f"LOMO: lr {args.lr}, weight decay {args.weight_decay}, clip norm {args.clip_grad_norm}, "
           f"clip value {args.clip_grad_value}, {'two backward passes' if lomo.needs_norm_pass else 'one backward pass'}"
           f"{', dynamic loss scaling' if lomo.loss_scaler else ''}")

    # -------------------------------------------------------------------------------- loop
    metrics = open(out / "metrics.jsonl", "w") if grid.is_main else None

    def log(row):
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    val_loss, val_ppl = evaluate(model, dataset, loss_fn, args.batch_size, args.eval_batches, device)
    first_val_loss = val_loss
    print0(f"step 0: val loss {val_loss:.4f}, val ppl {val_ppl:.1f}")
    log(dict(step=0, val_loss=val_loss, val_ppl=val_ppl))
    # Every rank draws the same global batch of dp x batch-size windows and keeps its dp slice: the ranks
    # of a tp group see the same rows, the dp groups disjoint ones, and the run equals one process that
    # sees the whole global batch.
    generator = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch_size * grid.dp * args.seq_len
    rows = slice(grid.dp_rank * args.batch_size, (grid.dp_rank + 1) * args.batch_size)
    bar = tqdm(range(1, args.steps + 1), desc="train", dynamic_ncols=True, file=sys.stdout, disable=not grid.is_main)
    for step in bar:
        started = time.perf_counter()
        inputs, targets = dataset.train_batch(args.batch_size * grid.dp, generator)
        loss = loss_fn(model(inputs[rows].to(device)), targets[rows].to(device))
        result = lomo.step(loss, args.lr)
        if device.type == "cuda":
            torch.cuda.synchronize()
        tokens_per_s = tokens_per_step / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.3g}", tok_s=f"{tokens_per_s:,.0f}")
        if result.reason and grid.is_main:
            tqdm.write(f"step {step}: {'skipped' if result.skipped else 'partial'}: {result.reason}")
        row = dict(step=step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm, skipped=result.skipped,
                   loss_scale=result.loss_scale, tokens_per_s=tokens_per_s,
                   tokens_per_gpu_per_s=tokens_per_s / grid.world_size)
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if step % args.eval_every == 0 or step == args.steps:
            row["val_loss"], row["val_ppl"] = val_loss, val_ppl = evaluate(
                model, dataset, loss_fn, args.batch_size, args.eval_batches, device)
            if grid.is_main:
                tqdm.write(f"step {step}: val loss {val_loss:.4f}, val ppl {val_ppl:.1f}")
        log(row)
    bar.close()
    if metrics:
        metrics.close()

    # -------------------------------------------------------------------------------- summary, sample
    print0(f"validation loss {first_val_loss:.4f} -> {val_loss:.4f} (perplexity {val_ppl:.1f})")
    prompt = "I"
    # Every rank samples (the tp ranks must, in step); padded or unused vocabulary rows are cut off.
    sample = generate(model, tokenizer.encode(prompt), args.sample_tokens, eos_id=tokenizer.eos_id,
                      generator=torch.Generator(device=device).manual_seed(args.seed),
                      gather_logits=lambda logits: gather_from_tp(logits, grid)[..., :tokenizer.vocab_size])
    print0(f"sample: {tokenizer.decode(tokenizer.encode(prompt, bos=False) + sample)}")
    print0(f"metrics written to {out / 'metrics.jsonl'}")
    return dict(first_val_loss=first_val_loss, val_loss=val_loss)


if __name__ == "__main__":
    main()
