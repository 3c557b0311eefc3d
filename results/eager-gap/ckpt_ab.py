"""Change 27's A/B: one bench.py worker (one mode, in this process), with the blocks checkpointed by
offload.py's Function ("now") or by torch.utils.checkpoint, non-reentrant, as model.py did before ("before").
Prints bench.py's JSON row with a "variant" field.
Run: python3 results/eager-gap/ckpt_ab.py {now|before} [bench.py arguments] --worker MODE"""
import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from torch.utils.checkpoint import checkpoint  # noqa: E402

import bench  # noqa: E402
import model  # noqa: E402


def torch_checkpoint_blocks(blocks, h, cos, sin, stash=None):
    assert stash is None, "before: no offloading"
    for layer in blocks:
        h = checkpoint(layer, h, cos, sin, use_reentrant=False, checkpointed=True)
    return h


variant = sys.argv.pop(1)
if variant == "before":
    model.run_blocks_checkpointed = torch_checkpoint_blocks
elif variant != "now":
    raise SystemExit(f"variant {variant!r}: now or before")
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    bench.main(sys.argv[1:])
for line in printed.getvalue().splitlines():
    if line.startswith("{"):
        print(json.dumps(dict(variant=variant, **json.loads(line))), flush=True)
