"""lomo.py's update-rule seam: a new rule, written here in a few lines, plugs into LOMO without touching lomo.py,
and trains exactly as a hand-written step of the same rule: in one process bit for bit, clipped within the
rounding of clip_grad_norm_'s other order, at tp = 2 on gloo within fp32 tolerance, and its state goes through
state_dict so that a resumed run continues bit for bit."""
import math

import pytest
import torch

import losses
import shard
from conftest import VOCAB, loss_of, tiny_model
from distributed import run_ranks
from lomo import LOMO
from model import cross_entropy_loss, init_weights, model_args, Transformer


class DecayingScaledSGD:
    """SGD with a learning-rate multiplier per parameter (by name) and, per parameter, a 1 / sqrt(t) decay over
    its own updates: p <- p - lr * multiplier / sqrt(t) * g. t is state, which state_dict carries."""
    chunkable = False  # its counter is per update of a whole parameter, not per fp32 piece of one

    def __init__(self, model, multiplier):
        self.names = {p: name for name, p in model.named_parameters()}
        self.multiplier, self.updates = multiplier, {}

    def begin(self, param):  # (once per parameter per step: the number of this update)
        name = self.names[param]
        self.updates[name] = self.updates.get(name, 0) + 1
        return self.multiplier(name) / math.sqrt(self.updates[name])

    def update(self, param, p32, g32, lr):
        p32.add_(g32, alpha=-lr * self.begin(param))

    def axpy_alpha(self, lr):
        return None  # one alpha per parameter, not one for all: no fused kernel, no CUDA graphs

    def state_dict(self):
        return dict(updates=dict(self.updates))

    def load_state_dict(self, state):
        self.updates = dict(state["updates"])


def multiplier(name):
    return 2.0 if "feed_forward" in name else 0.5 if name.endswith("norm.weight") else 1.0


def hand_written_steps(model, batches, lr, clip=None):
    """The rule by hand: a full backward, clip_grad_norm_, then each parameter's update."""
    counts = {}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_of(model, batch).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        with torch.no_grad():
            for name, p in model.named_parameters():
                counts[name] = counts.get(name, 0) + 1
                p.add_(p.grad, alpha=-lr * (multiplier(name) / math.sqrt(counts[name])))  # the rule's order


def batches(steps, size=2):
    tokens = [torch.randint(0, VOCAB, (size, 17), generator=torch.Generator().manual_seed(20 + s))
              for s in range(steps)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


@pytest.mark.parametrize("clip", [None, 0.05])
def test_a_new_rule_trains_as_its_hand_written_step(clip):
    model, reference = tiny_model(), tiny_model()
    lomo = LOMO(model, lr=0.3, clip_grad_norm=clip, rule=DecayingScaledSGD(model, multiplier))
    for batch in batches(3):
        assert not lomo.step(loss_of(model, batch)).skipped
    hand_written_steps(reference, batches(3), lr=0.3, clip=clip)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if clip is None:  # the same two operations on the same gradient
            assert torch.equal(p, q), name
        else:  # the clip factor: LOMO's global norm sums in another order than clip_grad_norm_ (fp32 rounding)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7), name
    assert lomo.rule.updates == {name: 3 for name, _ in model.named_parameters()}


def test_a_rule_s_state_goes_through_state_dict():
    data = batches(4)
    model, resumed = tiny_model(), tiny_model()
    lomo = LOMO(model, lr=0.3, rule=DecayingScaledSGD(model, multiplier))
    for batch in data[:2]:
        lomo.step(loss_of(model, batch))
    state = lomo.state_dict()
    resumed.load_state_dict(model.state_dict())
    again = LOMO(resumed, lr=0.3, rule=DecayingScaledSGD(resumed, multiplier))
    again.load_state_dict(state)
    for batch in data[2:]:
        lomo.step(loss_of(model, batch))
        again.step(loss_of(resumed, batch))
    assert again.rule.updates == lomo.rule.updates
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


def run_args():
    return model_args("tiny", vocab_size=VOCAB, n_layers=2, max_seq_len=64, n_heads=8, n_kv_heads=4)


def tensor_parallel_worker(steps):
    grid = shard.init_distributed(tp=2)
    model = shard.build_model(run_args(), grid, seed=0)  # every parameter keeps its unsharded name
    lomo = LOMO(model, lr=0.3, clip_grad_norm=0.05, tp_group=grid.tp_group,
                rule=DecayingScaledSGD(model, multiplier))
    for inputs, targets in batches(steps, size=4):
        assert not lomo.step(losses.model_loss(model, inputs, targets, grid)).skipped
    return {name: shard.gather_full(p, grid) for name, p in model.named_parameters()}


def test_a_new_rule_at_tp_2_matches_the_hand_written_step_in_one_process():
    reference = init_weights(Transformer(run_args()), 0)
    counts = {}
    for inputs, targets in batches(3, size=4):
        reference.zero_grad(set_to_none=True)
        cross_entropy_loss(reference(inputs), targets).backward()
        assert float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)) > 0.05  # clipping is active
        with torch.no_grad():
            for name, p in reference.named_parameters():
                counts[name] = counts.get(name, 0) + 1
                p.add_(p.grad, alpha=-0.3 * multiplier(name) / math.sqrt(counts[name]))
    for rank, weights in enumerate(run_ranks(tensor_parallel_worker, 2, 3)):
        for name, value in reference.named_parameters():
            torch.testing.assert_close(weights[name], value.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")
