"""Shared pieces of the figures: file names, PNG writing, one style per method, and label placement.

Labels are placed by a small deterministic repel: for each label, candidate offsets on rings around its point
(nearest first), the first whose box (measured with the renderer's text extents) stays inside the axes and
touches no placed label and no marker; farther rings, and labels that sit closer to another point than to their
own, get a leader line back to the point.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

from benchmark.records import atomic_write_bytes

LABEL_GID = "point-label"  # lets tests find the placed labels among a figure's texts
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
# ring radii (points) and directions (dx, dy) tried in order: close before far, diagonals before sides
RADII = (9.0, 15.0, 24.0, 36.0, 50.0, 66.0)
LEADER_FROM = 24.0  # rings this far out get a leader line: the label could be read as another point's
DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
GAP_PX = 3.0  # clearance kept around every box (covers the label's background pad)


def slug(text: Any) -> str:
    """A file-name-safe version of a model, sequence id or run id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def to_float(x: Any) -> float:
    """A table cell as a float; NaN when missing or not a number."""
    try:
        return float(x) if x is not None and x is not pd.NA else math.nan
    except (TypeError, ValueError):
        return math.nan


def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (a reader never sees half a file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def method_styles(names: list[str]) -> dict[str, dict[str, Any]]:
    """One stable (colour, marker) per method name, shared by every figure and its legend.

    20 colours (tab20, dark shades first) and a marker per block of colours, so 12+ methods stay distinct.
    """
    cmap = colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {m: {"color": cmap(order[i % 20]), "marker": MARKERS[(i // 10 + i) % len(MARKERS)]}
            for i, m in enumerate(sorted(set(names)))}


def renderer_of(fig: Figure) -> Any:
    """The Agg renderer of ``fig`` (attaching an Agg canvas: figures here are never shown)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    return canvas.get_renderer()


def marker_box(ax: Axes, x: float, y: float, size_pt: float) -> Bbox:
    """The display-space box of a marker of ``size_pt`` points at data (x, y)."""
    px, py = ax.transData.transform((x, y))
    half = size_pt / 2 * ax.figure.dpi / 72
    return Bbox.from_extents(px - half, py - half, px + half, py + half)


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0) + GAP_PX
    h = min(a.y1, b.y1) - max(a.y0, b.y0) + GAP_PX
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box: Bbox, frame: Bbox) -> float:
    """Area of ``box`` beyond ``frame`` (0 when inside with the clearance)."""
    inner = Bbox.from_extents(max(box.x0, frame.x0 + GAP_PX), max(box.y0, frame.y0 + GAP_PX),
                              min(box.x1, frame.x1 - GAP_PX), min(box.y1, frame.y1 - GAP_PX))
    kept = max(0.0, inner.width) * max(0.0, inner.height) if inner.x1 > inner.x0 and inner.y1 > inner.y0 else 0.0
    return box.width * box.height - kept


@dataclass
class Label:
    x: float
    y: float
    text: str
    fontsize: float = 9.0


class Placer:
    """Places text boxes on one axes without overlaps; remembers what it placed and the obstacles."""

    def __init__(self, ax: Axes, renderer: Any, obstacles: list[Bbox] | None = None) -> None:
        self.ax, self.renderer = ax, renderer
        self.taken: list[Bbox] = list(obstacles or [])
        self.frame = ax.get_window_extent(renderer)
        self.points: list[tuple[float, float]] = []  # display positions of the labelled points (see place_all)

    def size(self, text: str, fontsize: float) -> tuple[float, float]:
        """Width and height in pixels of ``text`` as the renderer draws it."""
        t = self.ax.text(0, 0, text, fontsize=fontsize)
        bb = t.get_window_extent(self.renderer)
        t.remove()
        return bb.width, bb.height

    def cost(self, box: Bbox) -> float:
        return 100.0 * _outside(box, self.frame) + sum(_overlap(box, t) for t in self.taken)

    def best(self, boxes: list[Bbox]) -> int:
        """Index of the first box that is free, else of the least bad one."""
        costs = [self.cost(b) for b in boxes]
        return next((i for i, c in enumerate(costs) if c == 0), min(range(len(costs)), key=costs.__getitem__))

    def place(self, label: Label) -> Annotation:
        """Annotate ``label`` at the nearest free offset around its point (a leader line beyond the first ring)."""
        w, h = self.size(label.text, label.fontsize)
        px, py = self.ax.transData.transform((label.x, label.y))
        scale = self.ax.figure.dpi / 72
        specs, boxes = [], []
        for r in RADII:
            for dx, dy in DIRECTIONS:
                ox, oy = dx * r * scale, dy * r * scale
                x0 = px + ox - (w / 2) * (1 - dx)  # dx=1: left-aligned, 0: centred, -1: right-aligned
                y0 = py + oy - (h / 2) * (1 - dy)
                specs.append((r, dx, dy))
                boxes.append(Bbox.from_bounds(x0, y0, w, h))
        i = self.best(boxes)
        r, dx, dy = specs[i]
        self.taken.append(boxes[i])
        centre = (boxes[i].x0 + boxes[i].width / 2, boxes[i].y0 + boxes[i].height / 2)
        own = math.dist(centre, (px, py))
        closer = any(math.dist(centre, p) < own - 1.0 for p in self.points)  # it would read as another point's
        leader = {"arrowstyle": "-", "color": "0.45", "linewidth": 0.7, "shrinkA": 0, "shrinkB": 4} \
            if r >= LEADER_FROM or closer else None
        return self.ax.annotate(
            label.text, (label.x, label.y), textcoords="offset points", xytext=(dx * r, dy * r),
            ha={1: "left", 0: "center", -1: "right"}[dx], va={1: "bottom", 0: "center", -1: "top"}[dy],
            fontsize=label.fontsize, arrowprops=leader, gid=LABEL_GID, zorder=5,
            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.75})

    def place_fixed(self, text: str, anchors: list[tuple[float, float, str, str]], fontsize: float = 8.5,
                    **kwargs: Any) -> Any:
        """Put ``text`` at the first free one of ``anchors`` (axes fractions with ha/va), e.g. a line's label."""
        w, h = self.size(text, fontsize)
        boxes = []
        for fx, fy, ha, va in anchors:
            px, py = self.ax.transAxes.transform((fx, fy))
            x0 = px - {"left": 0.0, "center": w / 2, "right": w}[ha]
            y0 = py - {"bottom": 0.0, "center": h / 2, "top": h}[va]
            boxes.append(Bbox.from_bounds(x0, y0, w, h))
        i = self.best(boxes)
        self.taken.append(boxes[i])
        fx, fy, ha, va = anchors[i]
        return self.ax.text(fx, fy, text, transform=self.ax.transAxes, ha=ha, va=va, fontsize=fontsize,
                            gid=LABEL_GID, zorder=5, **kwargs)

    def place_all(self, labels: list[Label]) -> list[Annotation]:
        """Place ``labels``, the most crowded first (they need the near spots), ties by text: deterministic."""
        pts = [self.ax.transData.transform((lb.x, lb.y)) for lb in labels]
        self.points = [(float(x), float(y)) for x, y in pts]
        near = 40 * self.ax.figure.dpi / 72

        def crowd(i: int) -> int:
            return sum(math.dist(pts[i], p) < near for p in pts)

        order = sorted(range(len(labels)), key=lambda i: (-crowd(i), labels[i].text))
        placed: dict[int, Annotation] = {i: self.place(labels[i]) for i in order}
        return [placed[i] for i in range(len(labels))]
