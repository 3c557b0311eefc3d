"""Memory and throughput of one training step, LOMO against the usual ways, on the same model and batch.

    python bench.py --model 7B --dtype bf16 --batch-size 4 --seq-len 512 --activation-checkpointing
    torchrun --nproc_per_node 2 bench.py --model 13B --tp 2 ...        (tensor parallel: every rank measures)
    python bench.py --tiny                                              (a seconds-long CPU run, for CI)

Modes, each measured in its own process so that one mode's peak never hides in another's:
  infer      forward and the training loss under no_grad: the floor LOMO aims for
  infer-logits  the usual inference forward: all (tokens x vocab) logits, then the loss from them
  lomo       LOMO, one backward pass with the update fused in, and its checks (the loss before the first
             update, each gradient's norm); --no-finite-checks: without them, as the paper's LOMO;
             --cuda-graph (also lomo-clip): the step replayed as CUDA graphs after the warm-up (cuda_graph.py)
  lomo-clip  LOMO with clipping by global norm: two backward passes
  adalomo    AdaLomo (adalomo.py) in LOMO's one backward pass: factored second moments, O(m + n) per matrix
  sgd        loss.backward() then torch.optim.SGD (all gradients alive at once)
  adamw      loss.backward() then torch.optim.AdamW (gradients and two states per parameter)
  hook-sgd   PyTorch's optimizer-in-backward pattern: a post-accumulate-grad hook steps a per-parameter SGD

One JSON line per mode: peak allocated and reserved memory, parameter bytes, tokens/s (all GPUs; the mean
over the timed steps, and from the median step, whose time CUDA events give) and tokens per GPU per
second, model FLOPs utilization, the device, and a memory breakdown against LOMO's formula (parameters +
checkpointed activations + the largest gradient): the paper's Table 1 from live numbers.
FLOPs per token are counted as 6 N + 12 L S d for training (N parameters, L layers, S sequence
length, d model width: the matmuls of forward and backward plus attention scores), 2 N + 4 L S d for
inference; activation recomputation is not counted, so MFU is comparable with and without it.

`--memory-cap-gb 24` limits each process's GPU memory (torch.cuda.set_per_process_memory_fraction) to
emulate a consumer card; `--find-max-batch` searches the largest batch that trains under the cap.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

import cli

MODES = ["infer", "infer-logits", "lomo", "lomo-clip", "adalomo", "sgd", "adamw", "hook-sgd"]
# Dense bf16/fp16 peak of the card (vendor datasheets), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "RTX 3090": 71.0, "RTX 4090": 165.2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7B")
    p.add_argument("--n-layers", type=int, default=None, help="override the layer count (shape studies)")
    p.add_argument("--dtype", default="bf16", help="bf16 or fp16 (fp32 for --tiny)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step per data-parallel rank")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--offload-checkpoints", action="store_true",
                   help="with --activation-checkpointing: keep the saved block inputs in host memory (offload.py)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (speedups.compile_blocks)")
    p.add_argument("--no-gram-norms", action="store_true",
                   help="lomo-clip's norm pass makes every weight gradient for its norm (the A/B for gram_norm.py)")
    p.add_argument("--no-saved-branch-grads", action="store_true",
                   help="lomo-clip: speedups.apply(saved_branch_grads=False): the update pass computes each "
                        "block's input gradients again instead of taking them from the norm pass (the A/B for "
                        "offload.py's)")
    p.add_argument("--branch-grads-gpu-gib", type=float, default=None,
                   help="lomo-clip: speedups.apply(branch_grads_gpu_gib=...): how many GiB of the norm pass's "
                        "saved gradients stay on the GPU, the rest in host memory (default 1; 0: all in host memory)")
    p.add_argument("--no-finite-checks", action="store_true",
                   help="lomo: speedups.apply(check_finite=False), the paper's one pass: no loss check, no "
                        "gradient norms")
    p.add_argument("--no-fused-kernel", action="store_true",
                   help="lomo: speedups.apply(fused_kernel=False): the update and the norm as two PyTorch ops, not "
                        "fused_update.py's one kernel (the A/B for it; only a GPU with Triton has the kernel)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="lomo, lomo-clip: after the warm-up's first step, each step is replayed from CUDA graphs "
                        "(cuda_graph.py); the peaks then include the warm-up, whose capture allocates the graphs' "
                        "memory")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps, after --warmup steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-cap-gb", type=float, default=None, help="emulate a card with this much memory")
    p.add_argument("--find-max-batch", action="store_true", help="largest batch that trains (mode lomo) under the cap")
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU, to check that bench.py runs")
    p.add_argument("--out", default=None, help="append the JSON lines to this file too")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one mode, inside its own process
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# One mode, in its own process


def random_model(margs, grid, dtype):
    """This rank's shards of a model of shape `margs`, with weights drawn on the device (the seeded init
    draws on the CPU: minutes for 7B, and speed and memory do not depend on the values): norms at one,
    matrices at LLaMA-like scale."""
    from shard import build_model
    model = build_model(margs, grid, seed=0, dtype=dtype, init=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02)
    return model


def run_mode(args, mode):
    from adalomo import AdaLomo
    from cuda_graph import GraphedStep, release_graphs
    from losses import model_loss
    import speedups
    from model import DTYPES, cross_entropy_loss, model_args
    from shard import destroy_distributed, gather_from_tp, init_distributed
    grid = init_distributed(args.tp, "cpu" if args.tiny else "cuda")
    try:
        device = grid.device
        if args.memory_cap_gb and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total), device)
        dtype = DTYPES[args.dtype]
        overrides = {"vocab_size": 512} if args.tiny else {}
        if args.n_layers:
            overrides["n_layers"] = args.n_layers
        margs = model_args("tiny" if args.tiny else args.model, **overrides)
        lr = 1e-6  # small: the weights barely move, so every timed step does the same work
        model = random_model(margs, grid, dtype)
        backend = "aot_eager" if args.tiny else "inductor"
        lomo_mode = mode in ("lomo", "lomo-clip", "adalomo")
        if lomo_mode:  # every acceleration that applies (speedups.py), as train.py
            gib = args.branch_grads_gpu_gib
            rule = AdaLomo(model, tp_group=grid.tp_group) if mode == "adalomo" else None
            lomo = speedups.apply(
                model, lr=lr, rule=rule, clip_grad_norm=1.0 if mode == "lomo-clip" else None, tp_group=grid.tp_group,
                dp_group=grid.dp_group, activation_checkpointing=args.activation_checkpointing,
                offload_checkpoints=args.offload_checkpoints, compile=args.compile, compile_backend=backend,
                gram_norms=not args.no_gram_norms, saved_branch_grads=not args.no_saved_branch_grads,
                branch_grads_gpu_gib=1.0 if gib is None else gib, fused_kernel=not args.no_fused_kernel,
                check_finite=not args.no_finite_checks)
        else:  # the same model for the baselines: its layers and checkpointing as LOMO's
            speedups.apply_layers(model, args.activation_checkpointing, args.offload_checkpoints)
            if args.compile:
                speedups.compile_blocks(model, backend=backend, backward_twice=args.dtype == "fp16")
        tokens = torch.randint(0, margs.vocab_size, (args.batch_size, args.seq_len + 1),
                               generator=torch.Generator().manual_seed(0)).to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        def loss_of():  # the training loss: head and cross-entropy fused in vocabulary chunks (losses.py)
            return model_loss(model, inputs, targets, grid)

        params = list(model.parameters())
        if lomo_mode:
            step = lambda: lomo.step(loss_of())  # noqa: E731
            if args.cuda_graph:
                graphed = GraphedStep(model, lomo, lambda i, t: model_loss(model, i, t, grid))
                step = lambda: graphed.step(graphed.forward(inputs, targets))  # noqa: E731
        elif mode in ("sgd", "adamw"):
            optimizer = (torch.optim.SGD(params, lr=lr) if mode == "sgd" else torch.optim.AdamW(params, lr=lr))

            def step():
                loss_of().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        elif mode == "hook-sgd":
            # The PyTorch tutorial's pattern: one optimizer per parameter, stepped as its gradient lands.
            optimizers = {p: torch.optim.SGD([p], lr=lr) for p in params}

            def step_one(param):
                optimizers[param].step()
                optimizers[param].zero_grad(set_to_none=True)

            for p in params:
                p.register_post_accumulate_grad_hook(step_one)
            step = lambda: loss_of().backward()  # noqa: E731
        elif mode == "infer":
            def step():
                with torch.no_grad():
                    loss_of()
        elif mode == "infer-logits":
            def step():  # the usual inference forward: all the logits, then the loss from them
                with torch.no_grad():
                    cross_entropy_loss(gather_from_tp(model(inputs), grid), targets)
        else:
            raise ValueError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        gc.collect()
        gc.freeze()  # as train.py does before its loop: no full collection rescans the set-up's objects
        graph = args.cuda_graph and mode in ("lomo", "lomo-clip")
        if device.type == "cuda" and graph:
            # A replay allocates nothing: the graph's memory is allocated when it is captured, in the warm-up.
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step()
        sync()
        if device.type == "cuda" and not graph:
            torch.cuda.reset_peak_memory_stats(device)
        # Each step's own time too, from CUDA events between steps (no added host sync, so the CPU may run
        # ahead into the next step as before): a median that one slow step cannot move.
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)] if device.type == "cuda" else []
        started = time.perf_counter()
        for i in range(args.steps):
            if marks:
                marks[i].record()
            step()
        if marks:
            marks[-1].record()
        sync()
        seconds = (time.perf_counter() - started) / args.steps
        step_ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        # Which accelerations the step used (speedups.report): the kernel, Gram norms, saved branch gradients.
        used = speedups.report(model, lomo) if lomo_mode else {}
        row = measurements(args, mode, margs, model, grid, seconds, step_ms)
        row.update(fused_kernel=used.get("fused_kernel"), gram_norms=used.get("gram_norms", False),
                   saved_branch_grads=used.get("saved_branch_grads", False),
                   branch_grads_gpu_gib=used.get("branch_grads_gpu_gib"))
        row["cuda_graph"] = graphed.replays if graph else None  # how many steps were replays
        return row
    finally:
        gc.unfreeze()
        release_graphs()  # a captured all-reduce holds its communicator: the group's teardown would wait for it
        destroy_distributed()


def measurements(args, mode, margs, model, grid, seconds, step_ms=()):
    device = grid.device
    element = next(model.parameters()).element_size()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest_grad_bytes = max(p.numel() * p.element_size() for p in model.parameters())
    # With checkpointing each block keeps only its input, (batch, seq, dim), plus the embedding output;
    # offloaded, those inputs are in host memory and the GPU holds two at a time (one is prefetched).
    kept_inputs = 2 if args.offload_checkpoints else margs.n_layers + 1
    checkpointed_bytes = kept_inputs * args.batch_size * args.seq_len * margs.dim * element
    n_params_full = sum(p.numel() * (grid.tp if hasattr(p, "tensor_parallel_dim") else 1) for p in model.parameters())
    attention = 12 * margs.n_layers * args.seq_len * margs.dim
    inference = mode.startswith("infer")
    flops_per_token = (2 * n_params_full + attention // 3) if inference else (6 * n_params_full + attention)
    tokens_per_s = args.batch_size * grid.dp * args.seq_len / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    row = dict(mode=mode, model=args.model if not args.tiny else "tiny", n_layers=margs.n_layers, dtype=args.dtype,
               batch_size=args.batch_size, seq_len=args.seq_len, tp=grid.tp, dp=grid.dp,
               activation_checkpointing=args.activation_checkpointing,
               offload_checkpoints=args.offload_checkpoints, compile=args.compile, memory_cap_gb=args.memory_cap_gb,
               finite_checks=not args.no_finite_checks if mode in ("lomo", "adalomo") else None,
               device=name, torch=torch.__version__, seconds_per_step=seconds, tokens_per_s=tokens_per_s,
               tokens_per_gpu_per_s=tokens_per_s / grid.world_size, flops_per_token=flops_per_token,
               mfu=(flops_per_token * tokens_per_s / grid.world_size / (peak * 1e12)) if peak else None,
               param_gib=param_bytes / 2**30)
    if step_ms:
        median_ms = sorted(step_ms)[len(step_ms) // 2]
        row.update(step_ms=[round(t, 2) for t in step_ms], median_step_ms=median_ms,
                   median_tokens_per_s=args.batch_size * grid.dp * args.seq_len / (median_ms / 1e3))
    if device.type == "cuda":
        peak_allocated = torch.cuda.max_memory_allocated(device)
        formula = param_bytes + (checkpointed_bytes if args.activation_checkpointing else 0) + largest_grad_bytes
        row.update(peak_allocated_gib=peak_allocated / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30,
                   # what the process holds after the timed steps (a graph's pool included): the same window for
                   # every mode, with or without --cuda-graph
                   reserved_end_gib=torch.cuda.memory_reserved(device) / 2**30,
                   breakdown_gib=dict(parameters=param_bytes / 2**30,
                                      checkpointed_activations=checkpointed_bytes / 2**30,
                                      largest_gradient=largest_grad_bytes / 2**30,
                                      lomo_formula=formula / 2**30, rest=(peak_allocated - formula) / 2**30))
    return row


# ----------------------------------------------------------------------------------------------------
# The parent: one process per mode (torchrun for tp > 1), results gathered from their last line


def launch(args, mode, batch_size=None):
    """Run one mode in a fresh process; returns its JSON row, or None if it ran out of memory."""
    argv = [a for a in args.argv if a not in ("--find-max-batch",)]
    argv += ["--worker", mode] + (["--batch-size", str(batch_size)] if batch_size else [])
    command = [sys.executable, os.path.abspath(__file__), *argv]
    if args.tp > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.tp),
                   os.path.abspath(__file__), *argv]
    done = subprocess.run(command, capture_output=True, text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not rows:
        if "OutOfMemoryError" in done.stderr or "CUDA out of memory" in done.stderr:
            print(f"{mode}, batch {batch_size or args.batch_size}: out of memory", file=sys.stderr, flush=True)
            return None
        raise RuntimeError(f"bench mode {mode} failed:\n{done.stderr[-3000:]}")
    print(f"{mode}, batch {batch_size or args.batch_size}: {json.dumps(rows[0])}", file=sys.stderr, flush=True)
    return rows[0]


def find_max_batch(args):
    """Double the batch until a LOMO step runs out of memory, then bisect."""
    low, high = 0, args.batch_size
    while (row := launch(args, "lomo", high)) is not None:
        low, high, best = high, high * 2, row
    while high - low > 1:
        middle = (low + high) // 2
        if (row := launch(args, "lomo", middle)) is not None:
            low, best = middle, row
        else:
            high = middle
    if low == 0:
        raise RuntimeError(f"not even batch 1 fits under {args.memory_cap_gb} GiB")
    return dict(best, max_batch_size=low)


def main(argv=None):
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # handed on to the per-mode processes
    if args.tiny:
        args.dtype, args.seq_len, args.batch_size = "fp32", min(args.seq_len, 64), min(args.batch_size, 2)
    elif not torch.cuda.is_available() and args.worker is None:
        raise SystemExit("bench.py measures GPUs and this machine has none: run it on a GPU, or pass --tiny")
    if args.worker:  # inside the per-mode process: measure and print one line (rank 0)
        row = run_mode(args, args.worker)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(row), flush=True)
        return
    modes = args.modes.split(",")
    if args.cuda_graph and (args.tiny or not set(modes) <= {"lomo", "lomo-clip"}):
        raise SystemExit("--cuda-graph replays LOMO's step on a GPU: run it with --modes lomo and/or lomo-clip, "
                         "without --tiny")
    if args.cuda_graph and args.warmup < 2:
        raise SystemExit(f"--cuda-graph needs --warmup 2 or more (one eager step, then the capture): got {args.warmup}")
    if args.offload_checkpoints and not args.activation_checkpointing:
        raise SystemExit("--offload-checkpoints moves the inputs that checkpointing saves: "
                         "add --activation-checkpointing")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}: choose from {', '.join(MODES)}")
    rows = [find_max_batch(args)] if args.find_max_batch else [launch(args, mode) or dict(mode=mode, oom=True)
                                                               for mode in modes]
    for row in rows:
        report(row, args.out)


def report(row, out=None):
    """A row as one JSON line on stdout, and appended to the file `out` (--out) if given."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    cli.run(main, "bench.py")
