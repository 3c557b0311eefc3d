"""Shared fixtures: a tiny seeded LLaMA and a batch, built in the test itself (nothing is downloaded)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import Transformer, cross_entropy_loss, init_weights, model_args  # noqa: E402

VOCAB = 320


def tiny_model(seed=0, dtype=torch.float32, **overrides):
    args = model_args("tiny", **{"vocab_size": VOCAB, "n_layers": 2, "max_seq_len": 64, **overrides})
    return init_weights(Transformer(args), seed).to(dtype)


@pytest.fixture
def batch():
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model, batch):
    inputs, targets = batch
    return cross_entropy_loss(model(inputs), targets)


def sgd_reference(model, batch, lr, weight_decay=0.0, clip_norm=None, clip_value=None, steps=1):
    """The unfused way: full backward, optional clipping, torch.optim.SGD (single-tensor path). Returns
    clip_grad_norm_'s total norm of each step (clip_norm=float("inf") measures it without clipping)."""
    sgd = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=False)
    norms = []
    for _ in range(steps):
        sgd.zero_grad(set_to_none=True)
        loss_of(model, batch).backward()
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
        if clip_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)))
        sgd.step()
    return norms


def inject(model, value, name="layers.0.attention.wq"):
    """Make one element of the gradient reaching one linear layer's output `value` (inf or nan), so that
    its weight's gradient is non-finite whether that norm is taken from the gradient or from Grams."""
    layer = dict(model.named_modules())[name]

    def corrupt(grad):
        grad = grad.clone()
        grad.view(-1)[0] = value
        return grad

    def on_output(module, inputs, output):
        if output.requires_grad:  # (not in a checkpointed block's first forward, which builds no graph)
            output.register_hook(corrupt)  # (a forward hook that returned something would replace the output)

    return layer.register_forward_hook(on_output)
