"""The blocks' activation checkpointing (offload.py), with the inputs on the device and in host memory,
against plain autograd, torch's own checkpoint, torch.optim.SGD and clip_grad_norm_; the recomputation that
skips w2 (fast_layers.py) against the same forward without it; and the host buffers' reuse from step to step."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import fast_layers
import offload
from conftest import loss_of, sgd_reference, tiny_model
from lomo import LOMO
from model import cross_entropy_loss, rotary_cos_sin


def offloaded(model):
    return checkpointed(model, host=True)


def checkpointed(model, host):
    """The model as train.py runs it: fast layers (whose recomputation skips w2), each block checkpointed."""
    return offload.apply_checkpointing(fast_layers.apply(model), host=host)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast-layers"])
@pytest.mark.parametrize("host", [False, True], ids=["device", "host"])
def test_gradients_equal_plain_autograd_in_float64(batch, host, fast):
    plain = tiny_model(dtype=torch.float64, n_layers=3)
    recomputed = offload.apply_checkpointing(tiny_model(dtype=torch.float64, n_layers=3), host=host)
    if fast:
        fast_layers.apply(recomputed)
    for model in (plain, recomputed):
        loss_of(model, batch).backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")


def torch_checkpoint_loss(model, batch):
    """The model's loss with each block under torch.utils.checkpoint (non-reentrant), which offload.py's
    Function replaces."""
    inputs, targets = batch
    cos, sin = rotary_cos_sin(model.args.head_dim, inputs.shape[1], model.args.rope_theta)
    h = model.tok_embeddings(inputs)
    for layer in model.layers:
        h = checkpoint(layer, h, cos, sin, use_reentrant=False)
    return cross_entropy_loss(model.output(model.norm(h)), targets)


def test_the_recomputation_skips_only_the_feed_forwards_last_matmul(batch):
    """The recomputed block's output only marks where its backward starts, so w2's forward matmul (2 x tokens x
    hidden x dim FLOPs) is not done again; everything else of the block's forward is."""
    plain, recomputed = fast_layers.apply(tiny_model(n_layers=3)), checkpointed(tiny_model(n_layers=3), False)
    backward_flops = []
    for model in (plain, recomputed):
        loss = loss_of(model, batch)
        with FlopCounterMode(display=False) as flops:
            loss.backward()
        backward_flops.append(flops.get_total_flops())
    args, (batch_size, seq) = plain.args, batch[0].shape
    cos, sin = rotary_cos_sin(args.head_dim, seq, args.rope_theta)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        plain.layers[0](torch.randn(batch_size, seq, args.dim), cos, sin)
    w2_forward = 2 * batch_size * seq * args.ffn_hidden_dim * args.dim
    assert backward_flops[1] - backward_flops[0] == args.n_layers * (flops.get_total_flops() - w2_forward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_forward_inside_recomputing_skips_w2_and_changes_no_gradient(dtype):
    """The skip on and off: one fast block's forward and backward, inside offload.recomputing() and outside, from
    the same input and output gradient. Inside, w2's matmul is not done, the output is h + 0 instead of the
    block's output, and every gradient is the same bit for bit."""
    block = fast_layers.apply(tiny_model(dtype=dtype, n_layers=1)).layers[0]
    args = tiny_model(n_layers=1).args
    cos, sin = rotary_cos_sin(args.head_dim, 8, args.rope_theta)
    x = torch.randn(2, 8, args.dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    upstream = torch.randn(2, 8, args.dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for inside in (False, True):
        block.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        with offload.recomputing() if inside else torch.enable_grad(), FlopCounterMode(display=False) as flops:
            out = block(leaf * 1, cos, sin)
        assert offload.is_recomputing() is False
        out.backward(upstream)
        results.append((flops.get_total_flops(), leaf.grad, [p.grad for p in block.parameters()], out.detach()))
    (flops_outside, x_grad, grads, out), (flops_inside, x_grad_inside, grads_inside, out_inside) = results
    assert flops_outside - flops_inside == 2 * 2 * 8 * args.ffn_hidden_dim * args.dim  # w2's forward only
    assert torch.equal(x_grad, x_grad_inside) and all(torch.equal(a, b) for a, b in zip(grads, grads_inside))
    assert not torch.equal(out, out_inside)  # the stand-in: the value is h, not the block's output


def test_checkpointing_is_attached_and_removed_with_names_unchanged(batch):
    model = tiny_model()
    names = [name for name, _ in model.named_parameters()]
    assert offload.checkpointing_of(model) is None
    assert offload.checkpointing_of(offload.apply_checkpointing(model)) == "device"
    assert offload.checkpointing_of(offload.apply_checkpointing(model, host=True)) == "host"  # the latest holds
    assert [name for name, _ in model.named_parameters()] == names and "run_blocks" not in model.state_dict()
    loss = loss_of(model, batch)
    assert len(block_nodes(loss)) == len(model.layers)
    offload.remove_checkpointing(model)
    assert offload.checkpointing_of(model) is None and not block_nodes(loss_of(model, batch))


@pytest.mark.parametrize("frozen", [("feed_forward.w2",), ("feed_forward",), ("feed_forward", "ffn_norm")])
def test_gradients_with_frozen_feed_forward_parts_equal_plain_autograd_bit_for_bit(batch, frozen):
    """The recomputation stands a zero in for w2's output: with w2, or the whole feed-forward, frozen, the gradients
    of everything else still come out as without checkpointing."""
    models = [fast_layers.apply(tiny_model()), checkpointed(tiny_model(), False)]
    for model in models:
        for name, p in model.named_parameters():
            p.requires_grad_(not any(f".{part}." in name for part in frozen))
        loss_of(model, batch).backward()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert (p.grad is None) == (q.grad is None) == (not p.requires_grad), name
        assert p.grad is None or torch.equal(p.grad, q.grad), name


def test_a_compiled_recomputation_skips_w2s_matmul_too(batch):
    """Compiled blocks: the compiler's graph of the recomputation has one matmul fewer than the first forward's,
    and the gradients are those of the uncompiled blocks."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    forward_graphs = []

    def count_forward(graph_module, example_inputs):
        forward_graphs.append(sum(node.target in matmuls for node in graph_module.graph.nodes))
        return make_boxed_func(graph_module)

    torch._dynamo.reset()
    reference, model = checkpointed(tiny_model(n_layers=1), False), checkpointed(tiny_model(n_layers=1), False)
    backend = aot_autograd(fw_compiler=count_forward, bw_compiler=lambda gm, _: make_boxed_func(gm))
    model.layers[0].compile(backend=backend)
    for m in (reference, model):
        loss_of(m, batch).backward()
    torch._dynamo.reset()
    first_forward, recomputation = forward_graphs  # without grad (no graph kept), then with it
    assert first_forward == 7 and recomputation == 6  # wq, wk, wv, wo, w1, w3, w2; w2 skipped
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_equal_torch_checkpoint_bit_for_bit(batch, dtype):
    reference = fast_layers.apply(tiny_model(dtype=dtype))
    torch_checkpoint_loss(reference, batch).backward()
    for host in (False, True):
        model = checkpointed(tiny_model(dtype=dtype), host)
        loss_of(model, batch).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), (name, host)


def block_nodes(loss):
    """The blocks' backward nodes, the last block's first (a block's input is its node's first input)."""
    node, nodes = loss.grad_fn, []
    while node is not None:
        if type(node).__name__ == "_CheckpointedBlockBackward":
            nodes.append(node)
        elif nodes:
            break
        node = node.next_functions[0][0] if node.next_functions else None
    return nodes


def test_on_the_device_the_saved_input_is_the_block_input_itself(batch):
    # No copy is made: the node of the last block keeps the tensor the block was called with, and backward
    # recomputes from it; autograd's version counter guards it (overwritten after forward, backward refuses).
    model = checkpointed(tiny_model(), host=False)
    inputs = []
    model.layers[-1].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    loss = loss_of(model, batch)
    node = block_nodes(loss)[0]
    kept = node.saved_tensors[2]
    assert kept.data_ptr() == inputs[0].data_ptr() and node.host_copy is None
    with torch.no_grad():
        inputs[0].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # autograd notices
        loss.backward()


@pytest.mark.parametrize("host", [False, True])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_lomo_steps_equal_sgd_with_clipping(batch, clip, host):
    # Two steps: the second reuses the host buffers of the first. With clipping, backward runs twice over
    # one graph and each pass recomputes (and fetches) every input again.
    model, reference = checkpointed(tiny_model(), host), tiny_model()
    lomo = LOMO(model, lr=0.3, clip_grad_norm=clip)
    norms = [lomo.step(loss_of(model, batch)).grad_norm for _ in range(2)]
    expected = sgd_reference(reference, batch, lr=0.3, clip_norm=clip or float("inf"), steps=2)
    assert norms == pytest.approx(expected, rel=1e-5)
    if clip:
        assert min(expected) > clip  # clipping was active
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_host_buffers_are_reused_and_returned_when_the_graph_goes(batch):
    model = offloaded(tiny_model(n_layers=3))
    lomo = LOMO(model, lr=0.1)
    for _ in range(3):
        lomo.step(loss_of(model, batch))
    # One buffer per block input, all back in the stash once each step's graph was freed.
    stash = model.run_blocks.stash
    (buffers,) = stash.free.values()
    assert len(buffers) == 3 and len({b.data_ptr() for b in buffers}) == 3
    loss = loss_of(model, batch)  # a graph alive: its inputs are held, not free
    assert len(stash.free[next(iter(stash.free))]) == 0
    del loss
    assert len(stash.free[next(iter(stash.free))]) == 3


def test_saved_inputs_live_in_the_stash_not_in_the_graph(batch):
    # What backward recomputes from is the host copy: overwrite it and the gradients change.
    model = offloaded(tiny_model())
    last_w2 = model.layers[-1].feed_forward.w2.weight
    loss = loss_of(model, batch)
    loss.backward(retain_graph=True)
    reference, last_w2.grad = last_w2.grad, None
    block_nodes(loss)[0].host_copy.buffer.mul_(2.0)
    loss.backward()
    assert not torch.allclose(last_w2.grad, reference)


@pytest.mark.parametrize("host", [False, True])
def test_frozen_embedding_still_trains_the_blocks_and_nothing_else(batch, host):
    reference = fast_layers.apply(tiny_model())
    reference.tok_embeddings.weight.requires_grad_(False)
    torch_checkpoint_loss(reference, batch).backward()
    model = checkpointed(tiny_model(), host)
    model.tok_embeddings.weight.requires_grad_(False)
    loss = loss_of(model, batch)
    nodes = block_nodes(loss)
    assert len(nodes) == len(model.layers) and nodes[-1].next_functions[0][0] is None  # x takes no gradient
    loss.backward()
    assert model.tok_embeddings.weight.grad is None
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")  # torch's own, about .grad cycles
def test_backward_that_is_not_over_the_whole_graph_raises(batch):
    # The blocks' inner backward would fill every weight's .grad whatever the outer call asked for: refused.
    model = checkpointed(tiny_model(), host=False)
    embedding = model.tok_embeddings.weight
    for backward in (lambda loss: torch.autograd.grad(loss, embedding),
                     lambda loss: loss.backward(inputs=[embedding]),
                     lambda loss: loss.backward(create_graph=True)):
        with pytest.raises(RuntimeError, match="activation checkpointing"):
            backward(loss_of(model, batch))
    assert all(p.grad is None for p in model.layers.parameters())


class _Alive(TorchDispatchMode):
    """Weak references to every tensor the ops make, to add up the memory still alive at a point."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made.extend(weakref.ref(t) for t in (out if isinstance(out, (tuple, list)) else [out])
                         if isinstance(t, torch.Tensor))
        return out

    def bytes(self, model):
        """Bytes of the tensors made and still alive, other than the model's weights (and views of them)."""
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}
        for ref in self.made:
            if (t := ref()) is not None and t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())


@pytest.mark.parametrize("host", [False, True])
def test_after_forward_only_the_block_inputs_are_kept(batch, host):
    # The point of checkpointing: between forward and backward a block keeps its input and nothing else.
    # Without checkpointing every block keeps its activations.
    n_layers = 4
    sizes = {}
    for name, model in (("plain", tiny_model(n_layers=n_layers)),
                        ("checkpointed", checkpointed(tiny_model(n_layers=n_layers), host))):
        with _Alive() as alive:
            loss = loss_of(model, batch)
            sizes[name] = alive.bytes(model)
        del loss
    inputs, _ = batch
    block_input = inputs.numel() * model.args.dim * 4  # fp32
    logits_chunk = inputs.numel() * model.args.vocab_size * 4  # what the loss keeps (at most one chunk's worth)
    # The blocks' inputs (on the CPU the host copies are in the same memory), the final norm's input and
    # its output, the loss's own tensors: not one tensor made inside a block.
    assert sizes["checkpointed"] <= (n_layers + 3) * block_input + logits_chunk
    assert sizes["plain"] > 3 * sizes["checkpointed"]


def test_evaluation_and_generation_do_not_offload(batch):
    model = offloaded(tiny_model())
    with torch.no_grad():
        loss_of(model, batch)
    assert model.run_blocks.stash is None


def test_previous_input_is_prefetched_between_the_feed_forward_and_the_attention_backward(batch, monkeypatch):
    # The prefetched input would add to the feed-forward's backward, the peak of the step: it must start
    # once the gradient reaches the attention's output, i.e. after w2's gradient and before wq's.
    model = offloaded(tiny_model(n_layers=3))
    events = []
    original_prefetch = offload.HostCopy.prefetch

    def logged_prefetch(self):
        if self.prefetched is None:
            events.append("prefetch")
        return original_prefetch(self)

    monkeypatch.setattr(offload.HostCopy, "prefetch", logged_prefetch)
    for i, layer in enumerate(model.layers):
        for name, param in (("w2", layer.feed_forward.w2.weight), ("wq", layer.attention.wq.weight)):
            param.register_post_accumulate_grad_hook(lambda p, tag=f"{name}{i}": events.append(tag))
    loss_of(model, batch).backward()
    # Block 2 runs backward first: its own input is fetched (a prefetch at fetch time), then its feed-forward,
    # then block 1's input is prefetched, then its attention; and so on down to block 0.
    assert events == ["prefetch", "w22", "prefetch", "wq2", "w21", "prefetch", "wq1", "w20", "wq0"]
