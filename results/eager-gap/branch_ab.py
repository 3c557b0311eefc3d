"""Change 28's A/B on when the saved branch gradients move (one bench.py worker, one mode, in this process):
"now" as offload.py does it; "early": the update pass prefetches the next block's saved gradients when this
block's backward starts, not after its feed-forward's backward; "wait": in the norm pass each block's backward
first makes the main stream wait for the side stream's copies of the blocks before (so the allocator can
reuse their gradients' memory sooner); "early+wait": both; "unbounded": the CPU not held to
offload.COPIES_IN_FLIGHT copies ahead (run 31's "now"); "norecord": the prefetched tensor without record_stream
(run 32's code). Prints bench.py's JSON row with a "variant" field.
Run: python3 results/eager-gap/branch_ab.py {now|early|wait|early+wait|unbounded|norecord} [bench.py args] --worker MODE"""
import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402

import bench  # noqa: E402
import offload  # noqa: E402

variant = sys.argv.pop(1)
if variant not in ("now", "early", "wait", "early+wait", "unbounded", "norecord"):
    raise SystemExit(f"variant {variant!r}: now, early, wait, early+wait, unbounded or norecord")
if variant == "norecord":  # the prefetch as before the review fixes: no record_stream on its target
    @torch.no_grad()
    def prefetch_without_record(self):
        if self.prefetched is not None:
            return
        if self.device.type != "cuda":
            self.prefetched = self.buffer.clone()
            return
        main = torch.cuda.current_stream(self.device)
        target = torch.empty(self.buffer.shape, dtype=self.buffer.dtype, device=self.device)
        stream = self.stash.side_stream(self.device)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            target.copy_(self.buffer, non_blocking=True)
        self.prefetched = target
    offload.HostCopy.prefetch = prefetch_without_record
if variant == "unbounded":  # run 31's "now": no bound on the norm pass's copies in flight
    offload.COPIES_IN_FLIGHT = 10**9
if "early" in variant:
    @contextlib.contextmanager
    def prefetch_at_once(block, ahead):
        for item in ahead:
            item.prefetch()
        yield
    offload._prefetch_after_feed_forward = prefetch_at_once
if "wait" in variant:
    original = offload._branch_record

    def waiting_record(ctx):
        phase, record = original(ctx)
        if phase == "save" and torch.cuda.is_available():
            torch.cuda.current_stream().wait_stream(offload._branch_stash.side_stream(torch.device("cuda", 0)))
        return phase, record
    offload._branch_record = waiting_record
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    bench.main(sys.argv[1:])
for line in printed.getvalue().splitlines():
    if line.startswith("{"):
        print(json.dumps(dict(variant=variant, **json.loads(line))), flush=True)
