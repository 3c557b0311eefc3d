"""LOMO's clipping with checkpointed blocks: the update pass takes each block's input-gradient chain from the
norm pass (the extension offload.SavedBranchGrads). With it on against off, the same step computing everything
twice (bit for bit), torch.optim.SGD after clip_grad_norm_, the FLOPs it must save, the gradients kept on the
device (up to `gpu_gib`) and the host buffers it must give back."""
import weakref

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fast_layers
import losses
import offload
import shard
from conftest import inject, loss_of, sgd_reference, tiny_model
from distributed import run_ranks
from gram_norm import GramNorms
from lomo import LOMO
from model import model_args
from offload import SavedBranchGrads


def checkpointed(model, offload_inputs):
    """As train.py runs it: fast layers, each block checkpointed, its input on the device or in host memory."""
    return offload.apply_checkpointing(fast_layers.apply(model), host=offload_inputs)


def clipped_steps(model, batch, steps=2, loss_fn=loss_of, reuse=True, gpu_gib=1.0, **lomo_kwargs):
    """(the norms, the weights after `steps` clipped LOMO steps, the FLOPs they took), with Gram norms as train.py
    takes them, and with the saved branch gradients (reuse) or without."""
    extensions = [GramNorms(model)] + ([SavedBranchGrads(gpu_gib)] if reuse else [])
    lomo = LOMO(model, lr=0.3, clip_grad_norm=0.05, extensions=extensions, **lomo_kwargs)
    with FlopCounterMode(display=False) as flops:
        norms = [lomo.step(loss_fn(model, batch)).grad_norm for _ in range(steps)]
    return norms, [p.detach().clone() for p in model.parameters()], flops.get_total_flops()


def branch_input_grad_flops(args, tokens):
    """FLOPs of the input gradients of wq, wk, wv, w1 and w3 in one backward: 2 x tokens x d_in x d_out each."""
    kv = args.n_kv_heads * args.head_dim
    return 2 * tokens * args.dim * (args.n_heads * args.head_dim + 2 * kv + 2 * args.ffn_hidden_dim) * args.n_layers


def gib_of_gradients(count, batch, dtype):
    """gpu_gib that keeps exactly `count` of the tiny model's saved gradients on the device."""
    return count * batch[0].numel() * tiny_model(n_layers=1).args.dim * dtype.itemsize / 2**30


@pytest.fixture
def fresh_stash(monkeypatch):
    """A pool of host buffers for this test alone (the process's pool holds what earlier tests left)."""
    stash = offload.HostStash()
    monkeypatch.setattr(offload, "_branch_stash", stash)
    return stash


# Where the 6 saved gradients (3 blocks x 2) wait: all on the device (the default budget, 1 GiB), all in host
# memory, or the first 4 on the device and the last 2 in host memory.
PLACEMENTS = {"device": (None, 0), "host": (0, 6), "split": (4, 2)}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("offload_inputs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reusing_the_norm_pass_gradients_changes_no_bit_and_saves_their_flops(batch, dtype, offload_inputs,
                                                                              placement, fresh_stash):
    kept, copied = PLACEMENTS[placement]
    budget = {} if kept is None else {"gpu_gib": gib_of_gradients(kept, batch, dtype)}
    reused = clipped_steps(checkpointed(tiny_model(dtype=dtype, n_layers=3), offload_inputs), batch, **budget)
    recomputed = clipped_steps(checkpointed(tiny_model(dtype=dtype, n_layers=3), offload_inputs), batch,
                               reuse=False)
    assert reused[0] == recomputed[0]
    assert all(torch.equal(a, b) for a, b in zip(reused[1], recomputed[1]))
    # Exactly the five branch layers' input gradients, once per step (in the update pass), are not computed.
    args, tokens = tiny_model(n_layers=3).args, batch[0].numel()
    assert recomputed[2] - reused[2] == 2 * branch_input_grad_flops(args, tokens)
    # The gradients beyond the budget went through host buffers, and only those.
    assert sum(len(buffers) for buffers in fresh_stash.free.values()) == copied


def test_clipped_steps_equal_sgd_after_clip_grad_norm_in_float64(batch):
    model = checkpointed(tiny_model(dtype=torch.float64, n_layers=3), offload_inputs=True)
    norms, weights, _ = clipped_steps(model, batch)
    reference = tiny_model(dtype=torch.float64, n_layers=3)
    expected = sgd_reference(reference, batch, lr=0.3, clip_norm=0.05, steps=2)
    assert min(expected) > 0.05  # clipping was active
    assert norms == pytest.approx(expected, rel=1e-12)
    for (name, p), q in zip(reference.named_parameters(), weights):
        torch.testing.assert_close(q, p.detach(), rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("budget", [{}, {"gpu_gib": 0}], ids=["on-device", "host"])
@pytest.mark.parametrize("frozen", [
    ("tok_embeddings",),  # the first block's input takes no gradient
    ("attention_norm",),  # every block's first branch input takes its gradient through the block input alone
    ("layers.1.",),  # a whole block
    # In block 0 only attention_norm and the feed-forward train: in the update pass, with attention_norm's
    # output cut, nothing below ffn_norm's output takes a gradient, so its saved gradient is not used.
    ("tok_embeddings", "layers.0.attention.", "layers.0.ffn_norm"),
], ids=lambda names: "+".join(names))
def test_frozen_parameters_change_no_bit(batch, frozen, budget):
    results = []
    for reuse in (True, False):
        model = checkpointed(tiny_model(n_layers=3), offload_inputs=False)
        for name, p in model.named_parameters():
            if any(name.startswith(f) or (f == "attention_norm" and f in name) for f in frozen):
                p.requires_grad_(False)
        results.append(clipped_steps(model, batch, reuse=reuse, **budget))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert results[0][2] < results[1][2]


def test_a_branch_input_that_runs_twice_is_refused(batch):
    # Its one saved gradient could not stand for two uses: the norm pass raises, before any weight moves.
    model = checkpointed(tiny_model(), offload_inputs=False)
    block = model.layers[0]
    plain = type(block).forward

    def forward_with_a_second_use(x, cos, sin, cache=None):
        return plain(block, x, cos, sin, cache) + 0.5 * block.attention_norm(x)

    block.forward = forward_with_a_second_use
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"attention_norm ran twice .* drop offload.SavedBranchGrads"):
        LOMO(model, lr=0.3, clip_grad_norm=0.05, extensions=[SavedBranchGrads()]).step(loss_of(model, batch))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_host_buffers_go_back_after_each_step_and_after_a_skipped_one(batch, fresh_stash):
    n_layers = 3
    model = checkpointed(tiny_model(n_layers=n_layers), offload_inputs=False)
    lomo = LOMO(model, lr=0.3, clip_grad_norm=0.05, extensions=[SavedBranchGrads(gpu_gib=0)])
    key = ((*batch[0].shape, model.args.dim), torch.float32, torch.device("cpu"))
    for _ in range(2):
        lomo.step(loss_of(model, batch))
        # Two gradients per block, in buffers that the next step reuses.
        buffers = fresh_stash.free[key]
        assert len(buffers) == 2 * n_layers and len({b.data_ptr() for b in buffers}) == 2 * n_layers
    handle = inject(model, float("inf"))  # pass 1's norm is not finite: no pass 2 takes the saved gradients
    loss = loss_of(model, batch)
    assert lomo.step(loss).skipped
    assert len(fresh_stash.free[key]) == 2 * n_layers  # back at once, though the caller still holds the graph
    handle.remove()


def test_gradients_kept_on_the_device_are_let_go_once_used_and_after_a_skipped_step(batch):
    alive, at_first_block = [], []

    class Watched(SavedBranchGrads):
        """Weak references to the saved gradients once the norm pass has made them all."""

        def watch(self):
            if not alive:
                alive.extend(weakref.ref(copy.grad) for record in self.records for copy in record.copies.values())

        def during(self, kind, lomo):
            if kind == "update":
                self.watch()
            return super().during(kind, lomo)

        def end_step(self):
            self.watch()  # a skipped step: no update pass
            super().end_step()

    model = checkpointed(tiny_model(n_layers=3), offload_inputs=False)

    def first_block_recomputed(module, inputs, output):
        if alive:  # the update pass
            at_first_block.append([ref() is not None for ref in alive])

    model.layers[0].register_forward_hook(first_block_recomputed)
    saved = Watched()
    lomo = LOMO(model, lr=0.3, clip_grad_norm=0.05, extensions=[saved])
    loss = loss_of(model, batch)
    lomo.step(loss)
    # Saved from the last block down; by the time the update pass reaches block 0, blocks 2 and 1 have used
    # theirs and let them go.
    assert len(alive) == 2 * 3 and at_first_block == [[False] * 4 + [True] * 2]
    assert not any(ref() is not None for ref in alive)  # all gone, though the caller still holds the loss
    assert saved.records == [] and saved.saved_bytes() == 0
    alive.clear()
    handle = inject(model, float("inf"))  # no update pass takes them: they are let go all the same
    loss = loss_of(model, batch)
    assert lomo.step(loss).skipped
    assert len(alive) == 2 * 3 and not any(ref() is not None for ref in alive)
    handle.remove()


def test_saved_bytes_counts_the_gradients_kept_on_the_device(batch):
    # What a captured norm pass keeps until the update pass (cuda_graph.py reads it): here after the norm pass of
    # a step whose update pass never comes (a non-finite norm), before end_step lets them go.
    counted = []

    class Counted(SavedBranchGrads):
        def end_step(self):
            counted.append(self.saved_bytes())
            super().end_step()

    model = checkpointed(tiny_model(n_layers=3), offload_inputs=False)
    lomo = LOMO(model, lr=0.3, clip_grad_norm=0.05, extensions=[Counted(gpu_gib=gib_of_gradients(4, batch,
                                                                                              torch.float32))])
    handle = inject(model, float("inf"))
    assert lomo.step(loss_of(model, batch)).skipped
    handle.remove()
    assert counted == [4 * batch[0].numel() * model.args.dim * 4]  # 4 of 6 on the device, 2 in host memory


def test_a_kept_gradient_changed_in_place_is_refused(batch):
    # The saved gradient is the tensor the norm's backward receives: one that wrote into it would change
    # what the update pass starts from. Host copies are taken before; the kept ones are checked at the fetch.
    class ScaleInPlace(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad.mul_(1.0)  # the same values, but written in place

    results = []
    for budget in (0, 1.0):
        model = checkpointed(tiny_model(n_layers=2), offload_inputs=False)
        for block in model.layers:  # the norm's own last op writes into the gradient it receives
            norm = block.attention_norm
            norm.forward = lambda x, plain=norm.forward: ScaleInPlace.apply(plain(x))
        if budget:
            with pytest.raises(RuntimeError, match="changed in place after it was saved.*gpu_gib=0"):
                clipped_steps(model, batch, steps=1, gpu_gib=budget)
        else:
            results = clipped_steps(model, batch, steps=1, gpu_gib=budget)
    assert results and results[0][0] > 0


def test_buffers_are_kept_for_the_latest_batch_shape_only(fresh_stash):
    # Batches padded to their longest sequence change shape from step to step: pinned buffers of every shape
    # seen would pile up in host memory.
    model = checkpointed(tiny_model(n_layers=2), offload_inputs=False)
    lomo = LOMO(model, lr=0.01, clip_grad_norm=0.05, extensions=[SavedBranchGrads(gpu_gib=0)])
    for length in (8, 12, 16, 12):
        tokens = torch.randint(0, 320, (2, length + 1), generator=torch.Generator().manual_seed(length))
        lomo.step(loss_of(model, (tokens[:, :-1], tokens[:, 1:])))
    assert list(fresh_stash.free) == [((2, 12, model.args.dim), torch.float32, torch.device("cpu"))]
    assert len(fresh_stash.free[next(iter(fresh_stash.free))]) == 2 * 2


def test_outside_lomo_backward_neither_saves_nor_reuses(batch):
    model = checkpointed(tiny_model(), offload_inputs=False)
    loss = loss_of(model, batch)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    saved = SavedBranchGrads()
    with saved.during("update", None):  # nothing was saved: the block backward computes everything
        loss.backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), first))


@pytest.mark.parametrize("gpu_gib", [-1.0, float("nan"), float("inf")])
def test_a_budget_that_is_not_a_finite_number_of_gib_is_refused(gpu_gib):
    with pytest.raises(ValueError, match=rf"SavedBranchGrads\(gpu_gib={gpu_gib}\): give a finite number"):
        SavedBranchGrads(gpu_gib)
    with pytest.raises(ValueError, match="kind='keep'"):
        SavedBranchGrads().during("keep", None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, from importing its compiler
def test_a_compiled_block_counts_as_compiled_however_it_was_compiled():
    # Module.compile() and torch.compile(module) (a wrapper): neither can be cut by a hook at recomputation.
    block = tiny_model(n_layers=1).layers[0]
    assert not offload._is_compiled(block)
    assert offload._is_compiled(torch.compile(block))
    block.compile()
    assert offload._is_compiled(block)


def tensor_parallel_worker(offload_inputs):
    grid = shard.init_distributed(tp=2, device="cpu")  # gloo, also where one GPU is present
    args = model_args("tiny", vocab_size=320, n_layers=2, max_seq_len=64, n_heads=8, n_kv_heads=4)
    tokens = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(1))
    batch = tokens[:, :-1], tokens[:, 1:]
    all_reduces = []
    counted = shard.all_reduce

    def counting(tensor, group, **kwargs):
        all_reduces.append(tensor.shape)
        return counted(tensor, group, **kwargs)

    shard.all_reduce = counting
    results = []
    # With the block inputs in host memory the saved gradients go there too; else they stay on the device.
    budget = {"gpu_gib": 0} if offload_inputs else {}
    for reuse in (True, False):
        model = checkpointed(shard.build_model(args, grid, seed=0), offload_inputs)
        all_reduces.clear()
        norms, _, _ = clipped_steps(model, batch, steps=1, loss_fn=lambda m, b: losses.model_loss(m, *b, grid),
                                    tp_group=grid.tp_group, reuse=reuse, **budget)
        results.append((norms, [shard.gather_full(p, grid) for p in model.parameters()], len(all_reduces)))
    return results


@pytest.mark.parametrize("offload_inputs", [False, True])
def test_tensor_parallel_steps_change_no_bit_and_skip_the_branch_all_reduces(offload_inputs):
    for reused, recomputed in run_ranks(tensor_parallel_worker, 2, offload_inputs):
        assert reused[0] == recomputed[0]
        assert all(torch.equal(a, b) for a, b in zip(reused[1], recomputed[1]))
        assert min(reused[0]) > 0.05  # clipping was active
        # The update pass skips the backward all-reduce at each branch input: two per block.
        assert recomputed[2] - reused[2] == 2 * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("offload_inputs", [False, True])
def test_on_a_gpu_the_steps_change_no_bit(batch, offload_inputs, placement, fresh_stash):
    # bf16 on CUDA: the gradients kept on the GPU; the side stream's copies to and from pinned host memory, the
    # prefetch; Gram norms.
    batch = tuple(t.cuda() for t in batch)
    kept, copied = PLACEMENTS[placement]
    budget = {} if kept is None else {"gpu_gib": gib_of_gradients(kept, batch, torch.bfloat16)}
    results = [clipped_steps(checkpointed(tiny_model(dtype=torch.bfloat16, n_layers=3).cuda(), offload_inputs),
                             batch, steps=3, reuse=reuse, **budget) for reuse in (True, False, False)]
    assert results[1][0] == results[2][0]  # the kernels are deterministic here: otherwise no bit can be asked
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    args, tokens = tiny_model(n_layers=3).args, batch[0].numel()
    assert results[1][2] - results[0][2] == 3 * branch_input_grad_flops(args, tokens)  # the path was taken
    buffers = [b for pool in fresh_stash.free.values() for b in pool]
    assert len(buffers) == copied and all(b.is_pinned() for b in buffers)
