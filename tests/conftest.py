"""Shared fixtures: a tiny seeded LLaMA and a batch, built in the test itself (nothing is downloaded)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import Transformer, init_weights, model_args  # noqa: E402

VOCAB = 320


def tiny_model(seed=0, dtype=torch.float32, **overrides):
    args = model_args("tiny", **{"vocab_size": VOCAB, "n_layers": 2, "max_seq_len": 64, **overrides})
    return init_weights(Transformer(args), seed).to(dtype)


@pytest.fixture
def batch():
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]
