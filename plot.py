"""Draw a run's curves: `python plot.py out/metrics.jsonl [more runs ...] [--png curves.png]`.

Training loss per step and validation loss per evaluation in one panel, multiple-choice accuracy (when
the runs have it) in a second. matplotlib is optional: the rest of the project never needs it, and
without it this command says how to get it.
"""
import argparse
import json
import sys
from pathlib import Path


def read_metrics(path):
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a metrics.jsonl (or the --out folder of a run)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="metrics.jsonl files or run folders")
    parser.add_argument("--png", default="curves.png", help="output image")
    args = parser.parse_args(argv)
    runs = {str(run): read_metrics(run) for run in args.runs}
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py needs matplotlib, which this project does not require: pip install matplotlib", file=sys.stderr)
        return 1
    with_accuracy = any("acc" in row for rows in runs.values() for row in rows)
    figure, axes = plt.subplots(1, 2 if with_accuracy else 1, figsize=(12 if with_accuracy else 7, 4.5), squeeze=False)
    loss_axis = axes[0][0]
    for name, rows in runs.items():
        steps = [r for r in rows if "loss" in r and not r.get("summary")]
        evals = [r for r in rows if "val_loss" in r and not r.get("summary")]
        line, = loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], alpha=0.5, label=f"{name} train")
        loss_axis.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color=line.get_color(),
                       label=f"{name} validation")
        if with_accuracy:
            accuracy = [r for r in evals if "acc" in r]
            axes[0][1].plot([r["step"] for r in accuracy], [r["acc"] for r in accuracy], "o-", label=f"{name} acc")
            axes[0][1].plot([r["step"] for r in accuracy], [r["acc_norm"] for r in accuracy], "x--",
                            label=f"{name} acc_norm")
    loss_axis.set(xlabel="step", ylabel="loss", title="loss")
    loss_axis.legend(fontsize=8)
    if with_accuracy:
        axes[0][1].set(xlabel="step", ylabel="accuracy", title="multiple-choice accuracy", ylim=(0, 1))
        axes[0][1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
