"""Metrics checked against hand-computed values (arithmetic in the comments), per docs/metrics.md."""

from __future__ import annotations

import math
import pytest

from benchmark import metrics as m
from benchmark.metrics import MetricValue

# T = 3. Rows = stages 0..3 (row 0 = base model), columns = tasks 1..3.
R3 = [
    [20.0, 30.0, 40.0],  # base model
    [80.0, 35.0, 42.0],  # after task 1
    [85.0, 70.0, 48.0],  # after task 2 (task 1 still improves: 85 > 80, so max-based != first-minus-last)
    [60.0, 65.0, 90.0],  # after task 3
]
# T = 1.
R1 = [[30.0], [70.0]]

# T = 3, M = 2 general benchmarks with measured floors 25 (4-way MC) and 50 (binary).
FLOOR = [25.0, 50.0]
G3 = [
    [55.0, 70.0],  # mean 62.5 (base)
    [50.0, 66.0],  # mean 58.0
    [40.0, 56.0],  # mean 48.0  <- worst stage, in the middle of the sequence
    [49.0, 65.0],  # mean 57.0 (final)
]


def val(mv: MetricValue) -> float:
    assert isinstance(mv, MetricValue) and mv.reason is None and mv.value is not None, mv
    return mv.value


def assert_undefined(mv: MetricValue, *words: str) -> None:
    assert mv.value is None, mv  # never 0
    assert mv.reason and all(w in mv.reason for w in words), mv.reason


# -- downstream, T = 3 ------------------------------------------------------------------------------------
def test_final_avg():
    # (60 + 65 + 90) / 3 = 215 / 3
    assert val(m.final_avg(R3)) == pytest.approx(215 / 3)


def test_avg_incremental():
    # t=1: 80; t=2: (85 + 70)/2 = 77.5; t=3: (60 + 65 + 90)/3 = 71.666...
    # (80 + 77.5 + 71.666...) / 3 = 76.3888...
    assert val(m.avg_incremental(R3)) == pytest.approx((80 + 77.5 + 215 / 3) / 3)
    assert val(m.avg_incremental(R3)) == pytest.approx(76.388888889)


def test_plasticity():
    # R[1][1], R[2][2], R[3][3] = 80, 70, 90 -> 240 / 3 = 80
    assert val(m.plasticity(R3)) == pytest.approx(80.0)


def test_plasticity_floor_margin():
    # diagonal 80, 70, 90; floors 65, 20, 10 -> margins 15, 50, 80 -> min 15 (task 1, although task 2 has the
    # lowest diagonal score: the floor decides which task was learned least)
    assert val(m.plasticity_floor_margin(R3, [65.0, 20.0, 10.0])) == pytest.approx(15.0)
    # a task below its floor gives a negative margin: 70 - 75 = -5
    assert val(m.plasticity_floor_margin(R3, [0.0, 75.0, 0.0])) == pytest.approx(-5.0)
    assert val(m.plasticity_floor_margin(R1, [40.0])) == pytest.approx(30.0)  # 70 - 40
    assert_undefined(m.plasticity_floor_margin(R3), "no task floors")
    assert_undefined(m.plasticity_floor_margin(R3, [65.0, None, 10.0]), "floor", "[2]")
    assert_undefined(m.plasticity_floor_margin(R3, [None, None, None]), "no task floors", "1.5")  # an old record
    r = [row[:] for row in R3]
    r[3][2] = math.nan  # the diagonal cell of task 3
    assert_undefined(m.plasticity_floor_margin(r, [65.0, 20.0, 10.0]), "R[3][2]")
    with pytest.raises(ValueError, match="one floor per task"):
        m.plasticity_floor_margin(R3, [65.0, 20.0])
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        m.plasticity_floor_margin(R3, [65.0, 20.0, 101.0])


def test_bwt_divides_by_T_minus_1():
    # task 1: 60 - 80 = -20; task 2: 65 - 70 = -5; sum -25 / (T-1 = 2) = -12.5
    assert val(m.bwt(R3)) == pytest.approx(-12.5)


def test_forgetting_is_max_based():
    # task 1: max(R[1][1], R[2][1]) = max(80, 85) = 85; 85 - 60 = 25
    # task 2: max(R[2][2]) = 70; 70 - 65 = 5
    # (25 + 5) / 2 = 15
    assert val(m.forgetting(R3)) == pytest.approx(15.0)
    # first-minus-last would give ((80-60) + (70-65)) / 2 = 12.5 (= -bwt): the convention matters
    assert val(m.forgetting(R3)) != pytest.approx(12.5)


def test_forgetting_ignores_zero_shot_scores_before_training():
    # A high zero-shot score on task 2 at stage 1 (99) is before task 2 was learned: max over l in {2..T-1} only.
    r = [row[:] for row in R3]
    r[1][1] = 99.0
    # task 1: 85 - 60 = 25; task 2: max(R[2][2]) = 70 - 65 = 5 -> still 15 (an l in {1..T-1} max would give 29.5)
    assert val(m.forgetting(r)) == pytest.approx(15.0)


def test_forgetting_not_clamped():
    # task 1 ends above all earlier scores: max(10, 20) - 50 = -30; task 2: 40 - 40 = 0 -> -15
    r = [[0, 0, 0], [10, 0, 0], [20, 40, 0], [50, 40, 90]]
    assert val(m.forgetting(r)) == pytest.approx(-15.0)


def test_fwt_baseline_is_base_model():
    # task 2: R[1][2] - R[0][2] = 35 - 30 = 5; task 3: R[2][3] - R[0][3] = 48 - 40 = 8; (5 + 8) / 2 = 6.5
    assert val(m.fwt(R3)) == pytest.approx(6.5)


def test_intransigence():
    # a* = [90, 75, 88]: (90-80) + (75-70) + (88-90) = 10 + 5 - 2 = 13; 13 / 3
    assert val(m.intransigence(R3, [90, 75, 88])) == pytest.approx(13 / 3)
    assert_undefined(m.intransigence(R3), "reference")
    assert_undefined(m.intransigence(R3, [90, None, 88]), "reference", "2")
    with pytest.raises(ValueError, match="one score per task"):
        m.intransigence(R3, [90, 75])


# -- downstream, T = 1 ------------------------------------------------------------------------------------
def test_single_task():
    assert val(m.final_avg(R1)) == pytest.approx(70.0)
    assert val(m.avg_incremental(R1)) == pytest.approx(70.0)
    assert val(m.plasticity(R1)) == pytest.approx(70.0)
    assert val(m.intransigence(R1, [75])) == pytest.approx(5.0)  # 75 - 70
    for fn in (m.bwt, m.forgetting, m.fwt):
        assert_undefined(fn(R1), "T = 1")


# -- general metrics --------------------------------------------------------------------------------------
def test_general_raw():
    assert val(m.general_base(G3)) == pytest.approx(62.5)  # (55 + 70) / 2
    assert val(m.general_final(G3)) == pytest.approx(57.0)  # (49 + 65) / 2
    assert val(m.general_delta(G3)) == pytest.approx(-5.5)  # 57 - 62.5 (= mean of -6 and -5)
    assert val(m.general_retention(G3)) == pytest.approx(0.912)  # 57 / 62.5


def test_general_worst_delta_picks_middle_stage():
    # t=1: 58 - 62.5 = -4.5; t=2: 48 - 62.5 = -14.5; t=3: 57 - 62.5 = -5.5 -> min = -14.5 (stage 2)
    assert val(m.general_worst_delta(G3)) == pytest.approx(-14.5)


def test_general_worst_delta_excludes_base_row():
    # t runs over 1..T: a sequence that only improves gives a positive worst delta (61 - 60 = 1), not 0
    assert val(m.general_worst_delta([[50, 70], [52, 70], [60, 70]])) == pytest.approx(1.0)


def test_general_normalised():
    # benchmark 1 (c=25): base (55-25)/75*100 = 40; final (49-25)/75*100 = 32; delta -8
    # benchmark 2 (c=50): base (70-50)/50*100 = 40; final (65-50)/50*100 = 30; delta -10
    # mean delta = (-8 - 10) / 2 = -9   (raw delta is -5.5: normalisation changes the answer)
    assert val(m.general_delta_norm(G3, FLOOR)) == pytest.approx(-9.0)
    # retention: mean final 31 / mean base 40 = 0.775
    assert val(m.general_retention_norm(G3, FLOOR)) == pytest.approx(0.775)


def test_general_normalised_clamps_below_floor():
    # base: (30-25)/75*100 = 6.666...; (60-50)/50*100 = 20
    # final: 20 < 25 -> 0; 45 < 50 -> 0   (not negative)
    # deltas -6.666..., -20 -> mean -13.333...
    g = [[30, 60], [20, 45]]
    assert val(m.general_delta_norm(g, FLOOR)) == pytest.approx(-40 / 3)
    assert val(m.general_retention_norm(g, FLOOR)) == pytest.approx(0.0)


def test_retention_undefined_when_base_is_zero():
    assert_undefined(m.general_retention([[0, 0], [10, 10]]), "general_base")
    # base at or below the floor on every benchmark -> normalised base 0; raw retention (30+60)/2 / (20+40)/2 = 1.5
    g = [[20, 40], [30, 60]]
    assert_undefined(m.general_retention_norm(g, FLOOR), "normalised")
    assert val(m.general_retention(g)) == pytest.approx(1.5)


def test_general_single_task():
    # T = 1: rows base and stage 1 only (the first and last rows of G3)
    g1 = [G3[0], G3[3]]
    assert val(m.general_base(g1)) == pytest.approx(62.5)  # (55 + 70) / 2
    assert val(m.general_final(g1)) == pytest.approx(57.0)  # (49 + 65) / 2
    assert val(m.general_delta(g1)) == pytest.approx(-5.5)
    assert val(m.general_retention(g1)) == pytest.approx(0.912)  # 57 / 62.5
    assert val(m.general_worst_delta(g1)) == pytest.approx(-5.5)  # the only trained stage
    assert val(m.general_delta_norm(g1, FLOOR)) == pytest.approx(-9.0)  # as in test_general_normalised
    assert val(m.general_retention_norm(g1, FLOOR)) == pytest.approx(0.775)
    out = m.compute_all(R1, g1, FLOOR)
    assert val(out["general_delta"]) == pytest.approx(-5.5) and val(out["final_avg"]) == pytest.approx(70.0)


@pytest.mark.parametrize("empty", [[], [[], [], [], []]])
def test_no_general_benchmarks(empty):
    out = m.compute_all(R3, empty, [])
    for name in m.METRICS:
        if name.startswith("general_"):
            assert_undefined(out[name], "M = 0")
    assert val(out["final_avg"]) == pytest.approx(215 / 3)


# -- missing cells ----------------------------------------------------------------------------------------
def test_nan_cells_make_only_the_affected_metrics_undefined():
    r = [row[:] for row in R3]
    r[3][0] = math.nan  # final score on task 1
    assert_undefined(m.final_avg(r), "R[3][0]")
    assert_undefined(m.bwt(r), "R[3][0]")
    assert_undefined(m.forgetting(r), "NaN")
    assert val(m.plasticity(r)) == pytest.approx(80.0)  # diagonal untouched
    assert val(m.fwt(r)) == pytest.approx(6.5)
    r[2][0] = None  # None is a missing cell too; it is inside forgetting's max
    assert_undefined(m.forgetting(r), "R[2][0]")


def test_nan_in_general_matrix():
    g = [row[:] for row in G3]
    g[2][1] = math.nan  # middle stage only
    assert val(m.general_delta(g)) == pytest.approx(-5.5)  # uses rows 0 and T only
    assert_undefined(m.general_worst_delta(g), "G[2][1]")
    assert_undefined(m.general_delta_norm([[55, math.nan], [49, 65]], FLOOR), "G[0][1]")


# -- compute_all, METRICS ---------------------------------------------------------------------------------
def test_compute_all_matches_individual_functions():
    out = m.compute_all(R3, G3, FLOOR, reference=[90, 75, 88], task_floors=[65.0, 20.0, 10.0])
    assert list(out) == list(m.METRICS)
    assert val(out["plasticity_floor_margin"]) == pytest.approx(15.0)  # as in test_plasticity_floor_margin
    assert val(out["forgetting"]) == pytest.approx(15.0)
    assert val(out["intransigence"]) == pytest.approx(13 / 3)
    assert val(out["general_delta_norm"]) == pytest.approx(-9.0)
    assert val(out["general_worst_delta"]) == pytest.approx(-14.5)
    assert_undefined(m.compute_all(R3, G3, FLOOR)["intransigence"], "reference")
    assert_undefined(m.compute_all(R3, G3, FLOOR)["plasticity_floor_margin"], "no task floors")
    # positional order kept: R, G, floor, reference
    assert val(m.compute_all(R3, G3, FLOOR, [90, 75, 88])["intransigence"]) == pytest.approx(13 / 3)


def test_unknown_general_floor_counts_as_zero():
    # an lm-eval built-in benchmark has no measured floor (None): f = 0, so N = G on it
    # benchmark 1 (f=0): 49 - 55 = -6; benchmark 2 (f=50): 30 - 40 = -10 -> mean -8
    assert val(m.general_delta_norm(G3, [None, 50.0])) == pytest.approx(-8.0)
    assert val(m.compute_all(R3, G3, [None, 50.0])["general_delta_norm"]) == pytest.approx(-8.0)


def test_metrics_table():
    for name, (fn, higher, definition) in m.METRICS.items():
        assert callable(fn) and isinstance(higher, bool) and definition.strip(), name
    assert m.METRICS["forgetting"][1] is False and m.METRICS["intransigence"][1] is False
    assert m.METRICS["bwt"][1] is True and m.METRICS["general_delta"][1] is True


def test_metric_value_is_frozen():
    with pytest.raises(AttributeError):
        m.final_avg(R3).value = 0.0  # type: ignore[misc]


# -- shape validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        [[1, 2, 3], [4, 5, 6], [7, 8, 9]],  # T x T: base row missing
        [1, 2],  # 1-D
        [[]],  # T = 0
        [[1, 2], [3]],  # ragged
        [[10], [math.inf]],  # infinite score
    ],
)
def test_R_shape_errors(bad):
    with pytest.raises(ValueError, match="R"):
        m.final_avg(bad)


def test_G_and_floor_errors():
    with pytest.raises(ValueError, match="rows like R"):
        m.compute_all(R3, G3[:3], FLOOR)
    with pytest.raises(ValueError, match="one entry per general benchmark"):
        m.compute_all(R3, G3, [25.0])
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        m.general_delta_norm(G3, [25.0, 101.0])
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        m.general_delta_norm(G3, [25.0, math.nan])
    # a measured floor of 100 (one answer everywhere) is data, not an error: the normalised metrics are undefined
    assert_undefined(m.general_delta_norm(G3, [25.0, 100.0]), "[2]", "100")
    out = m.compute_all(R3, G3, [25.0, 100.0])
    assert_undefined(out["general_retention_norm"], "100")
    assert val(out["general_delta"]) == pytest.approx(-5.5)
    with pytest.raises(ValueError, match="G must be"):
        m.general_delta([[50, 60]])  # base row only, no stage


# -- seeds and the trade-off view -------------------------------------------------------------------------
def test_aggregate():
    # defined values 70, 72, 74: mean 72; sample var = (4 + 0 + 4) / (3 - 1) = 4 -> std 2
    assert m.aggregate([70.0, None, 72.0, 74.0]) == {"mean": pytest.approx(72.0), "std": pytest.approx(2.0), "n": 3}
    assert m.aggregate([5.0, math.nan]) == {"mean": 5.0, "std": None, "n": 1}
    assert m.aggregate([None]) == {"mean": None, "std": None, "n": 0}
    assert m.aggregate([]) == {"mean": None, "std": None, "n": 0}


def test_pareto_front():
    pts = [
        (70.0, -5.0),  # on the front
        (60.0, -2.0),  # on the front (better general_delta)
        (65.0, -6.0),  # dominated by (70, -5)
        (70.0, -5.0),  # identical to the first: ties are both on the front
        (None, 0.0),  # undefined coordinate: never on the front, and does not dominate (60, -2)
        (80.0, None),  # same
        (55.0, -2.0),  # dominated by (60, -2): equal in one, worse in the other
        (math.nan, 10.0),  # NaN counts as undefined
    ]
    no_noise = [(None, None)] * len(pts)
    assert m.noisy_pareto_front(pts, no_noise)[0] == [True, True, False, True, False, False, False, False]
    assert m.noisy_pareto_front([], []) == ([], [])
    assert m.noisy_pareto_front([(1.0, 1.0)], [(None, None)]) == ([True], [])
