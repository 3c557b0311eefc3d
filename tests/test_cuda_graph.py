"""cuda_graph.py: a LOMO step captured as one CUDA graph trains exactly as the eager step.

On the CPU: LOMO's side of it (begin_graphed_step, device_pass, end_graphed_step, run eagerly with the kernel's
contract in PyTorch ops) against LOMO.step, and every refusal. On a GPU: the graph itself, replayed, against
eager steps bit for bit, with an lr that changes each step, a non-finite loss, and a batch of another shape."""
import math

import pytest
import torch

import fused_update
from conftest import loss_of, tiny_model
from cuda_graph import GraphedStep, obstacle
from lomo import LOMO, learning_rate
from model import cross_entropy_loss

needs_graphs = pytest.mark.skipif(not (torch.cuda.is_available() and fused_update.triton is not None),
                                  reason="CUDA graphs and the kernel need a GPU and Triton")


def reference_kernel(param, grad, alpha, slots, apply):
    """fused_update's kernel in PyTorch ops (as in test_fused_update.py), counting its calls."""
    reference_kernel.calls += 1
    updated = (param.float() + alpha * grad.float()).to(param.dtype)
    param.copy_(torch.where(apply.bool(), updated, param))
    slots[0] += grad.float().square().sum()


@pytest.fixture
def kernel_on_the_cpu(monkeypatch):
    monkeypatch.setattr(fused_update, "available", lambda param, grad: True)
    monkeypatch.setattr(fused_update, "update_and_sum_squares", reference_kernel)
    reference_kernel.calls = 0


def lrs(steps):
    return [learning_rate(s, 0.3, steps, warmup_steps=2, schedule="cosine") for s in range(1, steps + 1)]


@pytest.mark.parametrize("vectors", ["frozen", "trained"])
def test_the_device_pass_trains_as_step(batch, kernel_on_the_cpu, vectors):
    models = [tiny_model(dtype=torch.bfloat16) for _ in range(2)]
    for model in models:
        for p in model.parameters():
            p.requires_grad_(p.dim() > 1 or vectors == "trained")
    eager, graphed = (LOMO(m, lr=0.3) for m in models)
    assert obstacle(models[1], graphed) is None
    trained = sum(1 for p in models[1].parameters() if p.requires_grad)
    for lr in lrs(4):
        a = eager.step(loss_of(models[0], batch), lr)
        result = graphed.begin_graphed_step(torch.device("cpu"), lr)
        reference_kernel.calls = 0
        loss, norm = graphed.device_pass(loss_of(models[1], batch))
        assert reference_kernel.calls == trained  # the vectors too: one kernel each, alpha read from the device
        b = graphed.end_graphed_step(result, loss, norm)
        assert b.step == a.step and b.lr == lr and b.loss == a.loss and not b.skipped
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
    assert all(p.grad is None for p in models[1].parameters())
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        if vectors == "frozen" or p.dim() > 1:
            assert torch.equal(p, q), name
        else:  # the eager step's vectors take PyTorch's add, the kernel's contract here its own ops
            torch.testing.assert_close(p, q, rtol=0, atol=2 ** -7), name


def test_a_device_pass_with_a_nonfinite_loss_moves_nothing_and_is_counted(batch, kernel_on_the_cpu):
    model = tiny_model(dtype=torch.bfloat16)
    lomo = LOMO(model, lr=0.3, max_consecutive_skips=2)
    before = [p.detach().clone() for p in model.parameters()]
    result = lomo.begin_graphed_step(torch.device("cpu"))
    result = lomo.end_graphed_step(result, *lomo.device_pass(loss_of(model, batch) * math.nan))
    assert result.skipped and "non-finite loss" in result.reason
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    lomo.begin_graphed_step(torch.device("cpu"))  # counts the skip first (as step() does)
    assert lomo.consecutive_skips == 1


@pytest.mark.parametrize("setting, message", [
    (dict(clip_grad_norm=1.0), "one-pass step"),
    (dict(check_finite=False), "no-finite-checks"),
    (dict(fused_kernel=False), "no-fused-kernel"),
    (dict(weight_decay=0.1), "no --weight-decay"),
    (dict(clip_grad_value=1.0), "--clip-grad-value"),
    ("fp16", "one-pass step"),  # fp16 takes the norm pass for its loss scaling
    ("offload", "offload-checkpoints"),
    ("cpu", "GPU with Triton"),
])
def test_what_a_graph_cannot_hold_is_refused_with_the_way_around(monkeypatch, setting, message):
    if setting != "cpu":
        monkeypatch.setattr(fused_update, "available", lambda param, grad: True)
    model = tiny_model(dtype=torch.float16 if setting == "fp16" else torch.bfloat16)
    if setting == "offload":
        model.activation_checkpointing = model.offload_checkpoints = True
    lomo = LOMO(model, lr=0.1, **(setting if isinstance(setting, dict) else {}))
    with pytest.raises(ValueError, match=message):
        GraphedStep(model, lomo, lambda inputs, targets: None)


def test_forward_and_step_must_alternate(batch, kernel_on_the_cpu):
    model = tiny_model(dtype=torch.bfloat16)
    graphed = GraphedStep(model, LOMO(model, lr=0.1), lambda i, t: cross_entropy_loss(model(i), t), warmup_steps=3)
    with pytest.raises(RuntimeError, match="without forward"):
        graphed.step(loss_of(model, batch))
    loss = graphed.forward(*batch)  # (eager: the warm-up)
    with pytest.raises(RuntimeError, match="forward\\(\\) twice"):
        graphed.forward(*batch)
    assert not graphed.step(loss).skipped and graphed.eager_steps == 1
    assert loss.grad_fn is None  # its graph let go: a capture must not meet the eager step's autograd nodes


def test_the_capture_needs_an_eager_step_before_it(kernel_on_the_cpu):
    model = tiny_model(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="warmup_steps=0"):
        GraphedStep(model, LOMO(model, lr=0.1), None, warmup_steps=0)


# ------------------------------------------------------------------------------------------------------
# On a GPU: the graph itself


def cuda_batch(batch):
    return tuple(t.cuda() for t in batch)


def gpu_pair(checkpointing):
    models = [tiny_model(dtype=torch.bfloat16).cuda() for _ in range(2)]
    for model in models:
        model.activation_checkpointing = checkpointing
    return models


@needs_graphs
@pytest.mark.parametrize("checkpointing", [False, True])
def test_replays_train_bit_for_bit_as_eager_steps(batch, checkpointing):
    inputs, targets = cuda_batch(batch)
    models = gpu_pair(checkpointing)
    eager, lomo = LOMO(models[0], lr=0.3), LOMO(models[1], lr=0.3)
    graphed = GraphedStep(models[1], lomo, lambda i, t: cross_entropy_loss(models[1](i), t))
    for lr in lrs(5):  # the lr changes each step: the graph reads it from the device
        a = eager.step(loss_of(models[0], (inputs, targets)), lr)
        loss = graphed.forward(inputs, targets)  # held into the next forward, as train.py's loop holds it
        b = graphed.step(loss, lr)
        assert b.step == a.step and b.loss == a.loss and not b.skipped
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    assert (graphed.eager_steps, graphed.replays) == (1, 4)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name


@needs_graphs
def test_a_replay_with_a_nonfinite_loss_moves_nothing_and_is_counted(batch):
    inputs, targets = cuda_batch(batch)
    (model,) = gpu_pair(False)[:1]
    factor = torch.ones((), device="cuda")  # read by the graph from its address: nan makes the loss nan
    lomo = LOMO(model, lr=0.3, max_consecutive_skips=2)
    graphed = GraphedStep(model, lomo, lambda i, t: cross_entropy_loss(model(i), t) * factor)
    for _ in range(2):  # eager, then captured and replayed
        graphed.step(graphed.forward(inputs, targets))
    before = [p.detach().clone() for p in model.parameters()]
    factor.fill_(math.nan)
    bad = graphed.step(graphed.forward(inputs, targets))
    assert graphed.replays == 2 and bad.skipped and "non-finite loss" in bad.reason
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(FloatingPointError, match="2 bad steps in a row"):
        graphed.step(graphed.forward(inputs, targets))
        lomo.check_previous_step()


@needs_graphs
def test_a_batch_of_another_shape_runs_eagerly_and_trains_the_same(batch):
    inputs, targets = cuda_batch(batch)
    models = gpu_pair(False)
    eager, lomo = LOMO(models[0], lr=0.3), LOMO(models[1], lr=0.3)
    graphed = GraphedStep(models[1], lomo, lambda i, t: cross_entropy_loss(models[1](i), t))
    shorter = (inputs[:, :8], targets[:, :8])
    for step_batch in [(inputs, targets), (inputs, targets), shorter, (inputs, targets)]:
        eager.step(loss_of(models[0], step_batch))
        if step_batch is shorter:
            with pytest.warns(UserWarning, match="runs eagerly"):
                graphed.step(graphed.forward(*step_batch))
        else:
            graphed.step(graphed.forward(*step_batch))
    assert (graphed.eager_steps, graphed.replays) == (2, 2)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name


@pytest.mark.skipif(not (torch.cuda.device_count() >= 2 and fused_update.triton is not None),
                    reason="tp and dp graphs need two GPUs (NCCL inside the captures)")
@pytest.mark.parametrize("parallel", [["--tp", "2"], []])  # tp = 2, dp = 2
def test_on_two_gpus_replays_train_as_eager_steps(tmp_path, parallel):
    # Two torchrun processes on NCCL, with and without graphs: the collectives (tp's all-reduces in the blocks and
    # the loss, dp's in the hooks) are captured too, and the logged losses must be the eager run's.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    environment = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                   "NVSHMEM_DISABLE_NVLS": "1", "OMP_NUM_THREADS": "1"}
    quick = ["--steps", "5", "--eval-every", "5", "--eval-batches", "1", "--sample-tokens", "2", "--batch-size", "2",
             "--seq-len", "32", "--device", "cuda", "--dtype", "bf16", "--activation-checkpointing", *parallel]
    losses = {}
    for graphs in ([], ["--cuda-graph"]):
        out = tmp_path / ("graphs" if graphs else "eager")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(root / "train.py"), *quick, *graphs, "--out", str(out)],
                              cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[bool(graphs)] = [row.get("loss") for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert losses[True] == losses[False]
