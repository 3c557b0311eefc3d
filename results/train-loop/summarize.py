"""Per run: the median and mean tokens/s of steps 6 to the end (from metrics.jsonl), and the summary's.
Run: python3 results/train-loop/summarize.py OUT_FOLDER"""
import json
import statistics
import sys
from pathlib import Path

for folder in sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_dir()):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r and not r.get("summary") and r["step"] > 5]
    summary = next(r for r in rows if r.get("summary"))
    speeds = [r["tokens_per_s"] for r in steps]
    print(f"{folder.name:18s} steps {steps[0]['step']}-{steps[-1]['step']}: median {statistics.median(speeds):8,.0f} "
          f"mean {statistics.mean(speeds):8,.0f} tokens/s; summary {summary['tokens_per_s']:8,.0f}; "
          f"peak {summary.get('peak_memory_gib', 0):.3f} GiB; final loss {steps[-1]['loss']:.4f}")
