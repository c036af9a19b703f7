"""PNG plots derived from run records and the leaderboard (matplotlib, no display needed).

Four views: the trade-off (final_avg against general_delta, mean ± std over seeds, Pareto front) per model and
sequence; the R and G matrices per method averaged over seeds, and of every run (``benchmark.heatmaps``); the
general score along the stages per method. Figures are built with ``matplotlib.figure.Figure`` (no pyplot global
state, so no GUI backend is ever touched).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from benchmark.curves import loss_figure
from benchmark.heatmaps import heatmap_figure, mean_heatmap_figure
from benchmark.plotkit import Label, Placer, marker_box, method_styles, renderer_of, save_png, slug, to_float
from benchmark.records import RunRecord
from benchmark.tables import display_name, method_variants

logger = logging.getLogger(__name__)
Images = dict[str, list[tuple[str, Path]]]  # view -> [(caption, png path)]
REFERENCE_STYLE = {"marker": "*", "markersize": 16, "color": "black"}
MARKER_SIZE = 9.0
Styles = dict[str, dict[str, Any]]


def _limits(lo: list[float], hi: list[float], pad: float = 0.12) -> tuple[float, float]:
    """An axis range around the methods' points and error bars, padded (a single point gets ± 1)."""
    a, b = min(lo), max(hi)
    span = b - a if b > a else 2.0
    return a - pad * span, b + pad * span


def _reference(ax: Any, placer: Placer, ref: pd.Series, seeds: str) -> list[Any]:
    """The joint reference as a labelled dashed line at its final_avg; it never sets the axis range.

    Above (or below) the range the methods span, it is a labelled arrow at that edge instead of a line.
    """
    y, x = to_float(ref["y"]), to_float(ref["x"])
    ystd = to_float(ref["final_avg_std"])
    lo, hi = ax.get_ylim()
    value = f"final_avg {y:.1f}" + ("" if math.isnan(ystd) else f" ± {ystd:.1f}")
    gd = "" if math.isnan(x) else f", general_delta {x:.1f}"
    head = f"{display_name(ref['method'], ref.get('variant'))} (upper bound, {seeds})"
    style = {"color": REFERENCE_STYLE["color"], "bbox": {"boxstyle": "square,pad=0.15", "facecolor": "white",
                                                         "edgecolor": "0.6", "alpha": 0.9}}
    if lo <= y <= hi:
        ax.axhline(y, color=REFERENCE_STYLE["color"], linestyle=(0, (6, 3)), linewidth=1.1, zorder=1)
        if ax.get_xlim()[0] <= x <= ax.get_xlim()[1]:
            ax.plot([x], [y], linestyle="none", zorder=4, **REFERENCE_STYLE)
            placer.taken.append(marker_box(ax, x, y, REFERENCE_STYLE["markersize"]))
        frac = (y - lo) / (hi - lo)
        anchors = [(0.99, frac + 0.012, "right", "bottom"), (0.99, frac - 0.012, "right", "top"),
                   (0.01, frac + 0.012, "left", "bottom"), (0.01, frac - 0.012, "left", "top")]
        placer.place_fixed(f"{head}: {value}{gd}", anchors, **style)
        return [Line2D([], [], color=REFERENCE_STYLE["color"], linestyle=(0, (6, 3)), linewidth=1.1,
                       label=f"{head}: final_avg")]
    above = y > hi
    arrow, where = ("↑", "above") if above else ("↓", "below")
    edge = 0.985 if above else 0.015
    placer.place_fixed(f"{arrow} {head}, {where} the range shown:\n{value}{gd}",
                       [(0.5, edge, "center", "top" if above else "bottom"),
                        (0.99, edge, "right", "top" if above else "bottom"),
                        (0.01, edge, "left", "top" if above else "bottom")], **style)
    return []


def tradeoff_figure(group: pd.DataFrame, styles: Styles, title: str) -> Figure | None:
    """final_avg (y) against general_delta (x) per method, error bars = std over seeds, Pareto front dashed.

    The axes span the methods only; the joint reference is a labelled line (see :func:`_reference`). Labels are
    placed by :class:`benchmark.plotkit.Placer` so they never overlap each other or a marker.
    """
    pts = group.assign(x=group["general_delta"].map(to_float), y=group["final_avg"].map(to_float))
    pts = pts[pts["x"].notna() & pts["y"].notna()]
    methods, refs = pts[pts["kind"] != "reference"], pts[pts["kind"] == "reference"]
    if methods.empty:
        return None
    fig = Figure(figsize=(7.5, 5.6))
    ax = fig.add_subplot()
    xerr = methods["general_delta_std"].map(to_float).fillna(0.0)
    yerr = methods["final_avg_std"].map(to_float).fillna(0.0)
    ax.set_xlim(*_limits(list(methods["x"] - xerr), list(methods["x"] + xerr)))
    lo, hi = _limits(list(methods["y"] - yerr), list(methods["y"] + yerr))
    ref_y = refs["y"].tolist()
    # room for the reference's note at an edge when it lies beyond the methods (the note, not the value, sets it)
    span = hi - lo
    ax.set_ylim(lo - (0.12 * span if any(y < lo for y in ref_y) else 0.0),
                hi + (0.12 * span if any(y > hi for y in ref_y) else 0.0))
    handles, labels = [], []
    for (_, r), xe, ye in zip(methods.iterrows(), xerr, yerr):
        name = display_name(r["method"], r.get("variant"))
        st = styles.get(name, {"color": "0.3", "marker": "o"})
        edge = {"markeredgecolor": "black" if r["pareto"] else "none", "markeredgewidth": 1.8}
        ax.errorbar(r["x"], r["y"], xerr=xe or None, yerr=ye or None, linestyle="none", capsize=4, elinewidth=1.2,
                    ecolor=st["color"], alpha=0.9, zorder=2)
        ax.plot([r["x"]], [r["y"]], linestyle="none", markersize=MARKER_SIZE, zorder=3, gid=f"point:{name}", **st,
                **edge)
        handles.append(Line2D([], [], linestyle="none", markersize=MARKER_SIZE, **st, **edge,
                              label=f"{name} (n={r['n_seeds']}{', Pareto' if r['pareto'] else ''})"))
        labels.append(Label(r["x"], r["y"], name))
    front = methods[methods["pareto"].astype(bool)].sort_values(["x", "y"], ascending=[True, False])
    if len(front):
        ax.plot(front["x"], front["y"], "--", color="0.35", linewidth=1.2, zorder=0)
        handles.append(Line2D([], [], linestyle="--", color="0.35", linewidth=1.2, label="Pareto front"))
    if ax.get_xlim()[0] < 0 < ax.get_xlim()[1]:
        ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle=":", zorder=0)
    ax.set_xlabel("general_delta: general score change vs. base model (points; < 0 = forgetting)")
    ax.set_ylabel("final_avg: mean downstream score after the last stage (points)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    renderer = renderer_of(fig)
    placer = Placer(ax, renderer, [marker_box(ax, lb.x, lb.y, MARKER_SIZE + 2) for lb in labels])
    placer.place_fixed("better: up and right", [(0.99, 0.01, "right", "bottom"), (0.01, 0.01, "left", "bottom")],
                       fontsize=8, color="0.4")
    for _, ref in refs.iterrows():
        handles += _reference(ax, placer, ref, f"n={ref['n_seeds']}")
    placer.place_all(labels)
    # outside the axes: with 12 methods a legend inside would cover points; bbox_inches="tight" keeps it in the PNG
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), framealpha=0.9,
              borderaxespad=0.0)
    return fig


def general_figure(recs: list[RunRecord], styles: Styles, title: str) -> Figure | None:
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
        curve = [float(np.mean([to_float(v) for v in row])) for row in r.G]
        by_method.setdefault(display_name(r.method, variants.get(r.run_id)), []).append(curve)
    for name in sorted(by_method):
        curves = [c for c in by_method[name] if len(c) == len(tasks) + 1]
        if not curves:
            continue
        a = np.array(curves)
        mean = a.mean(axis=0)
        x = np.arange(len(mean))
        st = styles.get(name, {"color": "0.3", "marker": "o"})
        ax.plot(x, mean, "-", **st, label=f"{name} (n={len(curves)})")
        if len(curves) > 1:
            std = a.std(axis=0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, color=st["color"], alpha=0.18, linewidth=0)
    for name in sorted({r.method for r in runs if r.kind == "reference"}):
        finals = [float(np.mean([to_float(v) for v in r.G[-1]])) for r in runs if r.method == name]
        ax.axhline(float(np.mean(finals)), color=REFERENCE_STYLE["color"], linestyle=":",
                   linewidth=1.2, label=f"{name}: after joint training (n={len(finals)})")
    ax.set_xticks(range(len(tasks) + 1), ["base"] + [f"{i}: {t}" for i, t in enumerate(tasks, 1)], rotation=15)
    ax.set_xlabel("after stage (task trained in that stage)")
    ax.set_ylabel("general score (points, mean over benchmarks)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), framealpha=0.9, borderaxespad=0.0)
    return fig


def write_plots(out_dir: str | Path, records: list[RunRecord], df: pd.DataFrame) -> Images:
    """Write every figure under ``out_dir/plots``; returns the written PNGs per view with a caption."""
    plots = Path(out_dir) / "plots"
    variants = method_variants(records)
    names = {r.run_id: display_name(r.method, variants.get(r.run_id)) for r in records}
    styles = method_styles([names[r.run_id] for r in records if r.kind != "reference"])
    images: Images = {"tradeoff": [], "general": [], "mean_heatmaps": [], "heatmaps": [], "losses": []}
    for (model, seq), group in (df.groupby(["model", "sequence_id"], sort=False) if not df.empty else []):
        name = f"{slug(model)}--{slug(seq)}.png"
        fig = tradeoff_figure(group, styles, f"Downstream score vs. general forgetting\n{model} on {seq}")
        if fig is not None:
            images["tradeoff"].append((f"{model} on {seq}", save_png(fig, plots / f"tradeoff--{name}")))
        recs = [r for r in records if r.model == model and r.sequence_id == seq]
        fig = general_figure(recs, styles, f"General score along the sequence\n{model} on {seq}")
        if fig is not None:
            images["general"].append((f"{model} on {seq}", save_png(fig, plots / f"general--{name}")))
        for _, row in group.iterrows():  # leaderboard order: the best final_avg first
            label = display_name(row["method"], row["variant"])
            runs = [r for r in recs if r.kind == row["kind"] and names[r.run_id] == label]
            made = mean_heatmap_figure(runs, label)
            if made is not None:
                fig, n = made
                path = plots / "heatmaps_mean" / f"{slug(label)}--{slug(model)}--{slug(seq)}.png"
                caption = f"{label}: {model} on {seq} (mean over {n} seed{'s' if n > 1 else ''})"
                images["mean_heatmaps"].append((caption, save_png(fig, path)))
    for rec in sorted(records, key=lambda r: r.run_id):
        fig = heatmap_figure(rec)
        if fig is not None:
            images["heatmaps"].append((rec.run_id, save_png(fig, plots / "heatmaps" / f"{slug(rec.run_id)}.png")))
        fig = loss_figure(rec)
        if fig is not None:
            images["losses"].append((rec.run_id, save_png(fig, plots / "losses" / f"{slug(rec.run_id)}.png")))
    logger.info("wrote %d plots under %s", sum(len(v) for v in images.values()), plots)
    return images
