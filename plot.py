"""Draw runs' curves as SVG with the standard library alone: `python plot.py out [more runs ...] [--svg F]`.

One panel of loss: training loss per step (thin) and validation loss per evaluation (dots); a second panel of
multiple-choice accuracy when the runs have it. Each run is a folder train.py wrote (its --out) or a
metrics.jsonl; `--label` names them in the legend. train.py writes <out>/curves.svg at the end of every run.
Runs that differ only by seed can be drawn as one curve each; nothing is averaged here.
Left out: PNG (open the SVG in a browser, or convert it), log axes, smoothing.
"""
import argparse
import json
import sys
from pathlib import Path
from xml.sax.saxutils import escape

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
PANEL_W, PANEL_H, MARGIN = 420, 280, 50


def read_metrics(path):
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a metrics.jsonl (or the --out folder of a run)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def nice_range(values):
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 0.5, high + 0.5
    pad = (high - low) * 0.05
    return low - pad, high + pad


def panel(x0, title, ylabel, series, y_range=None):
    """SVG of one panel at x offset x0: series is [(label, colour, [(x, y)], style)], style "line" or "dots"."""
    points = [p for _, _, pts, _ in series for p in pts]
    if not points:
        return []
    (xl, xh), (yl, yh) = nice_range([p[0] for p in points]), y_range or nice_range([p[1] for p in points])

    def at(x, y):
        return (x0 + MARGIN + (x - xl) / (xh - xl) * PANEL_W,
                MARGIN + PANEL_H - (y - yl) / (yh - yl) * PANEL_H)

    out = [f'<rect x="{x0 + MARGIN}" y="{MARGIN}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#888"/>',
           f'<text x="{x0 + MARGIN + PANEL_W / 2}" y="{MARGIN - 12}" text-anchor="middle">{escape(title)}</text>',
           f'<text x="{x0 + MARGIN + PANEL_W / 2}" y="{MARGIN + PANEL_H + 36}" text-anchor="middle">step</text>',
           f'<text x="{x0 + 14}" y="{MARGIN + PANEL_H / 2}" text-anchor="middle" '
           f'transform="rotate(-90 {x0 + 14} {MARGIN + PANEL_H / 2})">{escape(ylabel)}</text>']
    for i in range(5):  # tick labels at five even places on each axis
        x, y = xl + (xh - xl) * i / 4, yl + (yh - yl) * i / 4
        px, _ = at(x, yl)
        _, py = at(xl, y)
        out.append(f'<text x="{px:.1f}" y="{MARGIN + PANEL_H + 16}" text-anchor="middle" font-size="10">{x:.0f}</text>')
        out.append(f'<text x="{x0 + MARGIN - 4}" y="{py + 3:.1f}" text-anchor="end" font-size="10">{y:.3g}</text>')
    for n, (label, colour, pts, style) in enumerate(series):
        path = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(at(*p) for p in pts))
        width, dash = (0.8, "") if style == "line" else (1.8, ' stroke-dasharray="5,3"')
        out.append(f'<path class="curve" d="{path}" fill="none" stroke="{colour}" stroke-width="{width}"{dash}>'
                   f'<title>{escape(label)}</title></path>')
        if style == "dots":
            out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in (at(*p) for p in pts))
        ly = MARGIN + 14 + 14 * n
        out.append(f'<line x1="{x0 + MARGIN + PANEL_W - 150}" y1="{ly - 4}" x2="{x0 + MARGIN + PANEL_W - 132}" '
                   f'y2="{ly - 4}" stroke="{colour}" stroke-width="{width}"{dash}/>')
        out.append(f'<text x="{x0 + MARGIN + PANEL_W - 128}" y="{ly}" font-size="10">{escape(label)}</text>')
    return out


def svg_of(runs: dict) -> str:
    """runs: {label: metrics rows}. The SVG document: one <path class="curve"> per curve drawn."""
    loss_series, accuracy_series = [], []
    for n, (label, rows) in enumerate(runs.items()):
        colour = COLOURS[n % len(COLOURS)]
        steps = [r for r in rows if "loss" in r and not r.get("summary")]
        evals = [r for r in rows if "val_loss" in r and not r.get("summary")]
        if steps:
            loss_series.append((f"{label} train", colour, [(r["step"], r["loss"]) for r in steps], "line"))
        if evals:
            loss_series.append((f"{label} validation", colour, [(r["step"], r["val_loss"]) for r in evals], "dots"))
        accuracy = [(r["step"], r["acc"]) for r in evals if "acc" in r]
        if accuracy:
            accuracy_series.append((f"{label} acc", colour, accuracy, "dots"))
    panels = panel(0, "loss", "loss", loss_series)
    if accuracy_series:
        panels += panel(PANEL_W + 2 * MARGIN, "multiple-choice accuracy", "accuracy", accuracy_series, (0.0, 1.0))
    width = (PANEL_W + 2 * MARGIN) * (2 if accuracy_series else 1)
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PANEL_H + 2 * MARGIN + 10}" '
                      f'font-family="sans-serif" font-size="12">',
                      '<rect width="100%" height="100%" fill="white"/>', *panels, "</svg>\n"])


def write_svg(path, runs: dict):
    """Write atomically: a reader never sees half a picture."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(svg_of(runs))
    temporary.replace(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="metrics.jsonl files or run folders")
    parser.add_argument("--svg", default="curves.svg", help="output picture")
    parser.add_argument("--label", action="append", default=None, help="a name for each run, in order")
    args = parser.parse_args(argv)
    if args.label is not None and len(args.label) != len(args.runs):
        raise ValueError(f"{len(args.label)} --label for {len(args.runs)} runs: give one per run, or none")
    labels = args.label or [str(run) for run in args.runs]
    write_svg(args.svg, {label: read_metrics(run) for label, run in zip(labels, args.runs)})
    print(f"wrote {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
