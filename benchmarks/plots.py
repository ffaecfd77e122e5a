"""PNG plots from a benchmark run's `results.csv` (needs matplotlib: `pip install -e '.[plot]'`).

- `<op>_<mode>.png`, one per (op, mode): p50 ms per provider (log scale) for each shape, with
  the p20-p80 spread as error bars; the floor is drawn as a thick dashed black line, so every
  provider reads as a distance from it. The x axis is M when only M varies within the table,
  otherwise a label of the shape columns that vary.
- `saved_mb.png`: per op with autograd modes, the MB autograd saves for backward, per provider
  and shape (bars); an op with only an `update` mode saves nothing and has no panel.

Rows with an error are left out (summary.md lists them). `python -m benchmarks.plots DIR`
replots DIR/results.csv into DIR.
"""
import csv
import sys
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from .harness import SHAPE_COLUMNS

FLOOR = "floor"


def _number(text: str):
    return None if text == "" else float(text)


def read_rows(csv_path: Path) -> list[dict]:
    """results.csv's rows; shape columns as int (None when empty), times and sizes as float."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for column in SHAPE_COLUMNS:
            row[column] = None if row[column] == "" else int(row[column])
        for column in ("p20_ms", "p50_ms", "p80_ms", "saved_mb"):
            row[column] = _number(row[column])
    return rows


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _shapes(rows: Sequence[dict]) -> tuple[list[tuple], list[str], list[str]]:
    """The shapes in first-seen order, their tick labels and the x-axis title."""
    columns = [c for c in SHAPE_COLUMNS if any(row[c] is not None for row in rows)]
    shapes = _ordered(tuple(row[c] for c in columns) for row in rows)
    varying = [c for i, c in enumerate(columns) if len({shape[i] for shape in shapes}) > 1]
    varying = varying or columns[:1]
    labels = ["\n".join(f"{c}={shape[columns.index(c)]}" for c in varying) if varying != ["M"]
              else str(shape[columns.index("M")]) for shape in shapes]
    fixed = ", ".join(f"{c}={shapes[0][i]}" for i, c in enumerate(columns) if c not in varying)
    title = ("M (tokens)" if varying == ["M"] else "shape") + (f"; {fixed}" if fixed else "")
    return shapes, labels, title


def _subtitle(row: dict) -> str:
    return (f"{row['device_name']}\n{row['dtype']}, torch {row['torch']}, "
            f"triton {row['triton'] or '-'}, git {row['git_sha']}")


def _times_figure(op: str, mode: str, rows: Sequence[dict]) -> Figure:
    columns = [c for c in SHAPE_COLUMNS if any(row[c] is not None for row in rows)]
    shapes, labels, xtitle = _shapes(rows)
    providers = _ordered(row["provider"] for row in rows)
    figure = Figure(figsize=(max(7.0, 1.2 * len(shapes) + 3), 5.0), layout="constrained")
    ax = figure.subplots()
    for provider in providers:
        by_shape = {tuple(row[c] for c in columns): row for row in rows
                    if row["provider"] == provider and row["p50_ms"] is not None}
        points = [(i, by_shape[shape]) for i, shape in enumerate(shapes) if shape in by_shape]
        if not points:
            continue
        xs = [i for i, _ in points]
        p50 = [row["p50_ms"] for _, row in points]
        spread = [[row["p50_ms"] - row["p20_ms"] for _, row in points],
                  [row["p80_ms"] - row["p50_ms"] for _, row in points]]
        style = (dict(color="black", linestyle="--", linewidth=2.5, zorder=3)
                 if provider == FLOOR else dict(marker="o", linewidth=1.5))
        ax.errorbar(xs, p50, yerr=spread, label=provider, capsize=3, **style)
    ax.set_yscale("log")
    ax.set_xticks(range(len(shapes)), labels)
    ax.set_xlabel(xtitle)
    ax.set_ylabel("p50 time, ms (bars: p20-p80)")
    ax.set_title(f"{op} {mode}\n{_subtitle(rows[0])}", fontsize=10)
    ax.grid(True, which="both", axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def _saved_figure(rows: Sequence[dict]) -> Figure:
    ops = _ordered(row["op"] for row in rows if row["saved_mb"] is not None)  # not update ops
    figure = Figure(figsize=(8.0, 3.2 * len(ops) + 0.8), layout="constrained")
    axes = figure.subplots(len(ops), 1, squeeze=False)[:, 0]
    for ax, op in zip(axes, ops):
        # saved_mb is one forward's, the same in every mode: take each provider's first row.
        table = [row for row in rows if row["op"] == op and row["saved_mb"] is not None]
        columns = [c for c in SHAPE_COLUMNS if any(row[c] is not None for row in table)]
        shapes, labels, xtitle = _shapes(table)
        providers = _ordered(row["provider"] for row in table)
        width = 0.8 / max(1, len(providers))
        for j, provider in enumerate(providers):
            saved = {}
            for row in table:
                if row["provider"] == provider:
                    saved.setdefault(tuple(row[c] for c in columns), row["saved_mb"])
            xs = [i + (j - (len(providers) - 1) / 2) * width
                  for i, shape in enumerate(shapes) if shape in saved]
            ax.bar(xs, [saved[shape] for shape in shapes if shape in saved], width,
                   label=provider, color="black" if provider == FLOOR else None)
        ax.set_xticks(range(len(shapes)), labels)
        ax.set_xlabel(xtitle)
        ax.set_ylabel("saved for backward, MB")
        ax.set_title(op)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.suptitle(f"Activations saved for backward\n{_subtitle(rows[0])}", fontsize=10)
    return figure


def plot_results(csv_path: Path, out_dir: Path) -> list[Path]:
    """Writes the PNGs for csv_path's rows into out_dir; returns their paths."""
    rows = read_rows(csv_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for op in _ordered(row["op"] for row in rows):
        for mode in _ordered(row["mode"] for row in rows if row["op"] == op):
            table = [row for row in rows if row["op"] == op and row["mode"] == mode]
            if not any(row["p50_ms"] is not None for row in table):
                continue
            path = out_dir / f"{op}_{mode}.png"
            _times_figure(op, mode, table).savefig(path, dpi=120)
            written.append(path)
    if any(row["saved_mb"] is not None for row in rows):
        path = out_dir / "saved_mb.png"
        _saved_figure(rows).savefig(path, dpi=120)
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.plots DIR (a folder holding results.csv)")
    directory = Path(sys.argv[1])
    for written_path in plot_results(directory / "results.csv", directory):
        print(f"Wrote {written_path}")
