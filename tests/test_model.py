"""The LLaMA model: shapes of the real sizes, and properties checked against independent computations
(Meta's complex-number rotary, multi-head attention with repeated kv weights, float64 formulas). And
fast_layers.py against it: each autograd Function bit for bit against autograd through model.py's expression,
and a whole model with fast layers on against one with them off."""
import pytest
import torch
import torch.nn.functional as F

import fast_layers
import offload
from conftest import VOCAB, loss_of, tiny_model
from fast_layers import complex_rotary, swiglu_down
from model import (LLAMA_SIZES, ModelArgs, RMSNorm, Transformer, apply_rotary, cross_entropy_loss, init_parameter,
                   init_weights, model_args, rotary_cos_sin)


@pytest.mark.parametrize("name, hidden, n_params", [
    ("7B", 11008, 6_738_415_616), ("13B", 13824, 13_015_864_320), ("30B", 17920, 32_528_943_616),
    ("65B", 22016, 65_285_660_672), ("llama2-7B", 11008, 6_738_415_616), ("llama2-70B", 28672, 68_976_648_192),
])
def test_real_sizes_have_meta_shapes(name, hidden, n_params):
    # Parameter counts as Meta's checkpoints hold them; built on the meta device, so nothing is allocated.
    args = model_args(name)
    assert args.ffn_hidden_dim == hidden
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_params_json_fields_construct_model_args():
    params = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}
    args = ModelArgs(**params)
    assert (args.head_dim, args.n_kv_heads, args.ffn_hidden_dim) == (128, 32, 11008)
    assert set(LLAMA_SIZES) >= {"tiny", "7B", "13B", "30B", "65B", "llama2-7B", "llama2-13B", "llama2-70B"}


def test_causality_later_tokens_do_not_change_earlier_logits():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (1, 12))
    changed = tokens.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % VOCAB
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_grouped_query_attention_equals_mha_with_repeated_kv_weights():
    gqa = tiny_model(n_heads=4, n_kv_heads=2)
    mha = tiny_model(n_heads=4, n_kv_heads=4)
    state = gqa.state_dict()
    head_dim = gqa.args.head_dim
    for key, value in list(state.items()):
        if key.endswith(("wk.weight", "wv.weight")):
            # kv head h serves query heads 2h and 2h+1: repeat each head's rows twice, in place.
            state[key] = value.view(2, head_dim, -1).repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    tokens = torch.randint(0, VOCAB, (2, 10))
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-6)


def test_rotary_is_metas_complex_rotation_of_adjacent_pairs():
    x = torch.randn(2, 6, 3, 8, dtype=torch.float32)
    cos, sin = rotary_cos_sin(8, 6, theta=10000.0)
    # Meta: view adjacent pairs as complex numbers and multiply by e^{i * pos * theta^(-2i/d)}.
    freqs = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    angles = torch.outer(torch.arange(6, dtype=torch.float64), freqs)
    expected = torch.view_as_real(torch.view_as_complex(x.double().reshape(2, 6, 3, 4, 2))
                                  * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]).flatten(-2)
    torch.testing.assert_close(apply_rotary(x, cos, sin).double(), expected, rtol=1e-5, atol=1e-6)
    # fast_layers.py's complex form is the same rotation.
    torch.testing.assert_close(complex_rotary(x, cos, sin).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rotary_backward_saves_only_the_angles_and_equals_autograd(dtype):
    # fast_layers.complex_rotary's hand-written backward (rotate the gradient back) against autograd through
    # model.apply_rotary, on a non-contiguous gradient as attention's transpose produces.
    x = torch.randn(2, 6, 4, 8, dtype=torch.float64).to(dtype)
    cos, sin = rotary_cos_sin(8, 6, theta=10000.0)
    upstream = torch.randn(2, 4, 6, 8, dtype=torch.float64).to(dtype).transpose(1, 2)
    grads = []
    for rotate in (complex_rotary, apply_rotary):
        leaf = x.clone().requires_grad_()
        rotate(leaf * 1, cos, sin).backward(upstream)
        grads.append(leaf.grad)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[0], grads[1], **tolerance)
    # What autograd keeps for backward: nothing the size of x (only the complex angles, seq x head_dim/2).
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        complex_rotary(x.clone().requires_grad_(), cos, sin)
    assert saved and max(saved) == 6 * 4


def test_rmsnorm_of_bf16_rounds_once_like_metas_fp32_normalization():
    x = torch.randn(4, 64, dtype=torch.float64).mul(3).to(torch.bfloat16)
    norm = RMSNorm(64, eps=1e-5).to(torch.bfloat16)
    meta = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * norm.weight
    assert torch.equal(norm(x), meta)


def test_rotary_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rotary_cos_sin(16, 40, theta=10000.0)

    def score(m, n):
        return float((apply_rotary(q, cos[m:m + 1], sin[m:m + 1]) * apply_rotary(k, cos[n:n + 1], sin[n:n + 1])).sum())

    assert score(5, 2) == pytest.approx(score(35, 32), rel=1e-4, abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_rmsnorm_matches_float64_formula_and_keeps_dtype():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 16)
    expected = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-6, atol=1e-6)
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast-layers"])
@pytest.mark.parametrize("host", [False, True], ids=["device", "host"])
def test_checkpointed_and_plain_blocks_give_identical_gradients(fast, host):
    # Checkpointing on and off (offload.py), with the inputs on the device and in host memory, bit for bit.
    tokens = torch.randint(0, VOCAB, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = fast_layers.apply(tiny_model()) if fast else tiny_model()
        if checkpointing:
            offload.apply_checkpointing(model, host=host)
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
        # Twice over the retained graph, as LOMO's clipping pass does: a recomputed block's backward
        # overwrites what it unpacked (fast_layers.swiglu_down), which the second pass must recompute anew.
        loss.backward(retain_graph=True)
        first = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss.backward()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), first))
        grads.append(first)
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fast_layers_on_and_off_give_the_same_loss_and_gradients(batch, dtype):
    # The loss bit for bit; the gradients equal up to the order in which autograd adds a tensor's gradient
    # terms (a norm's Function sums its own two before the residual's, plain autograd in another order).
    results = []
    for fast in (False, True):
        model = fast_layers.apply(tiny_model(dtype=dtype)) if fast else tiny_model(dtype=dtype)
        loss = loss_of(model, batch)
        loss.backward()
        results.append((loss.detach(), dict(model.named_parameters())))
    (plain_loss, plain), (fast_loss, fast) = results
    assert torch.equal(plain_loss, fast_loss)
    tolerance = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    if dtype == torch.bfloat16:
        tolerance = dict(rtol=1e-2, atol=1e-3)
    for name, p in plain.items():
        torch.testing.assert_close(fast[name].grad, p.grad, **tolerance, msg=lambda m: f"{name}: {m}")


def test_fast_layers_swap_classes_in_place_with_names_unchanged_and_twice_is_once():
    model = tiny_model()
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    fast_layers.apply(model)
    block = model.layers[0]
    assert type(block.attention_norm) is fast_layers.FastRMSNorm and type(model.norm) is fast_layers.FastRMSNorm
    assert type(block.attention) is fast_layers.FastAttention
    assert type(block.feed_forward) is fast_layers.FusedFeedForward
    assert type(block.feed_forward.w2) is fast_layers.SwiGLUDown
    assert [name for name, _ in model.named_parameters()] == names
    assert all(p is q for p, q in zip(model.parameters(), params))
    before = [type(m) for m in model.modules()]
    fast_layers.apply(model)
    assert [type(m) for m in model.modules()] == before
    # A w2 that is neither nn.Linear nor shard's row-parallel layer (another attachment's) is refused.
    other = tiny_model()
    other.layers[0].feed_forward.w2.__class__ = type("OtherLinear", (torch.nn.Linear,), {})
    with pytest.raises(TypeError, match="apply fast_layers after shard.parallelize and before gram_norm.GramNorms"):
        fast_layers.apply(other)


def test_init_is_deterministic_and_depends_only_on_seed_and_name():
    a, b, c = tiny_model(seed=3), tiny_model(seed=3), tiny_model(seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layers[0].attention.wq.weight, c.layers[0].attention.wq.weight)
    # The same parameter's value, computed on its own, is the one the model got.
    alone = init_parameter("layers.1.feed_forward.w2.weight", a.layers[1].feed_forward.w2.weight.shape, a.args, seed=3)
    assert torch.equal(alone, a.layers[1].feed_forward.w2.weight)
    # Documented stds: 0.02, residual projections 0.02 / sqrt(2 * n_layers), norms ones.
    assert float(a.tok_embeddings.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(a.layers[0].feed_forward.w2.weight.detach().std()) == pytest.approx(0.02 / 2, rel=0.05)
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))


@pytest.mark.parametrize("fields, message", [
    (dict(dim=100, n_heads=3), "dim=100 is not divisible by n_heads=3"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=4"),
])
def test_bad_shapes_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**fields)


def test_other_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown model size '8B'"):
        model_args("8B")
    with pytest.raises(ValueError, match="vocab_size=-1"):
        Transformer(model_args("tiny"))
    model = tiny_model()
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_tied_option_shares_one_tensor():
    model = init_weights(Transformer(model_args("tiny", vocab_size=VOCAB, tie_embeddings=True)), 0)
    assert model.output.weight is model.tok_embeddings.weight
    untied = tiny_model()
    assert untied.output.weight is not untied.tok_embeddings.weight


def _swiglu_down_inputs(dtype, hidden=40, dim=24):
    gate, up = (torch.randn(3, 5, hidden, dtype=dtype, generator=torch.Generator().manual_seed(i)) for i in range(2))
    weight = torch.randn(dim, hidden, dtype=dtype, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(3, 5, dim, dtype=dtype, generator=torch.Generator().manual_seed(3))
    return gate, up, weight, grad


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_swiglu_down_gradients_are_autograds_bit_for_bit(dtype, overwrite):
    gate, up, weight, grad = _swiglu_down_inputs(dtype)
    results = []
    for fn in (lambda a, b, w: swiglu_down(a, b, w, overwrite_saved=overwrite),
               lambda a, b, w: F.linear(F.silu(a) * b, w)):
        a, b, w = gate.clone().requires_grad_(), up.clone().requires_grad_(), weight.clone().requires_grad_()
        # Through one more op each, as w1/w3's outputs are: with overwrite_saved=True backward overwrites
        # what it saved, which must not be the leaves whose .grad is compared.
        out = fn(a * 1, b * 1, w)
        out.backward(grad)
        results.append((out, a.grad, b.grad, w.grad))
    for mine, autograds in zip(*results):
        assert torch.equal(mine, autograds)
    # and the saved tensors are the inputs only (the product and silu(gate) are recomputed)
    a, b, w = gate.clone().requires_grad_(), up.clone().requires_grad_(), weight.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu_down(a, b, w, overwrite_saved=overwrite)
    assert len(saved) == 3 and saved[0] is a and saved[1] is b and saved[2] is w


def test_swiglu_down_overwriting_saved_writes_the_gate_gradient_into_the_saved_up():
    gate, up, weight, grad = _swiglu_down_inputs(torch.float32)
    for overwrite in (True, False):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        g, u = a * 1, b * 1
        arrived = []
        g.register_hook(arrived.append)
        swiglu_down(g, u, weight, overwrite_saved=overwrite).backward(grad)
        # overwrite_saved: no new tensor for gate's gradient; otherwise up is left as it was
        assert (arrived[0].data_ptr() == u.data_ptr()) == overwrite
        assert torch.equal(u, up) != overwrite


def test_swiglu_down_without_checkpointing_survives_a_second_backward():
    # LOMO's clipping pass backwards twice over a retained graph: without checkpointing the saved gate and
    # up are read again, so they must come out of the first backward untouched.
    gate, up, weight, grad = _swiglu_down_inputs(torch.float64)
    a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = swiglu_down(a * 1, b * 1, weight)
    first = torch.autograd.grad(out, (a, b), grad, retain_graph=True)
    second = torch.autograd.grad(out, (a, b), grad)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_swiglu_down_without_grad_is_the_same_product_in_place():
    gate, up, weight, _ = _swiglu_down_inputs(torch.bfloat16)
    expected = F.linear(F.silu(gate) * up, weight)
    with torch.no_grad():
        out = swiglu_down(gate.clone(), up, weight)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rmsnorm_gradients_are_autograds_bit_for_bit_and_only_x_is_saved(dtype):
    norm = fast_layers.apply(RMSNorm(40, eps=1e-5).to(dtype))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(40))
    x, grad = (torch.randn(3, 5, 40, dtype=dtype, generator=torch.Generator().manual_seed(i)) for i in range(2))
    results = []
    for fn in (norm, lambda t: F.rms_norm(t, (40,), eps=1e-5) * norm.weight):
        norm.weight.grad = None
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        out.backward(grad)
        results.append((out, leaf.grad, norm.weight.grad))
    for mine, autograds in zip(*results):
        assert torch.equal(mine, autograds)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x.clone().requires_grad_())
    assert [t.shape for t in saved] == [x.shape, norm.weight.shape]
