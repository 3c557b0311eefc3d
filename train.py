"""Train a LLaMA model with LOMO (or AdaLomo: --optimizer adalomo). `python train.py` alone trains the tiny
model on the bundled corpus on the CPU in about a minute and a half: validation loss before and after, a
progress bar, samples.

It reads top to bottom: flags -> process grid -> tokenizer and data -> model -> LOMO -> loop.
<out>/metrics.jsonl gets one JSON object per step (loss, lr, grad_norm, skipped and
skipped_steps, loss_scale, tokens_per_s, tokens_per_gpu_per_s, peak_memory_gib on GPUs); evaluation
rows also carry val_loss and val_ppl (and acc, acc_norm for multiple-choice data); the last row is a
summary (time, tokens/s, peak memory, best validation results) that carries the final val_loss too.

Several processes: `torchrun --nproc_per_node N train.py --tp T` runs N/T data-parallel replicas of a
model split T ways (shard.py); plain `python train.py` is one process with no launcher.
"""
import argparse
import gc
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import checkpoint_formats
import cli
import plot
import run_folder
from cuda_graph import GraphedStep, release_graphs
from data import ShuffledSampler, Tokenizer, cached_tokenizer, check_token_ids, collate, split_train_val
from evaluate import multiple_choice_accuracy, validation_loss
from generate import generate
from losses import model_loss
from model import DTYPES, IGNORE_INDEX, LLAMA_SIZES, model_args
from shard import (build_model, check_tensor_parallel, destroy_distributed, gather_from_tp, init_distributed,
                   padded_vocab_size)
import speedups
import training_state
from adalomo import AdaLomo, check_settings as check_adalomo
from adamw_baseline import AdamWStep
from tasks import load_dataset

BUNDLED_CORPUS = Path(__file__).parent / "data" / "botchan.txt"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default."""


def parse_args(argv=None):
    """The flags, in groups; `python train.py @run.args` reads them from a file (one per line), as a run writes
    its own to <out>/args.txt."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, fromfile_prefix_chars="@")
    data = p.add_argument_group("data")
    data.add_argument("--data", "--corpus", default=str(BUNDLED_CORPUS),
                      help=".txt, .jsonl (text, Alpaca, multiple choice, chat messages, input_ids), .json (Alpaca) "
                           "or .npy (ids)")
    data.add_argument("--val-data", default=None, help="a validation file; default: hold out 10%% of --data")
    data.add_argument("--format", default="auto", choices=["auto", "text", "ids", "alpaca", "mc", "chat", "boolq",
                      "cb", "copa", "multirc", "rte", "wic", "wsc", "record"],
                      help="auto: from the extension and fields; the SuperGLUE tasks as distributed")
    data.add_argument("--train-on-prompt", action="store_true", help="also train on prompt tokens (default: "
                      "loss on the answers only)")
    data.add_argument("--long-examples", default="truncate", choices=["truncate", "drop"],
                      help="what becomes of examples longer than --seq-len")
    data.add_argument("--tokenizer", default=None, help="a SentencePiece tokenizer.model; default: train one on "
                      "the text data (or on the bundled corpus for other data)")
    data.add_argument("--vocab-size", type=int, default=2048, help="size of the tokenizer trained here")
    data.add_argument("--seq-len", type=int, default=128)
    model = p.add_argument_group("model")
    model.add_argument("--model", default="tiny", help=f"named size: {', '.join(LLAMA_SIZES)}")
    model.add_argument("--ckpt", default=None, help="start from a Meta or Hugging Face checkpoint folder, a .gguf "
                       "file, or a saved training state; its config replaces --model")
    model.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="fp16 adds dynamic loss scaling")
    optimization = p.add_argument_group("optimization")
    optimization.add_argument("--optimizer", default="lomo", choices=["lomo", "adalomo", "adamw"],
                              help="lomo: SGD inside backward (lomo.py); adalomo: its adaptive sequel (adalomo.py); "
                                   "adamw: the usual backward then AdamW, for comparison (adamw_baseline.py)")
    optimization.add_argument("--steps", type=int, default=800)
    optimization.add_argument("--batch-size", type=int, default=16, help="sequences per step per data-parallel rank")
    optimization.add_argument("--lr", type=float, default=None, help="learning rate; default 0.5 for lomo (SGD's "
                              "rates, far larger than AdamW's), 1e-3 for adalomo (relative to RMS(W)) and adamw")
    optimization.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"],
                              help="the decay after the warmup")
    optimization.add_argument("--warmup-steps", type=int, default=0)
    optimization.add_argument("--min-lr-ratio", type=float, default=0.0, help="where a decay ends, times --lr")
    optimization.add_argument("--weight-decay", type=float, default=0.0,
                              help="lomo: L2 added to the gradient (torch SGD's); adalomo and adamw: decoupled")
    optimization.add_argument("--clip-grad-norm", type=float, default=None,
                              help="clip by global norm (costs a second backward pass)")
    optimization.add_argument("--clip-grad-value", type=float, default=None, help="clip each gradient element")
    optimization.add_argument("--seed", type=int, default=1337)
    optimization.add_argument("--max-skipped-fraction", type=float, default=0.5,
                              help="a run that skipped more of its steps than this (non-finite loss or gradients) "
                                   "ends with status 1 and is not exported")
    optimization.add_argument("--adalomo-eps", type=float, nargs=2, default=[1e-30, 1e-3], metavar=("EPS1", "EPS2"),
                              help="adalomo: added to G^2, and the least RMS(W) a step is relative to")
    optimization.add_argument("--adalomo-clip-threshold", type=float, default=1.0,
                              help="adalomo: each update's RMS is brought down to at most this")
    optimization.add_argument("--adalomo-decay-rate", type=float, default=-0.8,
                              help="adalomo: beta2 at update t is 1 - t^rate")
    parallel = p.add_argument_group("parallelism (under torchrun)")
    parallel.add_argument("--device", default="auto", help="auto (cuda if there is a GPU), cpu, cuda or cuda:N; "
                          "under torchrun each process takes the GPU of its LOCAL_RANK")
    parallel.add_argument("--tp", type=int, default=1, help="tensor-parallel size; data parallelism is the rest")
    parallel.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"],
                          help="auto: nccl on GPUs, gloo on CPUs")
    parallel.add_argument("--collective-timeout-min", type=float, default=10.0,
                          help="how long a collective waits for a stalled rank before the job fails (raise it "
                               "where a save or a load takes longer)")
    saving = p.add_argument_group("output and checkpoints")
    saving.add_argument("--out", default="out", help="output folder: metrics.jsonl, args.txt, checkpoints/")
    saving.add_argument("--save-every", type=int, default=0, help="save the training state every N steps and at "
                        "the end (0: never)")
    saving.add_argument("--keep", type=int, default=3, help="how many saved training states to keep")
    saving.add_argument("--resume", action="store_true", help="continue from the newest complete training state "
                        "in <out>/checkpoints")
    saving.add_argument("--overwrite", action="store_true", help="start a new run in an --out folder that holds "
                        "one: its metrics.jsonl and checkpoints are removed first")
    saving.add_argument("--export-hf", default=None, help="at the end, write the weights as a Hugging Face folder")
    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument("--eval-every", type=int, default=200, help="evaluate every N steps (and before and "
                            "after)")
    evaluation.add_argument("--eval-batches", type=int, default=8, help="validation batches for the loss")
    evaluation.add_argument("--eval-examples", type=int, default=None, help="multiple-choice examples scored "
                            "(default: all)")
    evaluation.add_argument("--sample-tokens", type=int, default=48, help="length of the sample at each evaluation")
    evaluation.add_argument("--eval-only", action="store_true", help="evaluate (with --ckpt or --resume) and stop")
    speed = p.add_argument_group("GPU speed and memory (speedups.py; each is on or off without changing a number)")
    speed.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute block activations in backward")
    speed.add_argument("--offload-checkpoints", action="store_true",
                       help="with --activation-checkpointing: each block's saved input in pinned host memory")
    speed.add_argument("--compile", action="store_true", help="torch.compile each block (the first steps are slow)")
    speed.add_argument("--cuda-graph", action="store_true",
                       help="bf16: replay each step after the first from CUDA graphs; every batch is padded to "
                            "--seq-len")
    speed.add_argument("--branch-grads-gpu-gib", type=float, default=1.0,
                       help="lomo-clip with checkpointing: GiB of the norm pass's saved gradients kept on the GPU "
                            "(the rest in host memory)")
    speed.add_argument("--no-finite-checks", action="store_true",
                       help="the paper's one pass: no loss check and no gradient norm")
    speed.add_argument("--no-fused-kernel", action="store_true",
                       help="the update and its norm as two PyTorch ops instead of fused_update.py's Triton kernel")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.5 if args.optimizer == "lomo" else 1e-3
    return args


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


class StepClock:
    """Step times without making the CPU wait for each step: on a GPU a CUDA event marks each step's start
    on the GPU's own timeline (the time from one mark to the next is the step, including any time the GPU
    sat idle between steps); on the CPU, wall time."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end):
        """From mark `start` to mark `end`; on a GPU this waits until the GPU has passed `end`."""
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000


def require_finite_weights(model, step):
    """Before every save and export: weights that are no longer finite are never committed (an update can
    overflow a weight from finite gradients, as an fp16 step at a huge lr does; under --no-finite-checks a
    non-finite gradient reaches the weights unseen). The checkpoints already committed stay as they are."""
    named = [(name, p) for name, p in model.named_parameters()]
    finite = torch.stack([p.detach().isfinite().all() for _, p in named])
    any_bad = (~finite).any().float()
    if dist.is_initialized():
        dist.all_reduce(any_bad, op=dist.ReduceOp.MAX)  # every rank stops, or none: a save is collective
    if any_bad.item():
        finite = finite.tolist()
        name = named[finite.index(False)][0] if not all(finite) else "a weight on another rank"
        raise FloatingPointError(
            f"step {step}: {name} is no longer finite, so nothing was saved or exported and every checkpoint "
            f"committed before is kept. Resume from the last one (--resume) with a lower --lr, with "
            f"--clip-grad-norm, or without --no-finite-checks")


def check_flags(args) -> torch.dtype:
    """Refuse bad flags before anything is built, each with the value and the fix; returns the dtype."""
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
    if not 0 <= args.max_skipped_fraction <= 1:
        raise ValueError(f"--max-skipped-fraction={args.max_skipped_fraction} must be between 0 and 1")
    if args.warmup_steps < 0 or args.warmup_steps >= args.steps:
        raise ValueError(f"--warmup-steps={args.warmup_steps} must be >= 0 and below --steps={args.steps}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr={args.lr} must be a positive number (LOMO's rates are SGD's: 1e-2 to 3e-2 for "
                         f"a pretrained LLaMA)")
    learning_rate(1, args.lr, args.steps, args.warmup_steps, args.schedule)  # refuses an unknown schedule
    if args.optimizer == "adalomo":
        check_adalomo(args.adalomo_eps, args.adalomo_clip_threshold, args.adalomo_decay_rate, args.weight_decay)
    if args.optimizer != "lomo" and args.cuda_graph:
        raise ValueError(f"--cuda-graph replays an update that is w += alpha * g; {args.optimizer}'s is not: drop "
                         f"--cuda-graph, or train with --optimizer lomo")
    if args.optimizer == "adamw" and (args.dtype == "fp16" or args.no_finite_checks):
        raise ValueError(f"--optimizer adamw with {'--dtype fp16' if args.dtype == 'fp16' else '--no-finite-checks'}: "
                         f"the AdamW baseline has no loss scaling and checks every step; use --dtype bf16 or fp32, "
                         f"without --no-finite-checks")
    if not args.ckpt and args.model not in LLAMA_SIZES:
        raise ValueError(f"--model {args.model!r} is not a named size: choose one of {', '.join(LLAMA_SIZES)}, "
                         f"or pass --ckpt DIR")
    if args.eval_only and not (args.ckpt or args.resume):
        raise ValueError("--eval-only evaluates a trained model: pass --ckpt DIR (or --resume)")
    for flag, path in (("--data", args.data), ("--val-data", args.val_data)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist: pass a data file (.txt, .json, .jsonl or .npy)")
    if args.ckpt and not Path(args.ckpt).is_dir() and not (Path(args.ckpt).suffix == ".gguf" and
                                                            Path(args.ckpt).is_file()):
        raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist: pass --ckpt a folder holding a Meta "
                                f"(params.json) or Hugging Face (config.json) checkpoint, or a .gguf file")
    if args.offload_checkpoints and not args.activation_checkpointing:
        raise ValueError("--offload-checkpoints moves the block inputs that checkpointing saves: add "
                         "--activation-checkpointing")
    speedups.check_budget(args.branch_grads_gpu_gib)
    if args.save_every < 0:
        raise ValueError(f"--save-every={args.save_every} must be >= 0 (0: never save)")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio={args.min_lr_ratio} must be between 0 and 1 (a fraction of --lr)")
    if args.export_hf and (Path(args.export_hf).exists() or args.eval_only):
        raise ValueError(f"--export-hf {args.export_hf}: " + ("the folder exists; choose a new one (nothing is "
                         "overwritten)" if not args.eval_only else "export with `python checkpoint.py convert` instead "
                         "of --eval-only"))
    dtype, device = resolve_dtype(args.dtype), resolve_device(args.device)
    if args.cuda_graph:  # (the rest of what a graph cannot hold: when LOMO is built)
        speedups.check_cuda_graph(args.dtype, device, args.offload_checkpoints)
    return dtype


def main(argv=None):
    args = parse_args(argv)
    dtype = check_flags(args)
    grid = init_distributed(args.tp, args.device, args.backend, args.collective_timeout_min)
    folder = None
    try:
        folder = run_folder.claim(args, grid)  # one run per --out folder, before anything is built
        return train(args, grid, dtype)
    finally:
        if folder is not None:
            folder.release()
        # Also on error, so no rank is left waiting in a collective; the CUDA graphs first, which an error's
        # traceback keeps alive and whose captured all-reduces the group's teardown would wait for.
        release_graphs()
        destroy_distributed()


def learning_rate(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
                  min_lr_ratio: float = 0.0) -> float:
    """The learning rate of step `step` (1-based): linear warmup from base_lr / warmup_steps up to base_lr
    over `warmup_steps` steps, then constant, or a linear or cosine decay to min_lr_ratio * base_lr at
    `total_steps`. LOMO applies it inside backward, so it is computed before the step and passed in."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}: use constant, linear or cosine")
    if step <= warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * decay)


def tokenizer_and_config(args, grid, print0):
    """The tokenizer and the model's ModelArgs: a Meta, HF or GGUF checkpoint brings both; else a named size, with a
    tokenizer trained on the text data (once, by rank 0) or given."""
    cache = Path(__file__).parent / "data" / ".cache"
    tokenizer_corpus = args.data if Path(args.data).suffix == ".txt" else BUNDLED_CORPUS
    layout = checkpoint_formats.detect_format(args.ckpt) if args.ckpt else None
    if layout in ("meta", "hf", "gguf"):
        if not args.tokenizer and layout != "gguf" and not any((Path(args.ckpt) / name).is_file()
                                                               for name in ("tokenizer.model", "tokenizer.json")):
            raise ValueError(f"{args.ckpt} has no tokenizer.model or tokenizer.json: pass --tokenizer PATH to the "
                             f"tokenizer that belongs to this checkpoint")
        # Meta's params.json has no context length (Meta uses 2048 for LLaMA-1); HF's config.json has one.
        overrides = dict(max_seq_len=max(args.seq_len, 2048)) if layout == "meta" else {}
        margs = checkpoint_formats.checkpoint_args(args.ckpt, args.tokenizer, **overrides)
        tokenizer = checkpoint_formats.load_tokenizer(args.tokenizer or args.ckpt, margs.vocab_size)
        print0(f"checkpoint {args.ckpt} ({layout} format)")
    elif layout == "state":  # our own training state: the tokenizer is the one this run trains (or finds cached)
        tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else cached_tokenizer(tokenizer_corpus,
                                                                                      args.vocab_size, cache)
        margs = checkpoint_formats.checkpoint_args(args.ckpt)
        print0(f"checkpoint {args.ckpt} (training state), tokenizer {tokenizer.path}")
    else:
        if not args.tokenizer and grid.is_main:
            cached_tokenizer(tokenizer_corpus, args.vocab_size, cache)  # rank 0 trains it once; the rest read it
        if grid.world_size > 1:
            dist.barrier()
        tokenizer = (Tokenizer(args.tokenizer) if args.tokenizer else
                     cached_tokenizer(tokenizer_corpus, args.vocab_size, cache))
        margs = model_args(args.model)
    if margs.vocab_size <= 0:  # sizes without a fixed vocabulary (tiny) take the tokenizer's
        margs.vocab_size = padded_vocab_size(tokenizer.vocab_size, grid.tp)
        if margs.vocab_size != tokenizer.vocab_size:
            print0(f"vocabulary padded from {tokenizer.vocab_size} to {margs.vocab_size} so that tp={grid.tp} "
                   f"divides it; the extra rows are never targets")
    model_name = Path(args.ckpt).name if args.ckpt else args.model
    if args.seq_len > margs.max_seq_len:
        raise ValueError(f"--seq-len={args.seq_len} exceeds the {model_name} model's max_seq_len={margs.max_seq_len}: "
                         f"use --seq-len <= {margs.max_seq_len}")
    if tokenizer.vocab_size > margs.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the {model_name} model only "
                         f"{margs.vocab_size}: use a matching tokenizer or model")
    check_tensor_parallel(margs, grid.tp)
    return tokenizer, margs, model_name


def datasets(args, tokenizer, margs, print0):
    """The training and validation sets: --val-data, or 10% of --data held out."""
    def load(path):
        return load_dataset(path, args.format, tokenizer, args.seq_len, args.train_on_prompt, args.long_examples)

    train_set = load(args.data)
    if args.val_data:
        val_set = load(args.val_data)
    elif args.eval_only:  # nothing is trained: the whole file is scored, not a held-out tenth of it
        val_set = train_set
    else:
        train_set, val_set = split_train_val(train_set, 0.1)
    for split, part in (("training", train_set), ("validation", val_set)):
        if part.items:  # ids beyond the vocabulary would only assert on a GPU: refuse them here, by name
            check_token_ids(torch.tensor([t for ids, _ in part.items for t in ids]), margs.vocab_size,
                            f"the {split} data")
        if part.truncated or part.dropped:
            print0(f"{split}: {part.truncated} examples truncated, {part.dropped} dropped as longer than "
                   f"--seq-len+1={args.seq_len + 1} tokens (--long-examples {args.long_examples})")
    if not train_set.packed:
        masking = "prompt and answer" if args.train_on_prompt else "answers only (prompt masked; --train-on-prompt)"
        print0(f"loss on: {masking}")
    print0(f"data: {len(train_set.items):,} training and {len(val_set.items):,} validation sequences"
           f"{', packed' if train_set.packed else ''}; vocabulary {tokenizer.vocab_size} ({tokenizer.path.name})")
    return train_set, val_set


def sample_prompt(val_set, tokenizer) -> str:
    """What the sample at each evaluation continues: the first validation example's prompt (its masked tokens)
    for prompt/answer data, the start of its first sequence for text."""
    ids, labels = val_set.items[0]
    masked = next((i for i, label in enumerate(labels[1:]) if label != IGNORE_INDEX), len(ids) - 1) + 1
    start = ids[1:masked] if masked > 1 else ids[1:9]  # after BOS
    return tokenizer.decode(start) or "I"


def evaluation(args, model, val_set, tokenizer, grid):
    """Validation loss, multiple-choice accuracy when the data has choices, and a sample (printed)."""
    val_loss, val_ppl = validation_loss(model, val_set.items, args.batch_size, grid.device, args.eval_batches, grid)
    result = dict(val_loss=val_loss, val_ppl=val_ppl)
    line = f"val loss {val_loss:.4f}, val ppl {val_ppl:.1f}"
    if val_set.choices:
        result.update(multiple_choice_accuracy(model, val_set.choices[:args.eval_examples], tokenizer,
                                               args.seq_len, grid.device, grid))
        line += (f", acc {result['acc']:.3f}, acc_norm {result['acc_norm']:.3f} (n={result['n']}"
                 + (f", {result['truncated']} candidates truncated to --seq-len" if result["truncated"] else "") + ")")
    prompt = val_set.choices[0].prompt if val_set.choices else sample_prompt(val_set, tokenizer)
    if not math.isfinite(val_loss):  # the weights are no longer finite: there is nothing to sample from
        return result, f"{line}\n  sample: none (the validation loss is not finite)"
    # Every rank samples (the tp ranks must, in step); padded or unused vocabulary rows are cut off.
    sample = generate(model, tokenizer.encode(prompt), args.sample_tokens, eos_id=tokenizer.eos_id,
                      generator=torch.Generator(device=grid.device).manual_seed(args.seed),
                      gather_logits=lambda logits: gather_from_tp(logits, grid)[..., :tokenizer.vocab_size])
    return result, f"{line}\n  sample: {prompt!r} -> {tokenizer.decode(sample)!r}"


def resume(args, out, model, lomo, sampler, grid, print0):
    """(first step, evaluations, skipped steps) of a run resumed from the newest complete training state in
    <out>/checkpoints, with the weights, RNG states, LOMO's and the sampler's state restored; or of a new run."""
    saves = out / "checkpoints"
    if args.resume and grid.is_main:
        training_state.remove_leftovers(saves, print0)
    if args.resume:
        checkpoint.barrier()  # the other ranks look for the latest save once rank 0 has put the folder right
    latest = training_state.find_latest_checkpoint(saves) if args.resume else None
    if latest is None:
        if args.resume:
            print0(f"--resume: no complete training state in {saves}; starting at step 1")
        return 1, [], {}
    try:
        state = training_state.load_training_state(latest, model, grid)
    except ValueError as error:
        if "config differs" not in str(error):
            raise
        started = torch.load(latest / "state.pt", weights_only=True).get("config", {})
        flags = " ".join(f"--{k.replace('_', '-')} {started[k]}" for k in ("model", "ckpt", "tp") if started.get(k))
        raise ValueError(f"{latest} was saved by a run of another model ({error}). Resume with the flags the run "
                         f"was started with: {flags}") from None
    started_with = state.get("config", {}).get("optimizer", "lomo")
    if started_with != args.optimizer and not args.eval_only:
        raise ValueError(f"{latest} was saved by a run with --optimizer {started_with}, this one has "
                         f"--optimizer {args.optimizer}: resume with --optimizer {started_with}")
    if not args.eval_only or started_with == args.optimizer:
        lomo.load_state_dict(state["lomo"])
    if not args.eval_only:  # (--eval-only scores the whole file: the training sampler's data is not split off)
        sampler.load_state_dict(state["sampler"])
    if grid.is_main and (out / "metrics.jsonl").is_file() and not args.eval_only:
        # Rows logged after that save (a crash between saves) belong to steps that run again.
        run_folder.cut_metrics(out / "metrics.jsonl", state["step"])
    changed = {k: (v, vars(args)[k]) for k, v in state["config"].items() if k in vars(args) and vars(args)[k] != v
               and k not in ("resume", "steps", "eval_only", "export_hf")}
    print0(f"resuming from {latest} at step {state['step'] + 1}"
           + (f"; flags changed since: {changed}" if changed else ""))
    if state["step"] >= args.steps and not args.eval_only:
        print0(f"the run is finished: its training state is at step {state['step']} and --steps is {args.steps}; "
               f"nothing to train (raise --steps to train on)")
    # The run's totals so far, so that its summary covers every segment (a state of before they were saved: its
    # skipped steps only).
    totals = state.get("totals", dict(skipped_steps=state["skipped_steps"]))
    return state["step"] + 1, state["evaluations"], totals


class Metrics:
    """<out>/metrics.jsonl (rank 0): one row per step, evaluation results in theirs, a summary last; and the
    totals the summary reports."""

    def __init__(self, path, append: bool, grid, totals: dict):
        """totals: of the run's earlier segments (a resumed run), else empty."""
        self.file = open(path, "a" if append else "w") if grid.is_main else None
        self.path, self.grid, self.skipped_steps = Path(path), grid, totals.get("skipped_steps", 0)
        self.steps_run, self.skipped_here = 0, 0  # in this segment
        self.tokens, self.seconds, self.earlier_time_s = totals.get("tokens", 0), totals.get("seconds", 0.0), \
            totals.get("time_s", 0.0)

    def totals(self, time_s: float) -> dict:
        """What a training state keeps of them; time_s: this segment's so far."""
        return dict(skipped_steps=self.skipped_steps, tokens=self.tokens, seconds=self.seconds,
                    time_s=self.earlier_time_s + time_s)

    def log(self, row):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def step_row(self, step, lr, result, tokens, peak, seconds):
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        self.skipped_steps += result.skipped
        self.steps_run, self.skipped_here = self.steps_run + 1, self.skipped_here + result.skipped
        row = dict(step=step, loss=result.loss, lr=lr, grad_norm=result.grad_norm, skipped=result.skipped,
                   skipped_steps=self.skipped_steps, loss_scale=result.loss_scale, tokens_per_s=tokens / seconds,
                   tokens_per_gpu_per_s=tokens / seconds / self.grid.world_size)
        if peak is not None:
            row["peak_memory_gib"] = peak
        return row

    def summary(self, args, evaluations, seconds, choices: bool):
        best = min(evaluations, key=lambda e: e["val_loss"])
        tokens_per_s = self.tokens / max(self.seconds, 1e-9)
        summary = dict(summary=True, step=args.steps, time_s=self.earlier_time_s + seconds, tokens_per_s=tokens_per_s,
                       tokens_per_gpu_per_s=tokens_per_s / self.grid.world_size, skipped_steps=self.skipped_steps,
                       best_val_loss=best["val_loss"], best_val_loss_step=best["step"],
                       val_loss=evaluations[-1]["val_loss"], val_ppl=evaluations[-1]["val_ppl"])
        if choices:
            best_acc = max(evaluations, key=lambda e: e["acc"])
            summary.update(best_acc=best_acc["acc"], best_acc_step=best_acc["step"], acc=evaluations[-1]["acc"],
                           acc_norm=evaluations[-1]["acc_norm"])
        if self.grid.device.type == "cuda":
            summary["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.log(summary)
        if self.file:
            self.file.close()
            label = vars(args).get("optimizer", "lomo")  # the curves of the whole run, resumed parts included
            plot.write_svg(self.path.with_name("curves.svg"), {label: plot.read_metrics(self.path)})
        return summary

    def too_many_skipped(self, args) -> bool:
        return self.steps_run > 0 and self.skipped_here > args.max_skipped_fraction * self.steps_run

    def skipped_error(self, args) -> FloatingPointError:
        return FloatingPointError(
            f"{self.skipped_here} of the {self.steps_run} steps were skipped (non-finite loss or gradients), more "
            f"than --max-skipped-fraction={args.max_skipped_fraction}: the model barely trained"
            f"{' and was not exported' if args.export_hf else ''}. Lower --lr, or clip with --clip-grad-norm")


def on_device(tensors, device):
    """The batch on the device; on a GPU through pinned memory, so that the copy queues behind the work."""
    return [t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device) for t in tensors]


def summary_line(evaluations, summary, out) -> str:
    accuracy = f", accuracy {evaluations[0]['acc']:.3f} -> {summary['acc']:.3f}" if "acc" in summary else ""
    return (f"validation loss {evaluations[0]['val_loss']:.4f} -> {summary['val_loss']:.4f} (best "
            f"{summary['best_val_loss']:.4f} at step {summary['best_val_loss_step']}){accuracy}\n"
            f"{summary['time_s']:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s; metrics in {out / 'metrics.jsonl'}, "
            f"curves in {out / 'curves.svg'}")


class StopOnInterrupt:
    """Ctrl-C: the running step ends, a checkpoint is saved (with --save-every) and the run stops with a message;
    a second Ctrl-C stops at once.

    Under torchrun every rank gets the terminal's SIGINT, and torchrun then sends its workers SIGTERM and kills
    them 30 s later. After a Ctrl-C that SIGTERM is taken as the same request (a SIGTERM alone, as when another
    rank died, still ends the process at once). The ranks may see the signal at different steps, so they agree
    through a one-number all-reduce on a gloo group: each step posts its flag and reads the previous step's
    without waiting, and every rank stops after the same step, one step after the first that saw it. A save that
    outlasts torchrun's 30 s is cut off; the previous one stays complete."""

    def __init__(self, grid):
        self.requested, self.first_at, self.previous, self.posted = False, None, {}, None
        self.group = dist.new_group(backend="gloo") if grid.world_size > 1 else None
        if threading.current_thread() is threading.main_thread():
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT and time.monotonic() - self.first_at > 2.0:
            raise KeyboardInterrupt  # a second Ctrl-C (not the same one reaching several processes)
        if not self.requested:
            self.requested, self.first_at = True, time.monotonic()
            if self.group is not None and signal.SIGTERM not in self.previous:
                self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self.handle)  # torchrun's, next
            print("\nCtrl-C: ending after this step (press it again to stop at once)", file=sys.stderr, flush=True)

    def stop_now(self) -> bool:
        """Whether to stop after the step that has just run: the same answer on every rank."""
        if self.group is None:
            return self.requested
        agreed = False
        if self.posted is not None:
            flag, work = self.posted
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([1.0 if self.requested else 0.0])
        self.posted = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return agreed

    def restore(self):
        if self.posted is not None:
            self.posted[1].wait()  # every rank posted as many as the others: it completes
            self.posted = None
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def export(args, model, grid, tokenizer, save, print0):
    """--export-hf at the end; if it fails, the trained weights are kept in a training state first."""
    require_finite_weights(model, args.steps)
    try:
        checkpoint.save_hf(model, args.export_hf, grid, tokenizer_path=tokenizer.path)
    except Exception as error:
        kept = Path(args.out) / "checkpoints" / f"step-{args.steps:08d}"
        if not kept.is_dir():
            save(args.steps)
        raise RuntimeError(f"--export-hf {args.export_hf} failed ({type(error).__name__}: {error}); the trained "
                           f"weights are in {kept}: export them with `python checkpoint.py convert {kept} "
                           f"{args.export_hf} --to hf --tokenizer {tokenizer.path}`") from error
    print0(f"weights exported to {args.export_hf} (Hugging Face format)")


def model_and_lomo(args, grid, dtype, margs, model_name, print0):
    """The model (from --ckpt or the seeded init), its LOMO with every acceleration that applies, and the
    CUDA-graphed step if --cuda-graph."""
    # Built on the meta device; each rank allocates only its shards, the slices of the seed's full init.
    model = build_model(margs, grid, args.seed, dtype, init=not args.ckpt)
    if args.ckpt:
        checkpoint.load_checkpoint(args.ckpt, model, grid)  # each rank reads only its own slices
    print0(f"model: {model_name} {margs}\n  {sum(p.numel() for p in model.parameters()):,} parameters per rank, "
           f"{dtype}")
    if args.optimizer == "adamw":
        if grid.world_size > 1:
            raise ValueError(f"--optimizer adamw runs in one process ({grid.world_size} here): the baseline has no "
                             f"dp averaging or tp norms; compare in one process, or train with lomo or adalomo")
        speedups.apply_layers(model, args.activation_checkpointing, args.offload_checkpoints)
        if args.compile:
            speedups.compile_blocks(model)
        lomo = AdamWStep(model, args.lr, weight_decay=args.weight_decay, clip_grad_norm=args.clip_grad_norm,
                         clip_grad_value=args.clip_grad_value)
        print0(f"AdamW (the full-backward baseline): lr {args.lr}, weight decay {args.weight_decay}")
        return model, lomo, None
    rule = None  # lomo.SGD(weight_decay)
    if args.optimizer == "adalomo":
        rule = AdaLomo(model, eps=tuple(args.adalomo_eps), clip_threshold=args.adalomo_clip_threshold,
                       decay_rate=args.adalomo_decay_rate, weight_decay=args.weight_decay, tp_group=grid.tp_group)
    # Every acceleration that applies (speedups.py); the same step as lomo.LOMO(model, ...), faster.
    lomo = speedups.apply(
        model, lr=args.lr, weight_decay=args.weight_decay if rule is None else 0.0, rule=rule,
        clip_grad_norm=args.clip_grad_norm,
        clip_grad_value=args.clip_grad_value, tp_group=grid.tp_group, dp_group=grid.dp_group,
        activation_checkpointing=args.activation_checkpointing, offload_checkpoints=args.offload_checkpoints,
        compile=args.compile, branch_grads_gpu_gib=args.branch_grads_gpu_gib, fused_kernel=not args.no_fused_kernel,
        check_finite=not args.no_finite_checks)
    print0(f"{'AdaLomo' if rule is not None else 'LOMO'}: lr {args.lr} ({args.schedule}, warmup "
           f"{args.warmup_steps}), weight decay {args.weight_decay}, "
           f"clip norm {args.clip_grad_norm}, clip value {args.clip_grad_value}, "
           f"{'two backward passes' if lomo.needs_norm_pass else 'one backward pass'}"
           f"{', dynamic loss scaling' if lomo.loss_scaler else ''}")
    # Refuses what a graph cannot hold (fp16, weight decay, ...) now, before any step runs.
    graphed = GraphedStep(model, lomo, lambda i, t: model_loss(model, i, t, grid)) if args.cuda_graph else None
    if graphed is not None:
        print0("CUDA graphs: step 1 eager, then each step replayed (cuda_graph.py); batches padded to --seq-len")
    return model, lomo, graphed


def train(args, grid, dtype):
    run_started = time.perf_counter()
    device = grid.device
    print0 = print if grid.is_main else (lambda *a, **k: None)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print0(f"processes: {grid.world_size} = dp {grid.dp} x tp {grid.tp}, device {device}{name}, "
           f"torch {torch.__version__}")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if grid.is_main:
        out.mkdir(parents=True, exist_ok=True)
    tokenizer, margs, model_name = tokenizer_and_config(args, grid, print0)
    train_set, val_set = datasets(args, tokenizer, margs, print0)

    model, lomo, graphed = model_and_lomo(args, grid, dtype, margs, model_name, print0)

    # -------------------------------------------------------------------------------- resume or start
    # Every rank draws the same global batch of dp x batch-size sequences and keeps its dp slice: the ranks
    # of a tp group see the same rows, the dp groups disjoint ones, and the run equals one process that
    # sees the whole global batch (exactly so when every rank has the same number of target tokens).
    sampler = ShuffledSampler(len(train_set.items), args.seed)
    rows = slice(grid.dp_rank * args.batch_size, (grid.dp_rank + 1) * args.batch_size)
    first_step, evaluations, totals = resume(args, out, model, lomo, sampler, grid, print0)
    # --eval-only appends its results beside the training log, never over it.
    log = out / ("eval.jsonl" if args.eval_only else "metrics.jsonl")
    metrics = Metrics(log, first_step > 1 or args.eval_only, grid, totals)

    def evaluate(step):
        result, text = evaluation(args, model, val_set, tokenizer, grid)
        if grid.is_main:
            tqdm.write(f"step {step}: {text}")
        return dict(step=step, **result)

    if args.eval_only:
        result = dict(eval_only=True, **evaluate(first_step - 1))
        metrics.log(result)
        return result
    if not evaluations:
        evaluations = [evaluate(0)]
        metrics.log(evaluations[-1])

    # -------------------------------------------------------------------------------- loop
    # Everything alive now (torch's modules, the model, the data) lives as long as the run. Freezing it
    # keeps the garbage collector's full collections from scanning it again (on a 7B step one took 183 ms;
    # frozen, 1-2 ms). Cycles made from here on are still collected; unfrozen after the loop.
    gc.collect()  # what is already garbage goes now: frozen, it would stay for the whole run
    gc.freeze()
    unchecked = not lomo.guard.checks and not lomo.needs_norm_pass  # --no-finite-checks (a norm pass checks anyway)
    clock = StepClock(device)

    def finish(step, lr, result, tokens, peak, seconds, evaluate_now):
        """Write the row of a step that has run: by then its loss and norm are on the host, or nearly."""
        lomo.check_previous_step()  # a one-pass step with a non-finite gradient norm stops training here
        row = metrics.step_row(step, lr, result, tokens, peak, seconds)
        if unchecked and not math.isfinite(result.loss):
            raise FloatingPointError(
                f"step {step}: loss {result.loss} with --no-finite-checks, so its gradients have reached the "
                f"weights. Resume from the last checkpoint (--resume) without --no-finite-checks (a "
                f"non-finite loss then skips the step), with --clip-grad-norm, or with a lower --lr")
        bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.3g}", tok_s=f"{tokens / seconds:,.0f}")
        if result.reason and grid.is_main:
            tqdm.write(f"step {step}: skipped: {result.reason}")
        if evaluate_now:
            evaluations.append(evaluate(step))
            row.update(evaluations[-1])
        metrics.log(row)

    saves = out / "checkpoints"

    def save(step):
        require_finite_weights(model, step)
        training_state.save_training_state(saves, step, model, grid, dict(
            step=step, lomo=lomo.state_dict(), sampler=sampler.state_dict(), evaluations=evaluations,
            skipped_steps=metrics.skipped_steps, totals=metrics.totals(time.perf_counter() - run_started),
            config=vars(args)), keep=args.keep)

    interrupt, stopped = StopOnInterrupt(grid), False
    try:
        bar = tqdm(range(first_step, args.steps + 1), desc="train", dynamic_ncols=True, file=sys.stdout,
                   initial=first_step - 1, total=args.steps, disable=not grid.is_main)
        # The loop never waits for the GPU between steps: step t's row is written once step t+1's forward
        # is queued behind it (t's loss and norm have arrived by then, or nearly), so the GPU has work while
        # the CPU reads them and logs, and before t+1's backward moves any weight (a bad step t stops the
        # run first). A step that evaluates, saves or ends the run is waited for and written at once.
        previous = None  # (step, lr, result, tokens, peak memory, clock mark at its start): row not yet written
        for step in bar:
            batch = [train_set.items[i] for i in sampler.next(args.batch_size * grid.dp)[rows]]
            inputs, targets = on_device(collate(batch, length=args.seq_len + 1 if graphed else None), device)
            lr = learning_rate(step, args.lr, args.steps, args.warmup_steps, args.schedule, args.min_lr_ratio)
            step_mark = clock.mark()
            loss = graphed.forward(inputs, targets) if graphed else model_loss(model, inputs, targets, grid)
            if previous is not None:
                finish(*previous[:-1], clock.seconds(previous[-1], step_mark), evaluate_now=False)
            result = graphed.step(loss, lr) if graphed else lomo.step(loss, lr)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            previous = (step, lr, result, targets.numel() * grid.dp, peak, step_mark)
            evaluate_now = step % args.eval_every == 0 or step == args.steps
            stop = interrupt.stop_now()
            save_now = args.save_every and (step % args.save_every == 0 or step == args.steps or stop)
            if evaluate_now or save_now or stop:
                finish(*previous[:-1], clock.seconds(step_mark, clock.mark()), evaluate_now)  # waits for the step
                previous = None
            if save_now:
                save(step)
            if stop:
                stopped = True  # (agreed by every rank: they all export, or none does)
                print0(f"stopped by Ctrl-C after step {step}" + (f"; saved in {saves}: continue with --resume"
                                                                 if save_now else " (no --save-every: nothing saved)"))
                break
        bar.close()
        if graphed is not None:
            print0(f"CUDA graphs: {graphed.replays} steps replayed, {graphed.eager_steps} eager")
    finally:
        gc.unfreeze()
        interrupt.restore()
    if args.export_hf and not stopped and not metrics.too_many_skipped(args):
        export(args, model, grid, tokenizer, save, print0)
    summary = metrics.summary(args, evaluations, time.perf_counter() - run_started, bool(val_set.choices))
    print0(summary_line(evaluations, summary, out))
    if metrics.too_many_skipped(args):
        raise metrics.skipped_error(args)
    return dict(first_val_loss=evaluations[0]["val_loss"], **summary)


if __name__ == "__main__":
    cli.run(main, "train.py")  # a user error: its one line and status 2, no traceback
