"""Compare training runs by their metrics.jsonl: do the loss curves agree, and how fast was each?

    python compare_runs.py out/tp1 out/tp2 out/dp2

The first run is the reference. For each run: the largest absolute and relative difference of its
per-step training loss from the reference's, the final validation loss, the median tokens per GPU per
second (steps after the first five, which include warm-up), and the peak GPU memory when logged.
"""
import json
import statistics
import sys
from pathlib import Path


def read_rows(folder):
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass folders that train.py wrote (its --out)")
    return [json.loads(line) for line in path.read_text().splitlines()]


def summarize(folders):
    runs = {folder: read_rows(folder) for folder in folders}
    reference = [row["loss"] for row in runs[folders[0]] if "loss" in row and not row.get("summary")]
    lines = []
    for folder, rows in runs.items():
        losses = [row["loss"] for row in rows if "loss" in row and not row.get("summary")]
        if len(losses) != len(reference):
            raise ValueError(f"{folder} has {len(losses)} steps, {folders[0]} has {len(reference)}: compare equal runs")
        absolute = max(abs(a - b) for a, b in zip(losses, reference))
        relative = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
        steps = [row for row in rows if "loss" in row and not row.get("summary")]
        timed = [row for row in steps if row["step"] > 5] or steps  # short runs: every step
        speed = statistics.median(row["tokens_per_gpu_per_s"] for row in timed)
        memory = max((row.get("peak_memory_gib", 0.0) for row in rows), default=0.0)
        lines.append(dict(run=str(folder), first_loss=losses[0], last_loss=losses[-1],
                          final_val_loss=[row["val_loss"] for row in rows if "val_loss" in row][-1],
                          max_abs_loss_diff=absolute, max_rel_loss_diff=relative,
                          tokens_per_gpu_per_s=speed, peak_memory_gib=memory))
    return lines


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    for line in summarize(sys.argv[1:]):
        print(json.dumps(line))
