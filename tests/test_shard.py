"""Tensor and data parallelism on the CPU (gloo, spawned processes with a hard timeout), each piece
against the unsharded computation in the same process, and the whole model against one process."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fast_layers
import losses
import offload
import shard
from conftest import VOCAB, tiny_model
from distributed import run_ranks
from gram_norm import GramNorms
from lomo import LOMO, SGD
from model import cross_entropy_loss, init_weights, model_args, Transformer
from offload import run_blocks_checkpointed


def seeded(*shape, seed, dtype, requires_grad=False, scale=1.0):
    tensor = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return tensor.to(dtype).requires_grad_(requires_grad)


def check_close(actual, expected, dtype, what):
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual, expected, **tolerance, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------------
# Each primitive against the unsharded reference, in the same process


def primitives_worker(dtype):
    grid = shard.init_distributed(tp=2)
    tokens, dim, out = 6, 8, 12

    # Column- and row-parallel linear: output, input gradient, this rank's slice of the weight gradient.
    for layer_type, split_dim in ((shard.ColumnParallelLinear, 0), (shard.RowParallelLinear, 1)):
        weight = seeded(out, dim, seed=1, dtype=dtype)
        x = seeded(tokens, dim, seed=2, dtype=dtype, requires_grad=True)
        upstream = seeded(tokens, out, seed=3, dtype=dtype)
        reference_y = F.linear(x, weight.requires_grad_())
        reference_y.backward(upstream)
        layer = layer_type(dim, out, grid).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(shard.shard_of(weight, split_dim, grid))
        x_local = x.detach().clone().requires_grad_()
        # a row-parallel layer receives its input already split along the features
        y = layer(x_local if split_dim == 0 else shard.shard_of(x_local, 1, grid))
        y_full = shard.gather_from_tp(y.detach(), grid) if split_dim == 0 else y.detach()
        upstream_local = shard.shard_of(upstream, 1, grid) if split_dim == 0 else upstream
        y.backward(upstream_local)
        name = layer_type.__name__
        check_close(y_full, reference_y.detach(), dtype, f"{name} output")
        if split_dim == 0:
            check_close(x_local.grad, x.grad, dtype, f"{name} input gradient")
        else:  # the row-parallel layer's input is this rank's feature slice
            check_close(shard.shard_of(x_local.grad, 1, grid), shard.shard_of(x.grad, 1, grid), dtype,
                        f"{name} input gradient")
        check_close(layer.weight.grad, shard.shard_of(weight.grad, split_dim, grid), dtype, f"{name} weight gradient")

    # Vocab-parallel embedding.
    table = seeded(VOCAB, dim, seed=4, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    upstream = seeded(2, 5, dim, seed=6, dtype=dtype)
    F.embedding(ids, table).backward(upstream)
    embedding = shard.VocabParallelEmbedding(VOCAB, dim, grid).to(dtype)
    with torch.no_grad():
        embedding.weight.copy_(shard.shard_of(table.detach(), 0, grid))
    rows = embedding(ids)
    rows.backward(upstream)
    check_close(rows.detach(), F.embedding(ids, table.detach()), dtype, "embedding output")
    check_close(embedding.weight.grad, shard.shard_of(table.grad, 0, grid), dtype, "embedding weight gradient")

    return True


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_primitives_match_unsharded_reference(dtype):
    assert run_ranks(primitives_worker, 2, dtype) == [True, True]


# ----------------------------------------------------------------------------------------------------
# Whole model: tp and dp against one process


def batch_for(step, batch_size):
    tokens = torch.randint(0, VOCAB, (batch_size, 17), generator=torch.Generator().manual_seed(100 + step))
    return tokens[:, :-1], tokens[:, 1:]


def train_steps(model, loss_fn, steps, batch_size, rows, clip, **lomo_kwargs):
    lomo = LOMO(model, lr=0.1, clip_grad_norm=clip, rule=SGD(weight_decay=0.01), **lomo_kwargs)
    step_losses, norms = [], []
    for step in range(steps):
        inputs, targets = batch_for(step, batch_size)
        result = lomo.step(loss_fn(model, inputs[rows], targets[rows]))
        assert not result.skipped and not result.reason, result
        step_losses.append(result.loss)
        norms.append(result.grad_norm)
    return step_losses, norms


def run_args(tie=False):
    # 8 query heads sharing 4 kv heads: grouped-query attention that splits evenly at tp = 2 and 4.
    return model_args("tiny", vocab_size=VOCAB, n_layers=2, max_seq_len=64, n_heads=8, n_kv_heads=4,
                      tie_embeddings=tie)


def parallel_run_worker(tp, clip, steps, checkpointing=False, tie=False):
    grid = shard.init_distributed(tp=tp)
    args = run_args(tie)
    # The sharded model as train.py runs it, against the plain one-process reference: fast layers (the row-parallel
    # fused w2), checkpointing (its inputs in host memory with "offload"), and with clipping the norm pass's
    # extensions: Gram norms (not under dp) and, with checkpointing, the saved branch gradients.
    model = fast_layers.apply(shard.build_model(args, grid, seed=0))
    if checkpointing:
        offload.apply_checkpointing(model, host=checkpointing == "offload")
    extensions = []
    if clip and grid.dp == 1:
        extensions.append(GramNorms(model))
    if clip and checkpointing:
        extensions.append(offload.SavedBranchGrads())
    inputs, targets = batch_for(0, 4)
    logits = shard.gather_from_tp(model(inputs).detach(), grid)
    per_rank = 4 // grid.dp
    rows = slice(grid.dp_rank * per_rank, (grid.dp_rank + 1) * per_rank)

    losses.CHUNK_ELEMENTS = 800  # the fused loss in many vocabulary chunks (12 or 25 rows each)

    def loss_fn(model, inputs, labels):
        return losses.model_loss(model, inputs, labels, grid)

    step_losses, norms = train_steps(model, loss_fn, steps, 4, rows, clip,
                                     tp_group=grid.tp_group, dp_group=grid.dp_group, extensions=extensions)
    weights = {name: shard.gather_full(p, grid) for name, p in model.named_parameters()}
    return dict(logits=logits, losses=step_losses, norms=norms, weights=weights)


def single_process_run(clip, steps, tie=False):
    model = init_weights(Transformer(run_args(tie)), 0)
    inputs, _ = batch_for(0, 4)
    logits = model(inputs).detach()
    # The reference: plain logits and F.cross_entropy, no fusion, no sharding.
    step_losses, norms = train_steps(model, lambda m, i, t: cross_entropy_loss(m(i), t), steps, 4, slice(0, 4), clip)
    return dict(logits=logits, losses=step_losses, norms=norms, weights=dict(model.named_parameters()))


@pytest.mark.parametrize("world_size, tp, clip, checkpointing, tie", [
    (2, 2, None, False, False), (2, 2, 0.5, False, False), (4, 4, None, False, False), (4, 4, 0.5, False, False),
    (2, 1, None, False, False), (2, 1, 0.5, False, False),  # data parallel
    (4, 2, 0.5, True, False),  # dp 2 x tp 2, with activation checkpointing under the two-pass clipping
    (2, 2, 0.5, "offload", False),  # tp 2, the checkpointed inputs in host memory, two passes
    (2, 2, 0.5, False, True),  # tied embedding and head, split alike over the vocabulary
])
def test_parallel_runs_match_one_process(world_size, tp, clip, checkpointing, tie):
    steps = 5
    reference = single_process_run(clip, steps, tie)
    if clip:
        assert all(n > clip for n in reference["norms"])  # clipping is active in the reference
    for rank, result in enumerate(run_ranks(parallel_run_worker, world_size, tp, clip, steps, checkpointing, tie)):
        torch.testing.assert_close(result["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
        assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        assert result["norms"] == pytest.approx(reference["norms"], rel=1e-5)  # also reported in one-pass steps
        for name, value in reference["weights"].items():
            torch.testing.assert_close(result["weights"][name], value.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")


def nan_on_one_replica_worker():
    grid = shard.init_distributed(tp=1)  # two data-parallel replicas
    model = shard.build_model(run_args(), grid, seed=0)
    lomo = LOMO(model, lr=0.1, dp_group=grid.dp_group)
    inputs, targets = batch_for(grid.dp_rank, 2)
    before = [p.detach().clone() for p in model.parameters()]
    loss = losses.model_loss(model, inputs, targets, grid)
    calls = []
    all_reduce = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *args, **kwargs: calls.append(1) or all_reduce(*args, **kwargs)
    try:
        first = lomo.step(loss * float("nan") if grid.dp_rank == 1 else loss)
    finally:
        torch.distributed.all_reduce = all_reduce
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    second = lomo.step(losses.model_loss(model, inputs, targets, grid))  # the replicas still agree: no hang
    return dict(first=(first.skipped, first.reason), unchanged=unchanged, second=second.skipped, calls=len(calls),
                weights=[p.detach().clone() for p in model.parameters()])


def test_a_non_finite_loss_on_one_replica_skips_the_step_on_every_replica():
    ranks = run_ranks(nan_on_one_replica_worker, 2)
    for result in ranks:
        assert result["first"] == (True, "non-finite loss nan") and result["unchanged"] and not result["second"]
        assert result["calls"] == 1  # the loss's average only: a discarded backward exchanges no gradient
    assert all(torch.equal(p, q) for p, q in zip(ranks[0]["weights"], ranks[1]["weights"]))


def local_norm_worker():
    """CoLLiE's LOMO under tp: each rank clips with the norm of its own shards only."""
    grid = shard.init_distributed(tp=2)
    model = shard.build_model(run_args(), grid, seed=0)
    inputs, targets = batch_for(0, 4)
    lomo = LOMO(model, lr=0.1, clip_grad_norm=0.5)  # no tp_group: the norm is not reduced over tp
    norm = lomo.step(losses.model_loss(model, inputs, targets, grid)).grad_norm
    return norm, {name: shard.gather_full(p, grid) for name, p in model.named_parameters()}


def test_per_rank_norm_as_in_collie_clips_wrongly_and_ours_does_not():
    reference = single_process_run(0.5, steps=1)
    (norm0, weights0), (norm1, _) = run_ranks(local_norm_worker, 2)
    # Each rank sees a different, too small norm, and so clips by a wrong factor...
    assert norm0 != pytest.approx(norm1, rel=1e-3)
    assert max(norm0, norm1) < reference["norms"][0] * 0.99
    differs = [not torch.allclose(weights0[n], p.detach(), rtol=1e-5, atol=1e-6)
               for n, p in reference["weights"].items() if n.endswith(("wq.weight", "w1.weight"))]
    assert all(differs)
    # ...while the tp-reduced norm is the single-process one (test_parallel_runs_match_one_process).


def sharded_init_worker():
    grid = shard.init_distributed(tp=2)
    args = model_args("tiny", vocab_size=VOCAB, n_layers=2, max_seq_len=64)
    model = shard.build_model(args, grid, seed=7)
    return {name: (p.detach().clone(), getattr(p, "tensor_parallel_dim", None)) for name, p in model.named_parameters()}


def test_sharded_init_is_exactly_the_slices_of_the_unsharded_init():
    full = dict(tiny_model(seed=7).named_parameters())
    for tp_rank, local in enumerate(run_ranks(sharded_init_worker, 2)):
        for name, (value, split_dim) in local.items():
            assert split_dim == shard.SPLIT_DIM.get(name.split(".")[-2])
            expected = full[name] if split_dim is None else full[name].chunk(2, dim=split_dim)[tp_rank]
            assert torch.equal(value, expected.detach()), name


# ----------------------------------------------------------------------------------------------------
# Communication pattern


def collective_count_worker(checkpointing=False, fast=True):
    grid = shard.init_distributed(tp=2)
    model = shard.build_model(model_args("tiny", vocab_size=VOCAB, n_layers=1, max_seq_len=64), grid, seed=0)
    if fast:
        fast_layers.apply(model)
    block = model.layers[0]
    calls = []
    original = shard.all_reduce

    def counting(tensor, group, op=shard.dist.ReduceOp.SUM):
        calls.append(tuple(tensor.shape))
        return original(tensor, group, op)

    shard.all_reduce = counting
    x = torch.randn(2, 8, 128, requires_grad=True)
    cos, sin = torch.ones(8, 16), torch.zeros(8, 16)
    y = run_blocks_checkpointed([block], x, cos, sin) if checkpointing else block(x, cos, sin)
    forward = list(calls)
    y.sum().backward()
    backward = calls[len(forward):]
    shard.all_reduce = original
    return forward, backward


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast-layers"])
def test_each_block_does_two_all_reduces_forward_and_two_backward(fast):
    for forward, backward in run_ranks(collective_count_worker, 2, False, fast):
        assert forward == [(2, 8, 128)] * 2  # after wo and after w2
        assert backward == [(2, 8, 128)] * 2  # before wq/wk/wv and before w1/w3


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast-layers"])
def test_a_checkpointed_blocks_recomputation_skips_w2s_all_reduce_with_fast_layers(fast):
    # With fast layers the recomputed output is never read (offload.py, fast_layers.py), so w2's matmul and its
    # all-reduce are not done again; the plain model recomputes the whole block.
    for forward, backward in run_ranks(collective_count_worker, 2, True, fast):
        assert forward == [(2, 8, 128)] * 2
        # after wo (and w2, plain) in the recomputation; then the two of backward
        assert backward == [(2, 8, 128)] * (3 if fast else 4)


# ----------------------------------------------------------------------------------------------------
# Pre-flight checks


def test_world_size_not_divisible_by_tp_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3 is not divisible by --tp=2"):
        shard.init_distributed(tp=2, device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "12")  # two nodes of 6: a tp group of 4 would straddle them
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "6")
    with pytest.raises(ValueError, match="--tp=4 does not divide the 6 processes per node"):
        shard.init_distributed(tp=4, device="cpu")


@pytest.mark.parametrize("fields, tp, message", [
    (dict(n_heads=4, n_kv_heads=4), 8, "--tp=8 does not divide n_heads=4"),
    (dict(n_heads=4, n_kv_heads=2), 4, "--tp=4 does not divide n_kv_heads=2"),
    (dict(multiple_of=20), 3, "--tp=3 does not divide n_heads=4"),
    (dict(dim=96, n_heads=6, n_kv_heads=6, multiple_of=2), 6, "--tp=6 does not divide the FFN width=256"),
    (dict(vocab_size=321), 2, "--tp=2 does not divide vocab_size=321.*pad the vocabulary"),
])
def test_splits_that_do_not_divide_are_refused(fields, tp, message):
    args = model_args("tiny", **{"vocab_size": 320, **fields})
    with pytest.raises(ValueError, match=message):
        shard.check_tensor_parallel(args, tp)


def test_vocabulary_padding_rounds_up_to_tp():
    assert [shard.padded_vocab_size(v, 4) for v in (2048, 2049, 32000, 321)] == [2048, 2052, 32000, 324]


def test_more_processes_than_gpus_and_nccl_without_gpu_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="backend nccl asked for, but this machine has no CUDA GPU"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        shard.init_distributed(tp=1, device="cpu", backend="nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="4 processes on this node but only 2 GPUs: use torchrun --nproc_per_node 2"):
        shard.init_distributed(tp=2, device="auto")


def stalled_collective():
    """Rank 1 stalls; rank 0's all-reduce must fail after the timeout, not wait for it."""
    import time
    grid = shard.init_distributed(tp=1, timeout_minutes=0.04)  # 2.4 s
    if grid.rank == 1:
        time.sleep(7)
        return None
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as error:
        return time.monotonic() - started, str(error)
    return time.monotonic() - started, "no error"


def test_a_stalled_rank_ends_the_job_after_the_collective_timeout():
    (waited, message), _ = run_ranks(stalled_collective, 2, timeout=60)
    assert "no error" not in message and 1.5 < waited < 6.5, (waited, message)  # the timeout, not the stall
    with pytest.raises(ValueError, match=r"--collective-timeout-min=0 must be a positive number of minutes"):
        shard.init_distributed(timeout_minutes=0)
