"""R and G matrices as annotated heat maps: one per run, and one per method (model, sequence) averaged over seeds.

Cells show the score in points; the mean map also shows the std over seeds under the mean when there are
several seeds. Missing cells (a stage that did not run) are blank with a dash.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from benchmark.plotkit import to_float
from benchmark.records import RunRecord

Matrix = list[list[Any]]


def _array(matrix: Matrix, n_cols: int) -> np.ndarray:
    return np.array([[to_float(v) for v in row] for row in matrix], dtype=float).reshape(len(matrix), n_cols)


def _heat(ax: Any, mean: np.ndarray, rows: list[str], cols: list[str], title: str,
          std: np.ndarray | None = None) -> Any:
    im = ax.imshow(np.ma.masked_invalid(mean), vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(mean):
        text = "–" if math.isnan(v) else f"{v:.0f}"
        if std is not None and not math.isnan(std[i, j]):
            text += f"\n± {std[i, j]:.0f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=9 if std is None else 8,
                color="black" if v >= 60 else "white", linespacing=1.1)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after stage")
    ax.set_title(title, fontsize=10)
    return im


def _stage_labels(rec: RunRecord, n_rows: int) -> list[str]:
    stages, tasks = [s.task for s in rec.stages], rec.tasks
    return ["0 base"] + [f"{t} {stages[t - 1] if t - 1 < len(stages) else tasks[t - 1]}" for t in range(1, n_rows)]


def _figure(panels: list[tuple[str, np.ndarray, list[str], np.ndarray | None]], rows: list[str], title: str,
            row_height: float) -> Figure:
    width = sum(1.2 + 0.75 * len(c) for _, _, c, _ in panels) + 1.5
    fig = Figure(figsize=(max(6.0, width), 1.4 + row_height * len(rows)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    for ax, (name, mean, cols, std) in zip(axes, panels):
        im = _heat(ax, mean, rows[:len(mean)], cols, name, std)
    fig.colorbar(im, ax=list(axes), label="score (points, 0-100)", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    return fig


def heatmap_figure(rec: RunRecord) -> Figure | None:
    """R (and G, when there are general benchmarks) of one run, cells annotated with the score."""
    R, G, tasks, general = rec.R, rec.G, rec.tasks, rec.general_tasks
    if not R or not tasks:
        return None
    panels = [("R: downstream tasks", _array(R, len(tasks)), tasks, None)]
    if G and general:
        panels.append(("G: general benchmarks", _array(G, len(general)), general, None))
    status = "" if rec.status == "success" else f" [{rec.status}]"
    return _figure(panels, _stage_labels(rec, len(R)), f"{rec.run_id}{status}", 0.45)


def _mean_std(mats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """Cell-wise mean and sample std over seeds (std only with two or more seeds; NaN cells are left out)."""
    a = np.stack(mats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN cell: its mean is NaN, drawn as a dash
        mean = np.nanmean(a, axis=0)
        std = np.nanstd(a, axis=0, ddof=1) if len(mats) > 1 else None
    return mean, std


def mean_heatmap_figure(recs: list[RunRecord], name: str) -> tuple[Figure, int] | None:
    """R and G of one method (model, sequence) as mean ± std over its successful seeds; (figure, seeds).

    Only runs with the same tasks and matrix shape as the first successful one are averaged (a merged folder
    could hold another shape under the same sequence id only if records were edited by hand).
    """
    ok = [r for r in recs if r.status == "success" and r.R and r.tasks]
    if not ok:
        return None
    first = ok[0]
    same = [r for r in ok if r.tasks == first.tasks and r.general_tasks == first.general_tasks
            and len(r.R) == len(first.R) and len(r.G or []) == len(first.G or [])]
    mean, std = _mean_std([_array(r.R, len(first.tasks)) for r in same])
    panels = [("R: downstream tasks", mean, first.tasks, std)]
    if first.G and first.general_tasks:
        gmean, gstd = _mean_std([_array(r.G, len(first.general_tasks)) for r in same])
        panels.append(("G: general benchmarks", gmean, first.general_tasks, gstd))
    seeds = ",".join(str(r.seed) for r in sorted(same, key=lambda r: r.seed))
    title = f"{name}: {first.model} on {first.sequence_id}\nmean{' ± std' if len(same) > 1 else ''} over " \
            f"{len(same)} seed{'s' if len(same) > 1 else ''} ({seeds})"
    return _figure(panels, _stage_labels(first, len(first.R)), title, 0.45 if len(same) == 1 else 0.6), len(same)
