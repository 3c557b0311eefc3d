"""train.py under several processes: dp batches, teardown on error, and a two-node torchrun launch
simulated on one machine (loopback)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import train
from distributed import free_port, run_ranks

ROOT = Path(__file__).resolve().parent.parent
# On the CPU (gloo) also where a GPU is present, so that every process of a test computes the same way.
QUICK = ["--steps", "3", "--eval-every", "3", "--eval-batches", "1", "--sample-tokens", "2", "--lr", "0.1",
         "--device", "cpu"]


def losses(out):
    return [row["loss"] for row in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if "loss" in row]


def train_worker(flags):
    train.main(flags)
    return True


def test_dp2_train_equals_one_process_with_the_global_batch(tmp_path):
    run_ranks(train_worker, 2, QUICK + ["--batch-size", "2", "--out", str(tmp_path / "dp2")])
    train.main(QUICK + ["--batch-size", "4", "--out", str(tmp_path / "one")])
    assert losses(tmp_path / "dp2") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def failing_worker(flags):
    try:
        train.main(flags)
    except ValueError as error:
        return str(error), dist.is_initialized()
    return None, dist.is_initialized()


def test_process_group_is_torn_down_on_error(tmp_path):
    for message, still_initialized in run_ranks(failing_worker, 2, ["--tp", "2", "--seq-len", "999",
                                                                    "--out", str(tmp_path)]):
        assert "--seq-len=999 exceeds" in message and not still_initialized


def test_two_node_launch_simulated_on_loopback(tmp_path):
    port = free_port()
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
         "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(ROOT / "train.py"), "--tp", "2", *QUICK, "--out", str(tmp_path)],
        cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert "processes: 4 = dp 2 x tp 2" in outputs[0]
    assert len(losses(tmp_path)) == 3
