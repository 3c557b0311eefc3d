"""The set-up the scripts in this folder share: a 7B model with random bf16 weights on one GPU, activation
checkpointing on, LOMO at a tiny learning rate, and one 4 x 512 batch of random tokens."""
import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)
import torch  # noqa: E402

import model as M  # noqa: E402
from bench import random_model  # noqa: E402
from lomo import LOMO  # noqa: E402
from losses import model_loss  # noqa: E402
from shard import init_distributed  # noqa: E402

LR = 1e-6
model = random_model(M.model_args("7B"), init_distributed(1, "cuda"), torch.bfloat16)
model.activation_checkpointing = True
tokens = torch.randint(0, 32000, (4, 513), device="cuda")
x, y = tokens[:, :-1], tokens[:, 1:]
lomo = LOMO(model, lr=LR)


def loss():
    return model_loss(model, x, y)
