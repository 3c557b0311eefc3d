"""adalomo.py through lomo.py's rule seam: one step in float64 against a line-by-line transcription of the paper's
Algorithm 1 (written with its row and column sums and the explicit V, not the file's means), tp = 2 and 4 and
dp = 2 against one process (weights and factors), an fp16 overflow that moves nothing, bit-exact resume, and a
state that loads at another tp. train.py --optimizer adalomo's resume: tests/test_resume.py."""
import pytest
import torch

import losses
import shard
from adalomo import AdaLomo
from conftest import VOCAB, inject, loss_of, tiny_model
from distributed import run_ranks
from lomo import LOMO, SGD, DynamicLossScaler
from model import cross_entropy_loss, init_weights, model_args, Transformer


def batches(steps, size=2, seed=30):
    tokens = [torch.randint(0, VOCAB, (size, 17), generator=torch.Generator().manual_seed(seed + s))
              for s in range(steps)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def algorithm_1(model, data, lr, eps1=1e-30, eps2=1e-3, d=1.0, decay=-0.8, weight_decay=0.0):
    """The paper's Algorithm 1, transcribed: a full backward, then for each parameter at step t
    R = b R + (1 - b) (G^2 + eps1 1 1^T) 1_m, C = b C + (1 - b) 1_n^T (G^2 + eps1 1 1^T), V = R C / (1_n^T R),
    U = G / sqrt(V), U = U / max(1, RMS(U) / d), eta = lr max(eps2, RMS(theta)), theta = (1 - eta wd) theta - eta U.
    A vector keeps v = b v + (1 - b)(G^2 + eps1)."""
    R, C, v = {}, {}, {}
    for t, batch in enumerate(data, start=1):
        model.zero_grad(set_to_none=True)
        loss_of(model, batch).backward()
        beta = 1 - t ** decay
        with torch.no_grad():
            for name, theta in model.named_parameters():
                G = theta.grad
                if G.dim() == 2:
                    n, m = G.shape
                    R[name] = beta * R.get(name, 0) + (1 - beta) * ((G ** 2 + eps1) @ torch.ones(m, dtype=G.dtype))
                    C[name] = beta * C.get(name, 0) + (1 - beta) * (torch.ones(n, dtype=G.dtype) @ (G ** 2 + eps1))
                    V = torch.outer(R[name], C[name]) / R[name].sum()
                else:
                    v[name] = beta * v.get(name, 0) + (1 - beta) * (G ** 2 + eps1)
                    V = v[name]
                U = G / V.sqrt()
                U = U / max(1.0, float(U.pow(2).mean().sqrt()) / d)
                eta = lr * max(eps2, float(theta.pow(2).mean().sqrt()))
                theta.copy_((1 - eta * weight_decay) * theta - eta * U)
    return R, C, v


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_steps_in_float64_equal_algorithm_1(weight_decay):
    data = batches(3)
    model, reference = tiny_model(dtype=torch.float64), tiny_model(dtype=torch.float64)
    lomo = LOMO(model, lr=0.05, rule=AdaLomo(model, weight_decay=weight_decay))
    for batch in data:
        assert not lomo.step(loss_of(model, batch)).skipped
    R, C, v = algorithm_1(reference, data, lr=0.05, weight_decay=weight_decay)
    moved = 0
    for (name, p), q, p0 in zip(model.named_parameters(), reference.parameters(), tiny_model().parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")
        moved += not torch.equal(p.float(), p0)
        state = lomo.rule.state[name]
        assert state["step"] == 3
        if p.dim() == 2:  # the file keeps means, the paper sums: R / n_cols and C / n_rows
            torch.testing.assert_close(state["row"], R[name] / p.shape[1], rtol=1e-12, atol=0)
            torch.testing.assert_close(state["col"], C[name] / p.shape[0], rtol=1e-12, atol=0)
        else:
            torch.testing.assert_close(state["v"], v[name], rtol=1e-12, atol=0)
    assert moved == len(list(model.parameters()))


def test_each_update_is_normalised_and_relative_to_the_weights():
    """After the first step (beta2 = 0) every matrix moved by lr * max(eps2, RMS(W)) * RMS(U), RMS(U) <= d."""
    model, before = tiny_model(), tiny_model()
    lomo = LOMO(model, lr=1e-2, rule=AdaLomo(model, clip_threshold=0.5))
    lomo.step(loss_of(model, batches(1)[0]))
    for (name, p), p0 in zip(model.named_parameters(), before.parameters()):
        p, p0 = p.detach(), p0.detach()
        step_rms = float((p - p0).pow(2).mean().sqrt())
        size = 1e-2 * max(1e-3, float(p0.pow(2).mean().sqrt()))
        assert step_rms <= size * 0.5 * (1 + 1e-4), name


def test_its_state_is_o_m_plus_n():
    model = tiny_model()
    lomo = LOMO(model, lr=1e-3, rule=AdaLomo(model))
    lomo.step(loss_of(model, batches(1)[0]))
    state_numbers = sum(t.numel() for s in lomo.rule.state.values() for k, t in s.items() if k != "step")
    assert state_numbers == sum(sum(p.shape) if p.dim() == 2 else p.numel() for p in model.parameters())


def test_an_fp16_overflow_moves_no_weight_and_no_factor():
    data = batches(2)
    model = tiny_model(dtype=torch.float16)
    lomo = LOMO(model, lr=1e-2, rule=AdaLomo(model), loss_scaler=DynamicLossScaler(init_scale=2.0**8))
    assert not lomo.step(loss_of(model, data[0])).skipped
    weights = [p.detach().clone() for p in model.parameters()]
    factors = {name: {k: (v if k == "step" else v.clone()) for k, v in state.items()}
               for name, state in lomo.rule.state.items()}
    handle = inject(model, float("inf"))
    result = lomo.step(loss_of(model, data[1]))
    handle.remove()
    assert result.skipped and "overflow" in result.reason
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))
    for name, state in lomo.rule.state.items():
        assert state["step"] == factors[name]["step"] == 1
        assert all(torch.equal(state[k], factors[name][k]) for k in state if k != "step")
    assert not lomo.step(loss_of(model, data[1])).skipped  # the next step at half the scale trains
    assert all(state["step"] == 2 for state in lomo.rule.state.values())


def test_resume_is_bit_exact_and_another_rule_s_state_is_refused():
    data = batches(4)
    model, resumed = tiny_model(), tiny_model()
    lomo = LOMO(model, lr=1e-2, rule=AdaLomo(model, weight_decay=0.01))
    for batch in data[:2]:
        lomo.step(loss_of(model, batch))
    state = lomo.state_dict()
    resumed.load_state_dict(model.state_dict())
    again = LOMO(resumed, lr=1e-2, rule=AdaLomo(resumed, weight_decay=0.01))
    again.load_state_dict(state)
    for batch in data[2:]:
        lomo.step(loss_of(model, batch))
        again.step(loss_of(resumed, batch))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    with pytest.raises(ValueError, match="another rule"):
        LOMO(tiny_model(), lr=0.1, rule=SGD()).load_state_dict(state)
    plain = LOMO(tiny_model(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="no AdaLomo factors"):
        again.load_state_dict(plain)


@pytest.mark.parametrize("settings, message", [
    (dict(eps=(0.0, 1e-3)), "eps1=0.0"), (dict(clip_threshold=-1.0), "clip_threshold=-1.0"),
    (dict(decay_rate=0.8), "decay_rate=0.8"), (dict(weight_decay=float("nan")), "weight_decay=nan"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        AdaLomo(tiny_model(), **settings)


# Tensor and data parallelism against one process.

def run_args():
    return model_args("tiny", vocab_size=VOCAB, n_layers=2, max_seq_len=64, n_heads=8, n_kv_heads=4)


def parallel_worker(tp, steps, start=None):
    """steps of AdaLomo at this tp (dp the rest), from `start` (full weights and a state_dict) if given."""
    grid = shard.init_distributed(tp=tp)
    model = shard.build_model(run_args(), grid, seed=0)
    rule = AdaLomo(model, weight_decay=0.01, tp_group=grid.tp_group)
    lomo = LOMO(model, lr=2e-2, tp_group=grid.tp_group, dp_group=grid.dp_group, rule=rule)
    first = 0
    if start is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(shard.shard_of(start["weights"][name], getattr(p, "tensor_parallel_dim", None), grid))
        lomo.load_state_dict(start["lomo"])
        first = lomo.step_count
    per_rank = 4 // grid.dp
    rows = slice(grid.dp_rank * per_rank, (grid.dp_rank + 1) * per_rank)
    for inputs, targets in batches(steps, size=4, seed=30 + first):
        assert not lomo.step(losses.model_loss(model, inputs[rows], targets[rows], grid)).skipped
    return dict(weights={name: shard.gather_full(p, grid) for name, p in model.named_parameters()},
                lomo=lomo.state_dict())


def one_process(steps):
    model = init_weights(Transformer(run_args()), 0)
    lomo = LOMO(model, lr=2e-2, rule=AdaLomo(model, weight_decay=0.01))
    for inputs, targets in batches(steps, size=4):
        assert not lomo.step(cross_entropy_loss(model(inputs), targets)).skipped
    return dict(weights={name: p.detach() for name, p in model.named_parameters()}, lomo=lomo.state_dict())


def assert_same_run(result, reference, what):
    for name, value in reference["weights"].items():
        torch.testing.assert_close(result["weights"][name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what}, {name}: {m}")
    factors, expected = result["lomo"]["rule"]["state"], reference["lomo"]["rule"]["state"]
    assert factors.keys() == expected.keys()
    for name, state in expected.items():
        assert factors[name]["step"] == state["step"]
        for key in state:
            if key != "step":  # factors hold means of squares: relative agreement
                torch.testing.assert_close(factors[name][key], state[key], rtol=1e-5, atol=0,
                                           msg=lambda m: f"{what}, {name} {key}: {m}")


@pytest.mark.parametrize("world_size, tp", [(2, 2), (4, 4), (2, 1)])
def test_tp_and_dp_match_one_process_in_weights_and_factors(world_size, tp):
    reference = one_process(5)
    for rank, result in enumerate(run_ranks(parallel_worker, world_size, tp, 5)):
        assert_same_run(result, reference, f"rank {rank} of tp {tp} x dp {world_size // tp}")


def test_a_state_saved_at_tp_2_continues_at_tp_1_and_tp_4():
    reference = one_process(5)
    saved = run_ranks(parallel_worker, 2, 2, 3)[0]  # 3 steps at tp 2; the state holds whole factors
    assert saved["lomo"]["step_count"] == 3
    for world_size in (1, 4):
        for rank, result in enumerate(run_ranks(parallel_worker, world_size, world_size, 2, saved)):
            assert_same_run(result, reference, f"rank {rank} of tp {world_size}, resumed from tp 2")


def test_a_sharded_model_without_its_tp_group_is_refused():
    model = tiny_model()
    model.layers[0].attention.wq.weight.tensor_parallel_dim = 0  # as shard.build_model marks a split
    with pytest.raises(ValueError, match="layers.0.attention.wq.weight is split .* pass AdaLomo\\(model, tp_group"):
        AdaLomo(model)
