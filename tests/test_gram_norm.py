"""Weight-gradient norms from Gram matrices (gram_norm.py) against autograd's gradients in float64; the
layers' gradients outside a norm pass bit for bit (GramNorms on and off); which layers take the Gram way;
LOMO's use of it."""
import copy

import pytest
import torch
import torch.nn as nn

import fast_layers
import gram_norm
import offload
import speedups
from conftest import loss_of, sgd_reference, tiny_model
from gram_norm import GramNorms
from lomo import LOMO
from model import cross_entropy_loss


def model_with(fast, **kwargs):
    """The tiny model, with fast_layers.py's fused w2 (the Gram twin of SwiGLUDown) or without (of nn.Linear)."""
    return fast_layers.apply(tiny_model(**kwargs)) if fast else tiny_model(**kwargs)


def linear(d_in, d_out):
    return nn.Linear(d_in, d_out, bias=False)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast-layers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outside_a_norm_pass_the_layers_are_autograd_bit_for_bit(batch, dtype, fast):
    plain, gram = model_with(fast, dtype=dtype), model_with(fast, dtype=dtype)
    GramNorms(gram)
    losses = [loss_of(model, batch) for model in (plain, gram)]
    assert torch.equal(*losses)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), gram.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast-layers"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_norm_pass_gives_each_linear_weights_gradient_norm_and_no_gradient(batch, checkpointing, fast):
    reference = tiny_model(dtype=torch.float64)
    loss_of(reference, batch).backward()
    expected = {name: p.grad for name, p in reference.named_parameters()}
    model = model_with(fast, dtype=torch.float64)
    layers = GramNorms(model).layers
    if checkpointing:
        offload.apply_checkpointing(model)
    names = {id(p): name for name, p in model.named_parameters()}
    recorded = {}
    with gram_norm.recording(lambda weight, norm: recorded.setdefault(names[id(weight)], []).append(norm)):
        loss_of(model, batch).backward()
    linear = [name for name, module in model.named_modules() if any(module is layer for layer in layers)]
    assert len(linear) == 7 * 2 + 1  # every block's seven, w2 (SwiGLUDown with fast layers) too, and the head
    assert sorted(recorded) == sorted(f"{name}.weight" for name in linear)
    for name, p in model.named_parameters():
        if name in recorded:
            (norm,) = recorded[name]
            assert p.grad is None, name
            assert float(norm) == pytest.approx(float(expected[name].norm()), rel=1e-10), name
        else:  # norms and the embedding: their gradients as usual
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-14)
    assert not gram_norm._input_grams and gram_norm._recorder is None  # nothing outlives the pass


def test_bf16_norm_is_close_to_the_norm_of_the_bf16_gradient():
    torch.manual_seed(0)
    layer = linear(96, 160).to(torch.bfloat16)
    GramNorms(layer)
    x, grad_out = torch.randn(4, 8, 96, dtype=torch.bfloat16), torch.randn(4, 8, 160, dtype=torch.bfloat16)
    layer(x).backward(grad_out)
    expected = layer.weight.grad.double().norm()
    layer.weight.grad = None
    recorded = []
    with gram_norm.recording(lambda weight, norm: recorded.append(norm)):
        layer(x).backward(grad_out)
    assert recorded[0].dtype == torch.float32 and layer.weight.grad is None
    assert float(recorded[0]) == pytest.approx(float(expected), rel=5e-3)


def test_q_k_and_v_share_one_gram_of_their_input(monkeypatch):
    model = fast_layers.apply(tiny_model(n_layers=1))
    GramNorms(model)
    calls = []
    real_gram = gram_norm._gram
    monkeypatch.setattr(gram_norm, "_gram", lambda m: calls.append(m.shape) or real_gram(m))
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with gram_norm.recording(lambda weight, norm: None):
        cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    # Eight Grams of output gradients (head, w2, w1, w3, wo, wq, wk, wv) and five of inputs: the head's,
    # w2's product, ffn_norm's output (w1 and w3 share it), wo's input, attention_norm's (q, k and v share it).
    assert len(calls) == 8 + 5


def test_large_batches_take_the_gradient_way():
    layer = linear(16, 16)  # Grams pay only while tokens * (16 + 16) <= 16 * 16: 8 tokens
    GramNorms(layer)
    for tokens, takes_grams in ((8, True), (9, False)):
        layer.weight.grad = None
        recorded = []
        with gram_norm.recording(lambda weight, norm: recorded.append(norm)):
            layer(torch.randn(tokens, 16)).sum().backward()
        assert bool(recorded) == takes_grams and (layer.weight.grad is None) == takes_grams


@pytest.mark.parametrize("tie", [False, True])
def test_lomo_clipping_with_grams_equals_sgd_after_clip_grad_norm(batch, tie):
    # A head tied to the embedding gets gradient from two uses; GramNorms leaves it the gradient way.
    model, reference = tiny_model(tie_embeddings=tie), tiny_model(tie_embeddings=tie)
    grams = GramNorms(model)
    lomo = LOMO(model, lr=0.3, clip_grad_norm=0.05, extensions=[grams])
    attached = {id(layer) for layer in grams.layers}
    assert id(model.layers[0].attention.wq) in attached and (id(model.output) in attached) != tie
    norms = [lomo.step(loss_of(model, batch)).grad_norm for _ in range(2)]
    expected = sgd_reference(reference, batch, lr=0.3, clip_norm=0.05, steps=2)
    assert min(expected) > 0.05 and norms == pytest.approx(expected, rel=1e-5)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kwargs, dtype", [
    (dict(clip_grad_norm=1.0, gram_norms=False), torch.float32),  # asked not to
    (dict(clip_grad_norm=1.0, clip_grad_value=0.01), torch.float32),  # the norm is of clipped gradients
    (dict(), torch.float16),  # loss scaling: fp16 Grams of scaled gradients could overflow
    (dict(), torch.float32),  # one pass: there is no norm pass to make cheaper
])
def test_speedups_leave_grams_off_where_they_cannot_give_the_norm(batch, kwargs, dtype):
    model = tiny_model(dtype=dtype)
    lomo = speedups.apply(model, lr=0.1, **kwargs)
    assert not any(isinstance(extension, GramNorms) for extension in lomo.extensions)
    assert not any(type(m) in gram_norm.TWINS.values() for m in model.modules())
    lomo.step(loss_of(model, batch))


def test_removing_lomos_hooks_detaches_the_gram_twins(batch):
    model = fast_layers.apply(tiny_model())
    classes = [type(m) for m in model.modules()]
    lomo = LOMO(model, lr=0.1, clip_grad_norm=1.0, extensions=[GramNorms(model)])
    assert type(model.layers[0].feed_forward.w1) is gram_norm.GramLinear
    assert type(model.layers[0].feed_forward.w2) is gram_norm.GramSwiGLUDown
    lomo.remove_hooks()
    assert [type(m) for m in model.modules()] == classes


def test_a_second_gram_norms_on_one_model_is_refused():
    model = tiny_model()
    GramNorms(model)
    with pytest.raises(ValueError, match="already attached"):
        GramNorms(model)


def test_a_layer_called_twice_is_refused_before_any_weight_moves():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = linear(8, 8)

        def forward(self, x):
            return self.layer(self.layer(x))

    torch.manual_seed(0)
    model = Twice()
    before = model.layer.weight.detach().clone()
    lomo = LOMO(model, lr=0.1, clip_grad_norm=1.0, extensions=[GramNorms(model)])
    with pytest.raises(RuntimeError, match="layer.weight is used more than once .* without gram_norm.GramNorms"):
        lomo.step(model(torch.randn(4, 8)).square().sum())
    assert torch.equal(model.layer.weight, before)
    # The way out the message names: the direct norm pass, which gives autograd's norm of the summed gradient.
    torch.manual_seed(0)
    model = Twice()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 8)
    reference(x).square().sum().backward()
    result = LOMO(model, lr=0.1, clip_grad_norm=1.0).step(model(x).square().sum())
    assert not result.skipped
    assert result.grad_norm == pytest.approx(float(reference.layer.weight.grad.norm()), rel=1e-5)


def test_an_overflowing_gram_makes_the_step_skip_not_a_zero_norm():
    # Output gradients of 3e18 make Gram entries past fp32's range; with these signs the squared norm sums
    # to -inf. It must read as non-finite (skip), as the overflowing direct norm does, not clamp to 0.
    x = torch.ones(6, 16)
    scale = torch.zeros(6, 16)
    scale[:, 0] = torch.tensor([1.0, -1.0, -1.0, -1.0, -1.0, 1.0]) * 3.25e18
    for grams in (True, False):
        torch.manual_seed(0)
        layer = linear(16, 16)
        before = layer.weight.detach().clone()
        extensions = [GramNorms(layer)] if grams else []
        result = LOMO(layer, lr=1e-3, clip_grad_norm=1.0, extensions=extensions).step((layer(x) * scale).sum())
        assert result.skipped and "non-finite gradient norm" in result.reason, grams
        assert torch.equal(layer.weight, before)


def test_frozen_layers_and_layers_left_out_keep_the_gradient_way(batch):
    model = fast_layers.apply(tiny_model())
    model.layers[0].attention.wq.weight.requires_grad_(False)
    w2 = model.layers[0].feed_forward.w2
    # Parameters not named as trained are not attached: w2 (one autograd Function with SwiGLU) too.
    layers = GramNorms(model, params=[p for p in model.parameters() if p is not w2.weight]).layers
    assert not any(layer is model.layers[0].attention.wq for layer in layers)
    assert any(layer is model.layers[0].attention.wk for layer in layers)
    assert type(w2) is fast_layers.SwiGLUDown
    recorded = []
    with gram_norm.recording(lambda weight, norm: recorded.append(weight)):
        loss_of(model, batch).backward()
    assert w2.weight.grad is not None and not any(weight is w2.weight for weight in recorded)
    assert model.layers[0].attention.wq.weight.grad is None  # frozen: no gradient either way
    assert model.layers[0].attention.wk.weight.grad is None  # its norm was recorded instead


def test_a_leftover_gradient_is_refused(batch):
    model = tiny_model()
    lomo = LOMO(model, lr=0.1, clip_grad_norm=1.0)
    loss_of(model, batch).backward()  # outside step(): .grad filled, as for a diagnostic
    with pytest.raises(ValueError, match=r"tok_embeddings.weight has a .grad .*zero_grad\(set_to_none=True\)"):
        lomo.step(loss_of(model, batch))
    model.zero_grad(set_to_none=True)
    assert not lomo.step(loss_of(model, batch)).skipped
