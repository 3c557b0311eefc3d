"""One GPU runs tensor-parallel rank 0's shard of the model with collectives that do nothing: the compute part
of a tp step, without its all-reduces. An upper bound on tp's tokens per GPU per second, measured where only one
GPU is lent; it is not a tp run, and the README's tp numbers never come from it.

    python results/tp-emulated/emulate_tp.py --tp 2 --model 7B --dtype bf16 --activation-checkpointing \
        --batch-size 4 --seq-len 512 --steps 30 --modes lomo [--cuda-graph] [--out rows.jsonl]

bench.py's own measurement (`bench.run_mode`) of one mode, in this process, with `shard.init_distributed` swapped
for a grid of `--tp` ranks on torch's fake process group (torch.testing's FakeStore: every collective returns at
once, its tensor unchanged). Each rank's shards have their real shapes, so every matmul, norm, attention and
update kernel runs as on rank 0 of a real tp group; the all-reduces (per block 2 forward, 2 more in the
checkpointed recompute, 2 backward) and their waits are what is missing. The row gets `emulated_tp: true`.
Every token is looked up in rank 0's rows of the embedding (their index modulo the shard's rows): a fake all-reduce
would leave the others' embeddings at zero.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
import bench  # noqa: E402
import shard  # noqa: E402


def fake_grid(tp, device="auto", backend="auto"):
    """Rank 0 of a tp group of `tp` ranks whose collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(0)
    return shard.Grid(rank=0, world_size=tp, tp=tp, dp=1, tp_rank=0, tp_group=dist.group.WORLD,
                      device=torch.device("cuda", 0) if on_gpu else torch.device("cpu"))


def main(argv=None):
    args = bench.parse_args(argv)
    if args.tp < 2 or "," in args.modes:
        raise SystemExit(f"emulate_tp.py runs one mode (got --modes {args.modes}) at --tp 2 or more (got {args.tp})")
    if args.tiny:
        args.dtype, args.seq_len, args.batch_size = "fp32", min(args.seq_len, 64), min(args.batch_size, 2)
    shard.init_distributed = fake_grid
    embed = shard.VocabParallelEmbedding.forward
    # Every token's row inside rank 0's shard: with the fake all-reduce the other ranks' rows would arrive as
    # zero vectors (run 1: the eager runs stopped on a NaN gradient norm). The same kernels run either way.
    shard.VocabParallelEmbedding.forward = lambda self, tokens: embed(self, tokens % self.weight.shape[0])
    bench.report(dict(bench.run_mode(args, args.modes), emulated_tp=True), args.out)


if __name__ == "__main__":
    main()
