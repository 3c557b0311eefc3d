"""Change 28's A/B on when the saved branch gradients move (one bench.py worker, one mode, in this process):
"now" as offload.py does it; "early": the update pass prefetches the next block's saved gradients when this
block's backward starts, not after its feed-forward's backward; "wait": in the norm pass each block's backward
first makes the main stream wait for the side stream's copies of the blocks before (so the allocator can
reuse their gradients' memory sooner); "early+wait": both; "unbounded": the CPU not held to
offload.COPIES_IN_FLIGHT copies ahead (run 31's "now"); "norecord": the prefetched tensor without record_stream
(run 32's code); "device": the saved gradients kept on the GPU (no copies at all; +1 GiB for 7B at 4 x 512);
"inflight16": offload.COPIES_IN_FLIGHT = 16 instead of 4 (the CPU may run further ahead in the norm pass).
Prints bench.py's JSON row with a "variant" field and "passes": for each backward call of a step (one for
lomo, two for lomo-clip), the median over the timed steps of its CPU time (the call's host clock) and its GPU
time (CUDA events on either side of the call), and the CPU's time between calls (for lomo-clip: the host's
wait for the norm, i.e. how far the CPU was ahead of the GPU when pass 1 was issued, plus the vectors' work);
"forward": the same from a step's last backward to the next step's first (the next forward and its loss).
A pass whose GPU time is its CPU time (plus a launch or two) ran as fast as the CPU could issue it.
Run: python3 results/eager-gap/branch_ab.py {now|early|wait|early+wait|unbounded|norecord|device|inflight16}
     [bench.py args] --worker MODE"""
import collections
import contextlib
import io
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402

import bench  # noqa: E402
import offload  # noqa: E402

variant = sys.argv.pop(1)
VARIANTS = ("now", "early", "wait", "early+wait", "unbounded", "norecord", "device", "inflight16")
if variant not in VARIANTS:
    raise SystemExit(f"variant {variant!r}: one of {', '.join(VARIANTS)}")
if variant == "norecord":  # the prefetch as before the review fixes: no record_stream on its target
    with_record = offload.HostCopy.prefetch

    def prefetch_without_record(self):
        record_stream = torch.Tensor.record_stream
        torch.Tensor.record_stream = lambda tensor, stream: None
        try:
            with_record(self)
        finally:
            torch.Tensor.record_stream = record_stream
    offload.HostCopy.prefetch = prefetch_without_record
if variant == "unbounded":  # run 31's "now": no bound on the norm pass's copies in flight
    offload.COPIES_IN_FLIGHT = 10**9
if variant == "inflight16":
    offload.COPIES_IN_FLIGHT = 16
if variant == "device":  # no host copy: the gradient itself is kept until the update pass takes it
    class KeptOnDevice:
        def __init__(self, grad):
            self.grad = grad

        def prefetch(self):
            pass

        def fetch(self):
            grad, self.grad = self.grad, None
            return grad
    offload._save_branch_grad = KeptOnDevice
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


def union_ms(intervals):
    """Total time covered by (start, end) intervals, in ms (the trace's times are in us)."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + (end - start), end
        elif end > reach:
            total, reach = total + (end - reach), end
    return total / 1e3


def profile_summary(path, steps):
    """Per step: the CUDA runtime calls that took the most CPU, and for each backward call (GPU side) the main
    stream's busy and idle time and the copies' time and bandwidth."""
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    by_stream = collections.Counter()
    for e in kernels:
        by_stream[e["args"].get("stream")] += e["dur"]
    main_stream = by_stream.most_common(1)[0][0] if by_stream else None
    runtime = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") == "cuda_runtime":
            runtime[e["name"]][0] += e["dur"] / 1e3 / steps
            runtime[e["name"]][1] += 1 / steps
    top = sorted(runtime.items(), key=lambda item: -item[1][0])[:10]
    passes = []
    for a in sorted((e for e in events if e.get("cat") == "gpu_user_annotation" and e["name"] == "backward"),
                    key=lambda e: e["ts"]):
        start, end = a["ts"], a["ts"] + a["dur"]
        inside = [(max(e["ts"], start), min(e["ts"] + e["dur"], end)) for e in kernels
                  if e["args"].get("stream") == main_stream and e["ts"] < end and e["ts"] + e["dur"] > start]
        copies = [e for e in events if e.get("cat") == "gpu_memcpy" and start <= e["ts"] < end]
        copy_ms = sum(e["dur"] for e in copies) / 1e3
        copy_gb = sum(e["args"].get("bytes", 0) for e in copies) / 1e9
        passes.append(dict(gpu_ms=a["dur"] / 1e3, main_busy_ms=union_ms(inside),
                           copies=len(copies), copy_ms=copy_ms, copy_gb_per_s=copy_gb / (copy_ms / 1e3) if copy_ms else None))
    return dict(runtime_ms_per_step={name: [round(ms, 2), round(n, 1)] for name, (ms, n) in top}, passes=passes)


# The timeline: each backward call's host clock and a CUDA event on either side of it.
calls = []  # (cpu start, cpu end, event before, event after)
plain_backward = torch.Tensor.backward


def timed_backward(self, *args, **kwargs):
    before, after = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    before.record()
    started = time.perf_counter()
    with torch.profiler.record_function("backward"):
        plain_backward(self, *args, **kwargs)
    ended = time.perf_counter()
    after.record()
    calls.append((started, ended, before, after))


if torch.cuda.is_available():
    torch.Tensor.backward = timed_backward
steps = bench.parse_args(sys.argv[1:]).steps
# PROFILE=1: torch.profiler over the timed steps (started where bench.py resets the peak after its warm-up);
# the row gets "profile": profile_summary's numbers. The profiler's own CPU cost makes every pass slower.
profiler = None
if os.environ.get("PROFILE"):
    reset_peak = torch.cuda.reset_peak_memory_stats

    def start_profiler(*args):
        global profiler
        reset_peak(*args)
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
        profiler.__enter__()
    torch.cuda.reset_peak_memory_stats = start_profiler
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    bench.main(sys.argv[1:])
torch.cuda.synchronize() if torch.cuda.is_available() else None
row = next(json.loads(line) for line in printed.getvalue().splitlines() if line.startswith("{"))
per_step = len(calls) // (steps + bench.parse_args(sys.argv[1:]).warmup) if calls else 0
if per_step:
    timed = calls[-steps * per_step:]
    passes = []
    for k in range(per_step):
        mine = timed[k::per_step]
        passes.append(dict(cpu_ms=statistics.median(1e3 * (c[1] - c[0]) for c in mine),
                           gpu_ms=statistics.median(c[2].elapsed_time(c[3]) for c in mine)))
        if k + 1 < per_step:
            passes[-1]["cpu_ms_to_next_pass"] = statistics.median(
                1e3 * (timed[i + 1][0] - timed[i][1]) for i in range(k, len(timed) - 1, per_step))
    # From a step's last backward to the next step's first: the forward (and the loss) of the next step.
    gaps = [(timed[i], timed[i + 1]) for i in range(per_step - 1, len(timed) - 1, per_step)]
    row["forward"] = dict(cpu_ms=statistics.median(1e3 * (b[0] - a[1]) for a, b in gaps),
                          gpu_ms=statistics.median(a[3].elapsed_time(b[2]) for a, b in gaps))
    row["passes"] = passes
if profiler is not None:
    profiler.__exit__(None, None, None)
    trace = os.path.join(os.environ.get("OUT", "/tmp"), f"trace-{variant}-{os.getpid()}.json")
    profiler.export_chrome_trace(trace)
    row["profile"] = profile_summary(trace, steps)
print(json.dumps(dict(variant=variant, **row)), flush=True)
