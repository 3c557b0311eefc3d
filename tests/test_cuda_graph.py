"""cuda_graph.py: a LOMO step captured as CUDA graphs trains exactly as the eager step.

On the CPU: the host's parts and the device passes of a graphed step (begin_replayed_step, device_pass under
capturing, decide_replayed, end_replayed_one_pass), run eagerly with the kernel's contract in PyTorch ops,
against LOMO.step, one-pass and clipped, and every refusal.
On a GPU: the graphs themselves, replayed, against eager steps bit for bit, with a batch and an lr that change
each step, clipping, a non-finite loss, a batch of another shape, settings changed after the capture, graphs
released and captured again; on two GPUs, tp = 2 and dp = 2 through train.py, and graphed tp = 2 runs that end
(bench.py's report; train.py's error after the capture) instead of waiting in the process group's teardown."""
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_update
from conftest import VOCAB, inject, loss_of, tiny_model
import cuda_graph
import gram_norm
import offload
import speedups
from cuda_graph import GraphedStep, capturing, device_pass, obstacle
from distributed import run_ranks
from lomo import LOMO
from train import learning_rate
from model import cross_entropy_loss
from test_fused_update import reference_kernel as kernel_contract

needs_graphs = pytest.mark.skipif(not (torch.cuda.is_available() and fused_update.triton is not None),
                                  reason="CUDA graphs and the kernel need a GPU and Triton")


def reference_kernel(*args):
    """fused_update's kernel in PyTorch ops (test_fused_update.py's), counting its calls."""
    reference_kernel.calls += 1
    kernel_contract(*args)


@pytest.fixture
def kernel_on_the_cpu(monkeypatch):
    monkeypatch.setattr(fused_update, "available", lambda param, grad: True)
    monkeypatch.setattr(fused_update, "update_and_sum_squares", reference_kernel)
    reference_kernel.calls = 0


def lrs(steps):
    return [learning_rate(s, 0.3, steps, warmup_steps=2, schedule="cosine") for s in range(1, steps + 1)]


def batches(steps, device="cpu"):
    make = torch.Generator().manual_seed(7)
    tokens = [torch.randint(0, VOCAB, (2, 17), generator=make).to(device) for _ in range(steps)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def pair(dtype=torch.bfloat16, vectors="trained", device="cpu"):
    models = [tiny_model(dtype=dtype).to(device) for _ in range(2)]
    for model in models:
        for p in model.parameters():
            p.requires_grad_(p.dim() > 1 or vectors == "trained")
    return models


def fast(model, lr, checkpointing=False, **options):
    """LOMO with every acceleration that applies (speedups.apply), as train.py and bench.py make it."""
    return speedups.apply(model, lr=lr, activation_checkpointing=checkpointing, **options)


def graphed_step_on_the_cpu(lomo, model, batch, lr, loss_fn=loss_of):
    """What GraphedStep's replays do, run eagerly: the host's part and the device passes between."""
    result = cuda_graph.begin_replayed_step(lomo, lr)
    loss = loss_fn(model, batch)
    with capturing(lomo):
        if not lomo.needs_norm_pass:
            return cuda_graph.end_replayed_one_pass(lomo, result, *device_pass(lomo, loss))
        mean_loss, norm = device_pass(lomo, loss, "norm")
        saved = cuda_graph.saved_bytes(lomo)
        if cuda_graph.decide_replayed(lomo, result, mean_loss, norm):
            device_pass(lomo, loss, "update")
            assert cuda_graph.saved_bytes(lomo) == 0  # the update pass took every saved gradient
        cuda_graph.release_saved(lomo)
    result.saved_bytes = saved
    return lomo.end_step(result) if not result.skipped else result


@pytest.mark.parametrize("vectors", ["frozen", "trained"])
def test_the_one_pass_device_pass_trains_as_step(kernel_on_the_cpu, vectors):
    models = pair(vectors=vectors)
    eager, graphed = (fast(m, lr=0.3) for m in models)
    assert obstacle(models[1], graphed) is None
    trained = sum(1 for p in models[1].parameters() if p.requires_grad)
    for lr, batch in zip(lrs(4), batches(4)):
        a = eager.step(loss_of(models[0], batch), lr)
        reference_kernel.calls = 0
        b = graphed_step_on_the_cpu(graphed, models[1], batch, lr)
        assert reference_kernel.calls == trained  # the vectors too: one kernel each, alpha read from the device
        assert b.step == a.step and b.lr == lr and b.loss == a.loss and not b.skipped
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
    assert all(p.grad is None for p in models[1].parameters())
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name  # the eager vectors' add_ and the kernel's contract round alike


@pytest.mark.parametrize("checkpointing, saved", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("clip", [0.05, 1e6])  # clipping active, and not (a factor of 1)
def test_the_clipped_device_passes_train_as_step(kernel_on_the_cpu, checkpointing, saved, clip):
    # fp32, so that the eager update (the clip factor on the gradient, then -lr) and the kernel's (alpha = -lr times
    # the clip factor) differ only by rounding; the norm and the decision are the same computation.
    models = pair(dtype=torch.float32)
    eager, graphed = (fast(m, lr=0.3, clip_grad_norm=clip, checkpointing=checkpointing, saved_branch_grads=saved)
                      for m in models)
    assert obstacle(models[1], graphed) is None
    trained = sum(1 for p in models[1].parameters() if p.requires_grad)
    grams = []
    add = graphed.add_norm
    graphed.add_norm = lambda norm, sharded: grams.append(norm) or add(norm, sharded)
    for step, (lr, batch) in enumerate(zip(lrs(3), batches(3))):
        a = eager.step(loss_of(models[0], batch), lr)
        reference_kernel.calls, grams[:] = 0, []
        b = graphed_step_on_the_cpu(graphed, models[1], batch, lr)
        assert reference_kernel.calls == trained  # only in the update pass: the norm pass moves nothing
        # Step 1 runs the same forward on the same weights, so the losses are the same bits. After it the weights
        # differ by the rounding of the two updates (within the rtol 1e-6 asserted below), and a loss of weights a
        # few ulps apart moves by about as much relatively: 1e-6, not equality (the BLAS of the CPU decides the bits).
        assert b.loss == a.loss if step == 0 else b.loss == pytest.approx(a.loss, rel=1e-6)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
        assert (b.grad_norm > clip) == (clip < 1)
        # The norm pass takes the linear layers' norms from Grams (7 a block and the head), as step() does; the
        # rest: the embedding's from its gradient, the 5 norm weights' (batched), the update pass's kernel slots.
        gram_layers = next(e for e in graphed.extensions if isinstance(e, gram_norm.GramNorms)).layers
        assert len(gram_layers) == 7 * 2 + 1 and len(grams) == len(gram_layers) + 1 + (2 * 2 + 1) + 1
        # With checkpointed blocks the norm pass keeps both branch gradients of each block, all on the device.
        assert b.saved_bytes == (2 * 2 * 2 * 16 * models[1].args.dim * 4 if checkpointing and saved else 0)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7), name
    assert all(p.grad is None for p in models[1].parameters())


def parallel_worker(tp, clip):
    # In each of two gloo processes: eager LOMO.step against the graphed step's parts, on a model split over tp
    # ranks or replicated over dp ranks (each dp rank its rows of the batch).
    import losses
    import shard
    from model import model_args
    grid = shard.init_distributed(tp=tp, device="cpu")
    fused_update.available = lambda param, grad: True
    fused_update.update_and_sum_squares = reference_kernel
    reference_kernel.calls = 0
    args = model_args("tiny", vocab_size=VOCAB, n_layers=2, max_seq_len=64, n_heads=8, n_kv_heads=4)
    models = [shard.build_model(args, grid, seed=0) for _ in range(2)]
    eager, graphed = (fast(m, lr=0.3, clip_grad_norm=clip, checkpointing=True, tp_group=grid.tp_group,
                           dp_group=grid.dp_group) for m in models)
    make = torch.Generator().manual_seed(3)
    rows = slice(grid.dp_rank * 4 // grid.dp, (grid.dp_rank + 1) * 4 // grid.dp)
    reported = []
    for lr in lrs(3):
        tokens = torch.randint(0, VOCAB, (4, 17), generator=make)[rows]
        batch = (tokens[:, :-1], tokens[:, 1:])

        def loss_fn(model, batch):
            return losses.model_loss(model, *batch, grid)

        a = eager.step(loss_fn(models[0], batch), lr)
        b = graphed_step_on_the_cpu(graphed, models[1], batch, lr, loss_fn)
        reported.append((a.loss, b.loss, a.grad_norm, b.grad_norm))
    return reported, [[shard.gather_full(p, grid) for p in model.parameters()] for model in models]


@pytest.mark.parametrize("tp", [2, 1])  # tp = 2, or dp = 2
@pytest.mark.parametrize("clip", [None, 0.05])
def test_in_parallel_the_graphed_step_s_parts_train_as_step(tp, clip):
    # The collectives in the device passes: the mean loss over dp, the norm over tp, dp's gradient averages
    # (the norm weights' too, before their kernel). A rank that skipped one would report another loss or norm,
    # or its replicas would drift apart.
    ranks = run_ranks(parallel_worker, 2, tp, clip)
    for reported, (eager_weights, graphed_weights) in ranks:
        for eager_loss, graphed_loss, eager_norm, graphed_norm in reported:
            assert graphed_loss == pytest.approx(eager_loss, rel=1e-6)
            assert graphed_norm == pytest.approx(eager_norm, rel=1e-5)
            assert clip is None or graphed_norm > clip  # clipping was active
        for a, b in zip(eager_weights, graphed_weights):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if tp == 1:  # the dp replicas stay equal, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][1][1], ranks[1][1][1]))


def test_a_clipped_step_with_a_nonfinite_norm_is_skipped_before_its_update_pass(batch, kernel_on_the_cpu):
    model = tiny_model(dtype=torch.bfloat16)
    lomo = fast(model, lr=0.3, clip_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with inject(model, math.inf):
        result = graphed_step_on_the_cpu(lomo, model, batch, None)
    assert result.skipped and "non-finite gradient norm" in result.reason and lomo.consecutive_skips == 1
    assert reference_kernel.calls == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_clipped_skips_are_counted_as_by_step(kernel_on_the_cpu):
    # bad, good, bad, good: never two bad steps in a row, so neither way may stop; a good step resets the count.
    models = pair(dtype=torch.float32)
    eager, graphed = (fast(m, lr=0.3, clip_grad_norm=1.0, max_consecutive_skips=2) for m in models)
    for number, batch in enumerate(batches(4)):
        bad = number % 2 == 0
        with inject(models[0], math.inf) if bad else contextlib.nullcontext():
            a = eager.step(loss_of(models[0], batch))
        with inject(models[1], math.inf) if bad else contextlib.nullcontext():
            b = graphed_step_on_the_cpu(graphed, models[1], batch, None)
        assert a.skipped == b.skipped == bad and graphed.consecutive_skips == eager.consecutive_skips == int(bad)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_change_the_replays_would_not_follow_is_refused(kernel_on_the_cpu):
    # The check GraphedStep makes before each replay, with the capture's snapshot taken here on the CPU.
    model = tiny_model(dtype=torch.bfloat16)
    lomo = fast(model, lr=0.3, clip_grad_norm=1.0, checkpointing=True)
    graphed = GraphedStep(model, lomo, None)
    kernel = next(path for path in lomo.fast_paths if isinstance(path, fused_update.TritonAxpy))
    saved = next(e for e in lomo.extensions if isinstance(e, offload.SavedBranchGrads))
    cuda_graph.begin_replayed_step(lomo)
    graphed._captured_settings, graphed._alpha = graphed._settings(), kernel.alpha
    lomo.clip_grad_norm, lomo.lr = 0.5, 0.1  # read on the host each step: followed
    graphed.check_unchanged()
    changes = [lambda: setattr(lomo, "clip_grad_norm", None), lambda: setattr(saved, "gpu_gib", 0.5),
               lambda: lomo.extensions.remove(saved), lomo.remove_hooks,
               lambda: setattr(model.output.weight, "data", model.output.weight.data.clone()),
               lambda: setattr(kernel, "alpha", torch.zeros(()))]
    for change in changes:
        change()
        with pytest.raises(RuntimeError, match="make a new GraphedStep"):
            graphed.check_unchanged()
        graphed._captured_settings, graphed._alpha = graphed._settings(), kernel.alpha  # as if captured anew


def test_a_one_pass_device_pass_with_a_nonfinite_loss_moves_nothing_and_is_counted(batch, kernel_on_the_cpu):
    model = tiny_model(dtype=torch.bfloat16)
    lomo = fast(model, lr=0.3, max_consecutive_skips=2)
    before = [p.detach().clone() for p in model.parameters()]
    result = cuda_graph.begin_replayed_step(lomo)
    with capturing(lomo):
        passed = device_pass(lomo, loss_of(model, batch) * math.nan)
    result = cuda_graph.end_replayed_one_pass(lomo, result, *passed)
    assert result.skipped and "non-finite loss" in result.reason
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    cuda_graph.begin_replayed_step(lomo)  # counts the skip first (as step() does)
    assert lomo.consecutive_skips == 1


def test_a_one_pass_device_pass_with_a_nonfinite_gradient_stops_the_next_step(batch, kernel_on_the_cpu):
    model = tiny_model(dtype=torch.bfloat16)
    lomo = fast(model, lr=0.3)
    with inject(model, math.inf):
        graphed_step_on_the_cpu(lomo, model, batch, None)
    with pytest.raises(FloatingPointError, match="gradient norm (inf|nan) with a finite loss"):
        cuda_graph.begin_replayed_step(lomo)  # before anything of the next step is replayed


def test_a_weight_the_kernel_cannot_take_stops_the_capture(batch, kernel_on_the_cpu, monkeypatch):
    model = tiny_model(dtype=torch.bfloat16)
    lomo = fast(model, lr=0.3)
    odd = model.layers[1].feed_forward.w2.weight
    monkeypatch.setattr(fused_update, "available", lambda param, grad: param is not odd)
    assert "layers.1.feed_forward.w2.weight" in obstacle(model, lomo)
    cuda_graph.begin_replayed_step(lomo)
    with pytest.raises(RuntimeError, match="layers.1.feed_forward.w2.weight cannot be updated by the kernel"):
        with capturing(lomo):  # (GraphedStep refuses it before: obstacle)
            device_pass(lomo, loss_of(model, batch))


@pytest.mark.parametrize("setting, message", [
    (dict(check_finite=False), "no-finite-checks"),
    (dict(fused_kernel=False), "no-fused-kernel"),
    (dict(weight_decay=0.1), "no --weight-decay"),
    (dict(clip_grad_value=1.0), "--clip-grad-value"),
    ("fp16", "bf16 weights: fp16's loss scale"),
    ("offload", "offload-checkpoints"),
    ("cpu", "GPU with Triton"),
    ("reference", "DeferredGuard"),
])
def test_what_a_graph_cannot_hold_is_refused_with_the_way_around(monkeypatch, setting, message):
    if setting != "cpu":
        monkeypatch.setattr(fused_update, "available", lambda param, grad: True)
    model = tiny_model(dtype=torch.float16 if setting == "fp16" else torch.bfloat16)
    if setting == "reference":  # a bare LOMO reads its loss on the host
        lomo = LOMO(model, lr=0.1, fast_paths=[fused_update.TritonAxpy()])
    else:
        options = dict(checkpointing=True, offload_checkpoints=True) if setting == "offload" else {}
        lomo = fast(model, lr=0.1, **(setting if isinstance(setting, dict) else options))
    with pytest.raises(ValueError, match=message):
        GraphedStep(model, lomo, lambda inputs, targets: None)


def test_forward_and_step_must_alternate_and_an_eager_loss_lets_go_of_its_graph(batch, kernel_on_the_cpu):
    model = tiny_model(dtype=torch.bfloat16)
    graphed = GraphedStep(model, fast(model, lr=0.1), lambda i, t: cross_entropy_loss(model(i), t), warmup_steps=3)
    with pytest.raises(RuntimeError, match="without forward"):
        graphed.step(loss_of(model, batch))
    loss = graphed.forward(*batch)  # (eager: the warm-up)
    with pytest.raises(RuntimeError, match="forward\\(\\) twice"):
        graphed.forward(*batch)
    assert not graphed.step(loss).skipped and graphed.eager_steps == 1
    assert loss.grad_fn is None  # its graph let go: a capture must not meet the eager step's autograd nodes
    viewed = GraphedStep(model, fast(model, lr=0.1), lambda i, t: cross_entropy_loss(model(i), t).view(1)[0])
    with pytest.raises(ValueError, match="returned a view"):
        viewed.forward(*batch)


def test_the_capture_needs_an_eager_step_before_it(kernel_on_the_cpu):
    model = tiny_model(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="warmup_steps=0"):
        GraphedStep(model, fast(model, lr=0.1), None, warmup_steps=0)


# ------------------------------------------------------------------------------------------------------
# On a GPU: the graphs themselves


def gpu_graphed(model, lomo, factor=None):
    scale = factor if factor is not None else 1.0
    return GraphedStep(model, lomo, lambda i, t: cross_entropy_loss(model(i), t) * scale)


@needs_graphs
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_replays_train_bit_for_bit_as_eager_steps(checkpointing, clip):
    models = pair(device="cuda")
    eager, lomo = (fast(m, lr=0.3, clip_grad_norm=clip, checkpointing=checkpointing) for m in models)
    graphed = gpu_graphed(models[1], lomo)
    for lr, batch in zip(lrs(5), batches(5, "cuda")):  # batch and lr change each step: read by the graphs
        a = eager.step(loss_of(models[0], batch), lr)
        loss = graphed.forward(*batch)  # held into the next forward, as train.py's loop holds it
        b = graphed.step(loss, lr)
        assert b.step == a.step and b.loss == a.loss and not b.skipped
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    assert (graphed.eager_steps, graphed.replays) == (1, 4)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name


@needs_graphs
@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_replay_with_a_nonfinite_loss_moves_nothing_and_is_counted(clip):
    (model,) = pair(device="cuda")[:1]
    factor = torch.ones((), device="cuda")  # read by the graph from its address: nan makes the loss nan
    lomo = fast(model, lr=0.3, clip_grad_norm=clip, max_consecutive_skips=2)
    graphed = gpu_graphed(model, lomo, factor)
    batch = batches(1, "cuda")[0]
    for _ in range(2):  # eager, then captured and replayed
        graphed.step(graphed.forward(*batch))
    before = [p.detach().clone() for p in model.parameters()]
    factor.fill_(math.nan)
    bad = graphed.step(graphed.forward(*batch))
    assert graphed.replays == 2 and bad.skipped and "non-finite loss" in bad.reason
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(FloatingPointError, match="2 bad steps in a row"):  # the second bad step in a row:
        graphed.step(graphed.forward(*batch))  # clipped, counted at its skip, between the passes
        lomo.check_previous_step()  # one-pass, counted when checked


@needs_graphs
def test_a_batch_of_another_shape_runs_eagerly_and_trains_the_same():
    models = pair(device="cuda")
    eager, lomo = fast(models[0], lr=0.3), fast(models[1], lr=0.3)
    graphed = gpu_graphed(models[1], lomo)
    steps = batches(4, "cuda")
    steps[2] = (steps[2][0][:, :8], steps[2][1][:, :8])
    for lr, step_batch in zip(lrs(4), steps):
        eager.step(loss_of(models[0], step_batch), lr)
        if step_batch is steps[2]:
            with pytest.warns(UserWarning, match="runs eagerly"):
                graphed.step(graphed.forward(*step_batch), lr)
        else:
            graphed.step(graphed.forward(*step_batch), lr)
    assert (graphed.eager_steps, graphed.replays) == (2, 2)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name


@needs_graphs
def test_a_new_clip_threshold_is_followed_and_clipping_turned_off_is_refused():
    models = pair(device="cuda")
    eager, lomo = (fast(m, lr=0.3, clip_grad_norm=1.0) for m in models)
    graphed = gpu_graphed(models[1], lomo)
    for number, batch in enumerate(batches(4, "cuda")):
        if number == 2:
            eager.clip_grad_norm = lomo.clip_grad_norm = 0.01  # read on the host between the passes: followed
        a, b = eager.step(loss_of(models[0], batch)), graphed.step(graphed.forward(*batch))
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name
    lomo.clip_grad_norm = None  # one pass instead of two: the graphs cannot follow
    with pytest.raises(RuntimeError, match="make a new GraphedStep"):
        graphed.step(graphed.forward(*batch))


@needs_graphs
def test_saved_branch_gradients_beyond_the_budget_are_refused_and_the_next_step_captures_again():
    models = pair(device="cuda")
    eager = fast(models[0], lr=0.3, clip_grad_norm=1.0, checkpointing=True)
    lomo = fast(models[1], lr=0.3, clip_grad_norm=1.0, checkpointing=True, branch_grads_gpu_gib=0)
    graphed = gpu_graphed(models[1], lomo)
    first, refused, *later = batches(4, "cuda")
    eager.step(loss_of(models[0], first))
    graphed.step(graphed.forward(*first))
    before = [p.detach().clone() for p in models[1].parameters()]
    with pytest.raises(ValueError, match="raise it \\(--branch-grads-gpu-gib\\)"):
        graphed.step(graphed.forward(*refused))
    assert all(torch.equal(p, q) for p, q in zip(models[1].parameters(), before)) and lomo.step_count == 1
    # enough now: the next step captures again, from its own forward
    next(e for e in lomo.extensions if isinstance(e, offload.SavedBranchGrads)).gpu_gib = 1.0
    for batch in later:
        eager.step(loss_of(models[0], batch))
        graphed.step(graphed.forward(*batch))
    assert (graphed.eager_steps, graphed.replays) == (1, 2)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name


def two_gpu_run(arguments, cwd, timeout=240):
    """torchrun over two GPUs (NVLink multicast off); the CompletedProcess, or a failure if it outlives `timeout`."""
    root = Path(__file__).resolve().parent.parent
    environment = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                   "NVSHMEM_DISABLE_NVLS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    try:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               *arguments], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"still running after {timeout} s (a teardown waiting on graphs that hold NCCL's communicators?):"
                    f"\n{(error.stderr or b'').decode(errors='replace')[-2000:]}")


needs_two_gpus = pytest.mark.skipif(not (torch.cuda.device_count() >= 2 and fused_update.triton is not None),
                                    reason="tp and dp graphs need two GPUs (NCCL inside the captures)")


@needs_two_gpus
@pytest.mark.parametrize("parallel", [["--tp", "2"], [], ["--tp", "2", "--clip-grad-norm", "1.0"],
                                      ["--clip-grad-norm", "1.0"]])
def test_on_two_gpus_replays_train_as_eager_steps(tmp_path, parallel):
    # Two torchrun processes on NCCL, with and without graphs: the collectives (tp's all-reduces in the blocks and
    # the loss, dp's in the hooks) are captured too, and the logged losses must be the eager run's.
    root = Path(__file__).resolve().parent.parent
    quick = ["--steps", "5", "--eval-every", "5", "--eval-batches", "1", "--sample-tokens", "2", "--batch-size", "2",
             "--seq-len", "32", "--device", "cuda", "--dtype", "bf16", "--activation-checkpointing", *parallel]
    losses = {}
    for graphs in ([], ["--cuda-graph"]):
        out = tmp_path / ("graphs" if graphs else "eager")
        done = two_gpu_run([str(root / "train.py"), *quick, *graphs, "--out", str(out)], tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("4 steps replayed, 1 eager" in done.stdout) == bool(graphs)
        rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        losses[bool(graphs)] = [row.get("loss") for row in rows]
    assert losses[True] == losses[False]


@needs_graphs
def test_released_graphs_are_freed_and_the_next_step_captures_again():
    # release_graphs() (called by train.py and bench.py before the process group goes) frees every GraphedStep's
    # graphs, wherever it is held; a step after it captures again and trains on as the eager steps do.
    import weakref

    import cuda_graph
    models = pair(checkpointing=True, device="cuda")
    eager, lomo = fast(models[0], lr=0.3), fast(models[1], lr=0.3)
    graphed = gpu_graphed(models[1], lomo)
    for number, (lr, batch) in enumerate(zip(lrs(6), batches(6, "cuda"))):
        if number == 3:
            graphs = [weakref.ref(graphed._forward_graph), *map(weakref.ref, graphed._backward_graphs)]
            cuda_graph.release_graphs()
            assert all(graph() is None for graph in graphs)  # gone, not merely unlisted
        eager.step(loss_of(models[0], batch), lr)
        graphed.step(graphed.forward(*batch), lr)
    assert (graphed.eager_steps, graphed.replays) == (1, 5)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name
    held = weakref.ref(graphed)
    del graphed
    assert held() is None  # the registry does not keep a step alive


@needs_two_gpus
def test_on_two_gpus_bench_s_graphed_tp_run_reports_and_exits(tmp_path):
    # A graphed tp = 2 bench.py run can measure its steps and then hang in destroy_process_group while its
    # graphs are still alive in the frame. Two blocks of 7B's shape show it in seconds.
    bench = Path(__file__).resolve().parent.parent / "bench.py"
    done = two_gpu_run([str(bench), "--model", "7B", "--n-layers", "2", "--activation-checkpointing", "--tp", "2",
                        "--modes", "lomo", "--cuda-graph", "--steps", "3", "--worker", "lomo"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    # Replays: the 3 timed steps and the warm-up's second step (its first is eager, the second is captured).
    assert row["tp"] == 2 and row["cuda_graph"] == 3 + 1


@needs_two_gpus
def test_on_two_gpus_an_error_after_the_capture_ends_train_py_with_the_error(tmp_path):
    # An error between replays: its traceback holds the training frames and so the graphs; train.py must still
    # free them and leave, with the error, instead of waiting in the process group's teardown.
    plant = ("import sys, cuda_graph, train\n"
             "step = cuda_graph.GraphedStep.step\n"
             "def failing(self, *args, **kwargs):\n"
             "    if self.replays == 2:\n"
             "        raise RuntimeError('planted after two replays')\n"
             "    return step(self, *args, **kwargs)\n"
             "cuda_graph.GraphedStep.step = failing\n"
             "train.main(sys.argv[1:])\n")
    script = tmp_path / "planted.py"
    script.write_text(plant)
    done = two_gpu_run([str(script), "--steps", "5", "--eval-every", "5", "--eval-batches", "1", "--batch-size", "2",
                        "--seq-len", "32", "--device", "cuda", "--dtype", "bf16", "--activation-checkpointing",
                        "--tp", "2", "--cuda-graph", "--out", str(tmp_path / "run")], tmp_path)
    assert done.returncode != 0 and "planted after two replays" in done.stderr, done.stderr[-3000:]
