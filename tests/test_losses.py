"""The fused head + cross-entropy (losses.py) against autograd through the plain head and
F.cross_entropy: float64 to 1e-12 (only the order of the sums differs), bf16 to bf16's precision,
split into uneven vocabulary chunks, with ignored labels, twice over a retained graph, and split over
two tensor-parallel ranks."""
import pytest
import torch
import torch.nn.functional as F

import losses
import shard
from conftest import VOCAB, tiny_model
from distributed import run_ranks
from model import cross_entropy_loss, token_losses


def case(dtype, tokens=10, dim=16, vocab=VOCAB, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(tokens, dim, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[[1, 4]] = -100
    upstream = torch.rand(tokens, generator=g, dtype=torch.float64).float()
    return hidden, weight, labels, upstream


def reference(hidden, weight, labels, upstream, chunk_rows=None):
    """Autograd through the plain head and cross-entropy; `chunk_rows`: the logits from matmuls over that many
    vocabulary rows each, as the fused loss makes them (a bf16 matmul's rounding may depend on its shape)."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rows = chunk_rows or len(weight)
    logits = torch.cat([hidden @ weight[start:start + rows].T for start in range(0, len(weight), rows)], dim=1)
    per_token = F.cross_entropy(logits.float() if hidden.dtype != torch.float64 else logits,
                                labels, ignore_index=-100, reduction="none")
    per_token.backward(upstream.to(per_token.dtype))
    return per_token.detach(), hidden.grad, weight.grad


def fused(hidden, weight, labels, upstream, chunk_elements, passes=1):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    per_token = losses.fused_token_losses(hidden, weight, labels, chunk_elements=chunk_elements)
    for remaining in reversed(range(passes)):
        hidden.grad = weight.grad = None
        per_token.backward(upstream.to(per_token.dtype), retain_graph=remaining > 0)
    return per_token.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_rows", [VOCAB, 97, 1])  # one chunk; uneven chunks (320 = 3 x 97 + 29); one row each
def test_fused_loss_matches_autograd_in_float64(chunk_rows):
    hidden, weight, labels, upstream = case(torch.float64)
    expected = reference(hidden, weight, labels, upstream)
    actual = fused(hidden, weight, labels, upstream, chunk_elements=chunk_rows * len(labels))
    for name, a, e in zip(("losses", "hidden gradient", "weight gradient"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert float(actual[0][[1, 4]].abs().sum()) == 0.0  # ignored labels add nothing
    assert float(actual[2].abs().sum()) > 0


def test_fused_loss_in_bf16_is_the_unfused_bf16_loss():
    hidden, weight, labels, upstream = case(torch.bfloat16)
    expected = reference(hidden, weight, labels, upstream, chunk_rows=97)
    actual = fused(hidden, weight, labels, upstream, chunk_elements=97 * len(labels))
    assert actual[0].dtype == torch.float32 and actual[1].dtype == actual[2].dtype == torch.bfloat16
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 after
    for a, e in zip(actual[1:], expected[1:]):
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-2)


def test_second_backward_over_a_retained_graph_gives_the_same_gradients():
    # LOMO's clipping runs backward twice; the saved hidden states and log-sum-exp must survive pass 1.
    hidden, weight, labels, upstream = case(torch.float32)
    once = fused(hidden, weight, labels, upstream, chunk_elements=97 * len(labels))
    twice = fused(hidden, weight, labels, upstream, chunk_elements=97 * len(labels), passes=2)
    for a, b in zip(once, twice):
        assert torch.equal(a, b)


def test_huge_logits_do_not_overflow_the_online_log_sum_exp():
    hidden, weight, labels, upstream = case(torch.float32, scale=1e3)  # logits in the thousands
    expected = reference(hidden.double(), weight.double(), labels, upstream)
    actual = fused(hidden, weight, labels, upstream, chunk_elements=50 * len(labels))
    assert torch.isfinite(actual[0]).all()
    torch.testing.assert_close(actual[0].double(), expected[0], rtol=1e-4, atol=1e-2)


def test_model_loss_is_the_loss_of_the_models_logits(batch):
    inputs, targets = batch
    targets = targets.clone()
    targets[0, :3] = -100
    model = tiny_model()
    expected = cross_entropy_loss(model(inputs), targets)
    torch.testing.assert_close(losses.model_loss(model, inputs, targets), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses.model_token_losses(model, inputs, targets), token_losses(model(inputs), targets),
                               rtol=1e-6, atol=1e-6)


def tensor_parallel_worker():
    grid = shard.init_distributed(tp=2)
    hidden, weight, labels, upstream = case(torch.float64, scale=30.0)
    expected = reference(hidden, weight, labels, upstream)
    local_weight = shard.shard_of(weight, 0, grid).clone().requires_grad_()
    hidden = hidden.clone().requires_grad_()
    per_token = losses.fused_token_losses(shard.copy_to_tp(hidden, grid.tp_group), local_weight, labels,
                                          vocab_start=grid.tp_rank * local_weight.shape[0], tp_group=grid.tp_group,
                                          chunk_elements=70 * len(labels))  # 160 rows a rank: 70, 70, 20
    per_token.backward(upstream.double())
    torch.testing.assert_close(per_token.detach(), expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, expected[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local_weight.grad, shard.shard_of(expected[2], 0, grid), rtol=1e-12, atol=1e-12)
    return True


def test_fused_loss_split_over_two_tensor_parallel_ranks_is_the_unsplit_loss():
    assert run_ranks(tensor_parallel_worker, 2) == [True, True]


def test_a_chunk_of_all_minus_inf_logits_is_not_nan():
    # fp16 overflow can make every logit of one chunk -inf for a row; the other chunks hold finite ones.
    hidden = torch.tensor([[1e20, 1.0]])
    weight = torch.tensor([[-1e20, 0.0]] * 3 + [[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])  # 3 rows -inf, 3 finite
    labels = torch.tensor([4])
    expected = F.cross_entropy(hidden @ weight.T, labels, reduction="none")
    assert torch.isinf(hidden @ weight.T).sum() == 3 and torch.isfinite(expected).all()
    actual = losses.fused_token_losses(hidden, weight, labels, chunk_elements=3)  # chunks of 3 rows
    torch.testing.assert_close(actual, expected)
