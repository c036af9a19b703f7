"""The figures read right: trade-off labels never overlap, the reference never sets the range, the legend shows
the plotted markers, and the mean heat maps hold the mean and std over seeds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from benchmark import leaderboard as lb
from benchmark.heatmaps import mean_heatmap_figure
from benchmark.plotkit import LABEL_GID, method_styles, renderer_of
from benchmark.plots import tradeoff_figure
from benchmark.records import RunRecord
from tests.test_leaderboard import make_record, synthetic_records, write_records

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["full_ft", "lora", "lora_mlp", "loramoe", "slim", "hilo", "replay", "replay_general", "ewc", "lwf",
           "olora", "dora"]


def crowded_board(ref_y: float = 96.0) -> pd.DataFrame:
    """12 methods as the published tables have them: a cluster of three on one spot, hilo next to loramoe."""
    xy = [(-1.5, 77.7), (-4.4, 68.0), (-3.0, 62.7), (-9.6, 51.0), (-3.0, 54.7), (-9.8, 51.3), (-1.4, 77.6),
          (17.4, 69.6), (-1.5, 77.7), (-1.5, 77.8), (-3.9, 44.7), (-3.9, 68.8)]
    rows = [{"kind": "method", "method": m, "variant": "", "general_delta": x, "final_avg": y,
             "general_delta_std": 1.0, "final_avg_std": 2.0, "n_seeds": 3, "pareto": m in ("ewc", "replay_general")}
            for m, (x, y) in zip(METHODS, xy)]
    rows.append({"kind": "reference", "method": "joint_reference", "variant": "", "general_delta": -41.0,
                 "final_avg": ref_y, "general_delta_std": 7.0, "final_avg_std": 0.6, "n_seeds": 3, "pareto": False})
    return pd.DataFrame(rows)


def published(table: str) -> pd.DataFrame:
    return pd.read_csv(ROOT / "results" / table / "leaderboard.csv", dtype={"seeds": str, "variant": str},
                       keep_default_na=True).fillna({"variant": ""})


def draw(board: pd.DataFrame):
    names = list(board.loc[board["kind"] == "method", "method"])
    fig = tradeoff_figure(board, method_styles(names), "t")
    renderer = renderer_of(fig)
    fig.canvas.draw()
    return fig, fig.axes[0], renderer


def label_boxes(ax, renderer):
    """The drawn text boxes of the placed labels (text only, leader lines left out)."""
    texts = [t for t in ax.texts if t.get_gid() == LABEL_GID]
    return texts, [Text.get_window_extent(t, renderer) for t in texts]


@pytest.mark.parametrize("board", [crowded_board(), crowded_board(ref_y=76.0),
                                   published("tiny-world"), published("smollm2-135m")],
                         ids=["crowded-ref-above", "crowded-ref-inside", "tiny-world", "smollm2-135m"])
def test_tradeoff_labels_never_overlap_and_stay_inside(board):
    fig, ax, renderer = draw(board)
    texts, boxes = label_boxes(ax, renderer)
    methods = board[board["kind"] == "method"]
    assert {t.get_text() for t in texts} >= set(methods["method"])  # every method is labelled
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1, texts[i].get_text()
        for j in range(i):
            assert not a.overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())


def test_reference_is_an_annotated_line_and_never_sets_the_range():
    above = crowded_board(ref_y=96.0)
    fig, ax, _ = draw(above)
    lo, hi = ax.get_ylim()
    assert hi < 96.0 and hi - lo < 2 * (77.8 + 2 - 44.7 + 2)  # scaled to the methods, not stretched to 96
    note = [t.get_text() for t in ax.texts if "joint_reference" in t.get_text()]
    assert len(note) == 1 and "96.0" in note[0] and "above the range" in note[0]
    inside = crowded_board(ref_y=60.0)
    fig, ax, _ = draw(inside)
    dashed = [ln for ln in ax.lines if list(ln.get_ydata()) == [60.0, 60.0]]
    assert len(dashed) == 1 and dashed[0].get_linestyle() != "-"  # axhline: a dashed line at its final_avg
    assert any("joint_reference" in t.get_text() and "60.0" in t.get_text() for t in ax.texts)
    assert any("joint_reference" in h.get_label() for h in ax.get_legend().legend_handles)


@pytest.mark.parametrize("board", [crowded_board(), published("tiny-world")], ids=["crowded", "tiny-world"])
def test_legend_markers_are_the_plotted_markers(board):
    fig, ax, _ = draw(board)
    handles = {h.get_label().split(" (")[0]: h for h in ax.get_legend().legend_handles}
    for _, r in board[board["kind"] == "method"].iterrows():
        h = handles[r["method"]]
        drawn = [ln for ln in ax.lines if ln.get_gid() == f"point:{r['method']}"]
        assert len(drawn) == 1 and list(drawn[0].get_xydata()[0]) == [r["general_delta"], r["final_avg"]]
        assert h.get_marker() == drawn[0].get_marker() and h.get_linestyle() == "None"
        assert np.allclose(h.get_markerfacecolor(), drawn[0].get_markerfacecolor())
        assert h.get_markeredgecolor() == drawn[0].get_markeredgecolor()
    styles = {(h.get_marker(), tuple(h.get_markerfacecolor())) for m, h in handles.items() if m in METHODS}
    assert len(styles) == len([m for m in handles if m in METHODS])  # every method looks different


def test_mean_heatmaps_per_method_with_mean_and_std():
    recs = [RunRecord.from_dict(r) for r in synthetic_records()]
    a = [r for r in recs if r.method == "a"]
    fig, n = mean_heatmap_figure(a, "a")
    assert n == 2
    r_panel = fig.axes[0]
    cells = [t.get_text() for t in r_panel.texts]
    final = [np.mean([a[0].R[3][j], a[1].R[3][j]]) for j in range(3)]
    std = [np.std([a[0].R[3][j], a[1].R[3][j]], ddof=1) for j in range(3)]
    for m, s in zip(final, std):
        assert f"{m:.0f}\n± {s:.0f}" in cells
    one, n1 = mean_heatmap_figure([r for r in recs if r.method == "b"], "b")
    assert n1 == 1 and all("±" not in t.get_text() for t in one.axes[0].texts)  # one seed: no std
    assert mean_heatmap_figure([r for r in recs if r.method == "d"], "d") is None  # no successful run


def test_mean_heatmaps_are_written_and_shown_in_the_report(tmp_path):
    d = write_records(tmp_path / "d", synthetic_records())
    lb.write_all(d)
    means = sorted(p.name for p in (d / "plots" / "heatmaps_mean").glob("*.png"))
    assert means == ["a--toy--toy_0000.png", "b--toy--toy_0000.png", "c--toy--toy_0000.png",
                     "joint_reference--toy--toy_0000.png"]
    html = (d / "report.html").read_text(encoding="utf-8")
    head, _, per_run = html.partition("R and G matrices per run")
    assert "mean ± std over seeds" in head and "a: toy on toy@0000 (mean over 2 seeds)" in head
    assert per_run.count("<details>") == 6 and "<details>" not in head.split("per method")[-1]


def test_one_seed_one_method_still_plots(tmp_path):
    d = write_records(tmp_path / "d", [make_record("a", 0, [[20, 30], [60, 40], [50, 70]],
                                                   [[50, 60], [48, 60], [47, 59]])])
    lb.write_all(d)
    assert (d / "plots" / "tradeoff--toy--toy_0000.png").stat().st_size > 5000
    assert not math.isnan(pd.read_csv(d / "leaderboard.csv")["final_avg"].iloc[0])
