"""PNG plots derived from run records and the leaderboard (matplotlib, no display needed).

Three views: the trade-off (final_avg against general_delta, mean ± std over seeds, Pareto front) per model and
sequence; the R and G matrices of every run as annotated heat maps; the general score along the stages per method.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state, so no GUI backend is ever touched).
"""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from benchmark.records import RunRecord, atomic_write_bytes
from benchmark.tables import display_name, method_variants

logger = logging.getLogger(__name__)
Images = dict[str, list[tuple[str, Path]]]  # view -> [(caption, png path)]
REFERENCE_STYLE = {"marker": "*", "markersize": 16, "color": "black"}


def slug(text: Any) -> str:
    """A file-name-safe version of a model, sequence id or run id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _colors(methods: list[str]) -> dict[str, Any]:
    """One stable colour per method name, shared by every figure."""
    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(sorted(set(methods)))}


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _num(x: Any) -> float:
    try:
        return float(x) if x is not None and x is not pd.NA else math.nan
    except (TypeError, ValueError):
        return math.nan


def tradeoff_figure(group: pd.DataFrame, colors: dict[str, Any], title: str) -> Figure | None:
    """final_avg (y) against general_delta (x) per method, error bars = std over seeds, Pareto front dashed."""
    pts = group.assign(x=group["general_delta"].map(_num), y=group["final_avg"].map(_num))
    pts = pts[pts["x"].notna() & pts["y"].notna()]
    if pts.empty:
        return None
    fig = Figure(figsize=(7.5, 5.2))
    ax = fig.add_subplot()
    placed: list[tuple[float, float]] = []
    for _, r in pts.iterrows():
        xerr, yerr = _num(r["general_delta_std"]), _num(r["final_avg_std"])
        err = {"xerr": None if math.isnan(xerr) else xerr, "yerr": None if math.isnan(yerr) else yerr}
        seeds, name = f"n={r['n_seeds']}", display_name(r["method"], r.get("variant"))
        if r["kind"] == "reference":
            ax.errorbar(r["x"], r["y"], **err, linestyle="none", capsize=4, elinewidth=1, **REFERENCE_STYLE,
                        label=f"{name} (upper bound, {seeds})")
        else:
            ax.errorbar(r["x"], r["y"], **err, fmt="o", markersize=9, capsize=4, elinewidth=1.2,
                        color=colors.get(name), markeredgecolor="black" if r["pareto"] else "none",
                        markeredgewidth=1.8, label=f"{name} ({seeds}{', Pareto' if r['pareto'] else ''})")
        same = sum(math.isclose(x, r["x"], abs_tol=1e-9) and math.isclose(y, r["y"], abs_tol=1e-9) for x, y in placed)
        placed.append((r["x"], r["y"]))  # stack the labels of coinciding points instead of overprinting them
        ax.annotate(name, (r["x"], r["y"]), textcoords="offset points", xytext=(7, 6 + 11 * same),
                    fontsize=9)
    front = pts[pts["pareto"].astype(bool)].sort_values(["x", "y"], ascending=[True, False])
    if len(front):
        ax.plot(front["x"], front["y"], "--", color="0.35", linewidth=1.2, zorder=0, label="Pareto front")
    ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle=":", zorder=0)
    ax.set_xlabel("general_delta: general score change vs. base model (points; < 0 = forgetting)")
    ax.set_ylabel("final_avg: mean downstream score after the last stage (points)")
    ax.set_title(title, fontsize=11)
    ax.text(0.99, 0.01, "better: up and right", transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
            color="0.4")
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.15)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    return fig


def _heat(ax: Any, matrix: list[list[Any]], rows: list[str], cols: list[str], title: str) -> Any:
    a = np.array([[_num(v) for v in row] for row in matrix], dtype=float).reshape(len(matrix), len(cols))
    im = ax.imshow(np.ma.masked_invalid(a), vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(a):
        text = "–" if math.isnan(v) else f"{v:.0f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=9, color="black" if v >= 60 else "white")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after stage")
    ax.set_title(title, fontsize=10)
    return im


def heatmap_figure(rec: RunRecord) -> Figure | None:
    """R (and G, when there are general benchmarks) of one run, cells annotated with the score."""
    R, G = rec.R, rec.G
    tasks, general = rec.tasks, rec.general_tasks
    if not R or not tasks:
        return None
    stages = [s.task for s in rec.stages]
    labels = ["0 base"] + [f"{t} {stages[t - 1] if t - 1 < len(stages) else tasks[t - 1]}" for t in range(1, len(R))]
    panels = [("R: downstream tasks", R, tasks)] + ([("G: general benchmarks", G, general)] if G and general else [])
    width = sum(1.2 + 0.75 * len(c) for _, _, c in panels) + 1.5
    fig = Figure(figsize=(max(6.0, width), 1.4 + 0.45 * len(R)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    for ax, (title, matrix, cols) in zip(axes, panels):
        im = _heat(ax, matrix, labels[:len(matrix)], cols, title)
    fig.colorbar(im, ax=list(axes), label="score (points, 0-100)", shrink=0.9)
    status = "" if rec.status == "success" else f" [{rec.status}]"
    fig.suptitle(f"{rec.run_id}{status}", fontsize=10)
    return fig


def general_figure(recs: list[RunRecord], colors: dict[str, Any], title: str) -> Figure | None:
    """Mean general score after each stage per method: line = mean over seeds, band = ± std."""
    runs = [r for r in recs if r.status == "success" and r.general_tasks and r.G]
    methods = [r for r in runs if r.kind == "method"]
    if not methods:
        return None
    tasks = methods[0].tasks
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    by_method: dict[str, list[list[float]]] = {}
    variants = method_variants(recs)
    for r in methods:
        curve = [float(np.mean([_num(v) for v in row])) for row in r.G]
        by_method.setdefault(display_name(r.method, variants.get(r.run_id)), []).append(curve)
    for name in sorted(by_method):
        curves = [c for c in by_method[name] if len(c) == len(tasks) + 1]
        if not curves:
            continue
        a = np.array(curves)
        mean = a.mean(axis=0)
        x = np.arange(len(mean))
        ax.plot(x, mean, "-o", color=colors.get(name), label=f"{name} (n={len(curves)})")
        if len(curves) > 1:
            std = a.std(axis=0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, color=colors.get(name), alpha=0.18, linewidth=0)
    for name in sorted({r.method for r in runs if r.kind == "reference"}):
        finals = [float(np.mean([_num(v) for v in r.G[-1]])) for r in runs if r.method == name]
        ax.axhline(float(np.mean(finals)), color=REFERENCE_STYLE["color"], linestyle=":",
                   linewidth=1.2, label=f"{name}: after joint training (n={len(finals)})")
    ax.set_xticks(range(len(tasks) + 1), ["base"] + [f"{i}: {t}" for i, t in enumerate(tasks, 1)], rotation=15)
    ax.set_xlabel("after stage (task trained in that stage)")
    ax.set_ylabel("general score (points, mean over benchmarks)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    return fig


def write_plots(out_dir: str | Path, records: list[RunRecord], df: pd.DataFrame) -> Images:
    """Write every figure under ``out_dir/plots``; returns the written PNGs per view with a caption."""
    plots = Path(out_dir) / "plots"
    variants = method_variants(records)
    colors = _colors([display_name(r.method, variants.get(r.run_id)) for r in records])
    images: Images = {"tradeoff": [], "general": [], "heatmaps": []}
    for (model, seq), group in (df.groupby(["model", "sequence_id"], sort=False) if not df.empty else []):
        name = f"{slug(model)}--{slug(seq)}.png"
        fig = tradeoff_figure(group, colors, f"Downstream score vs. general forgetting\n{model} on {seq}")
        if fig is not None:
            images["tradeoff"].append((f"{model} on {seq}", _save(fig, plots / f"tradeoff--{name}")))
        recs = [r for r in records if r.model == model and r.sequence_id == seq]
        fig = general_figure(recs, colors, f"General score along the sequence\n{model} on {seq}")
        if fig is not None:
            images["general"].append((f"{model} on {seq}", _save(fig, plots / f"general--{name}")))
    for rec in sorted(records, key=lambda r: r.run_id):
        fig = heatmap_figure(rec)
        if fig is not None:
            path = _save(fig, plots / "heatmaps" / f"{slug(rec.run_id)}.png")
            images["heatmaps"].append((rec.run_id, path))
    logger.info("wrote %d plots under %s", sum(len(v) for v in images.values()), plots)
    return images
