"""Leaderboard, per-run table, routing table, plots, schema and merging, on hand-made records and one real run.

The hand-made matrices reuse test_metrics.py's R3/G3, whose metric values are computed by hand there.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from benchmark import leaderboard as lb
from benchmark.cli import main
from benchmark.records import SCHEMA_VERSION, RunRecord, write_json
from benchmark.tables import ROUTING_COLUMNS, SCORE_COLUMNS, routing_rows
from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent
R3 = [[20, 30, 40], [80, 35, 42], [85, 70, 48], [60, 65, 90]]  # final_avg 215/3, bwt -12.5, forgetting 15, fwt 6.5
G3 = [[55, 70], [50, 66], [40, 56], [49, 65]]  # general_delta -5.5, norm -9 (chance 25, 50), worst -14.5


def make_record(method, seed, R, G, *, kind=None, status="success", diagnostics=None, model="toy",
                sequence_id="toy@0000", chance=(25.0, 50.0)):
    """A run record as the runner writes it, with hand-made R and G."""
    tasks = [f"t{i + 1}" for i in range(len(R[0]))]
    general = [f"g{j + 1}" for j in range(len(G[0]))] if G and G[0] else []
    rec = {"schema_version": SCHEMA_VERSION, "run_id": f"{method}--{model}--{sequence_id}--seed{seed}",
           "method": method, "model": model, "sequence": sequence_id.split("@")[0], "sequence_id": sequence_id,
           "seed": seed, "status": status, "error": None if status == "success" else "RuntimeError: diverged",
           "config": {"eval": {"batch_size": 16, "limit": None}}, "method_config": {"lr": None},
           "tasks": tasks, "general_tasks": general, "general_chance": list(chance)[:len(general)],
           "metric_names": {t: "exact_match" for t in tasks}, "R": R, "G": G,
           "stages": [{"stage": t, "task": "joint" if kind else tasks[t - 1], "steps": 5, "train_seconds": 2.0,
                       "eval_seconds": 1.0} for t in range(1, len(R))],
           "diagnostics": diagnostics or [], "n_examples": {n: 10 for n in tasks + general},
           "costs": {"trainable_params": 1000, "active_params": 500, "train_seconds": 2.0 * (len(R) - 1),
                     "peak_memory_mb": 64.0},
           "env": {"versions": {"torch": "2.x"}, "torch_threads": 1, "device": "cpu", "python": "3"},
           "git": {"sha": "abc", "dirty": False}}
    if kind:
        rec["kind"] = kind
    return rec


def write_records(d: Path, records) -> Path:
    for r in records:
        write_json(d / "runs" / f"{r['run_id']}.json", r)
    return d


def synthetic_records():
    """a: 2 seeds (front), b: 1 seed (front, forgets less), c: dominated by a, d: failed, plus a joint reference."""
    moe = [{"stage": s, "expert_load": [0.25, 0.75], "routing_entropy": 0.56, "identity_share": None,
            "layers": {"l0": {"load": [0.5, 0.5], "tokens": 12}}, "note": "text is skipped"} for s in range(4)]
    return [
        make_record("a", 0, R3, G3, diagnostics=moe),
        make_record("a", 1, R3[:3] + [[62, 65, 92]], G3[:3] + [[47, 63]]),  # final_avg 73, general_delta -7.5
        make_record("b", 0, [[20, 30, 40], [60, 30, 40], [55, 60, 40], [50, 55, 70]],
                    [[55, 70], [55, 70], [54, 69], [54, 69]]),  # final_avg 58.33, general_delta -1
        make_record("c", 0, [[20, 30, 40], [50, 30, 40], [50, 50, 40], [50, 50, 50]],
                    G3[:3] + [[50, 59]]),  # final_avg 50, general_delta -8: dominated by a
        make_record("d", 0, R3[:2], G3[:2], status="failed"),
        make_record("joint_reference", 0, [[20, 30, 40], [85, 80, 95]], [[55, 70], [45, 60]], kind="reference"),
    ]


def csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, float_precision="round_trip", keep_default_na=True)


def text_csv(path: Path) -> pd.DataFrame:
    """The cells exactly as written (no type inference, empty stays empty)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def row(df: pd.DataFrame, **match) -> pd.Series:
    sub = df
    for k, v in match.items():
        sub = sub[sub[k] == v]
    assert len(sub) == 1, (match, sub)
    return sub.iloc[0]


# -- per-run table ----------------------------------------------------------------------------------------
def test_runs_csv_has_every_metric_and_reasons_never_zero(tmp_path):
    one = make_record("a", 0, [[30], [70]], [[55, 70], [50, 66]], sequence_id="one@1111")  # T = 1
    d = write_records(tmp_path / "d", synthetic_records() + [one])
    lb.write_all(d, plots=False)
    runs = csv(d / "runs.csv")
    assert list(runs.columns) == lb.RUN_COLUMNS
    a0 = row(runs, method="a", seed=0, sequence_id="toy@0000")
    assert a0["final_avg"] == pytest.approx(215 / 3) and a0["bwt"] == pytest.approx(-12.5)
    assert a0["forgetting"] == pytest.approx(15.0) and a0["fwt"] == pytest.approx(6.5)
    assert a0["avg_incremental"] == pytest.approx(76.388888889) and a0["plasticity"] == pytest.approx(80.0)
    assert a0["general_delta"] == pytest.approx(-5.5) and a0["general_delta_norm"] == pytest.approx(-9.0)
    assert a0["general_worst_delta"] == pytest.approx(-14.5) and a0["general_retention"] == pytest.approx(0.912)
    # (85-80) + (80-70) + (95-90) = 20 over 3 tasks, with the joint reference of the same model and sequence
    assert a0["intransigence"] == pytest.approx(20 / 3) and a0["reference_runs"] == 1
    assert pd.isna(a0["bwt_reason"]) and a0["trainable_params"] == 1000 and a0["train_steps"] == 15
    assert a0["n_examples"] == 50 and a0["eval_batch_size"] == 16 and a0["status"] == "success"
    single = row(runs, sequence_id="one@1111")
    for m in ("bwt", "forgetting", "fwt"):
        assert pd.isna(single[m]) and "T = 1" in single[f"{m}_reason"]  # empty, never 0
    assert single["final_avg"] == pytest.approx(70.0)
    assert pd.isna(single["intransigence"]) and single["intransigence_reason"] == lb.NO_REFERENCE
    failed = row(runs, method="d")
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: diverged"
    assert pd.isna(failed["final_avg"]) and "failed" in failed["final_avg_reason"]
    ref = row(runs, kind="reference")
    assert ref["final_avg"] == pytest.approx(86.666666667) and ref["general_delta"] == pytest.approx(-10.0)
    assert pd.isna(ref["bwt"]) and "reference run" in ref["bwt_reason"] and ref["n_stages_done"] == 1
    # the raw text: an undefined cell is empty, not "0" or "nan"
    header = (d / "runs.csv").read_text().splitlines()[0].split(",")
    line = next(x for x in (d / "runs.csv").read_text().splitlines() if "one@1111" in x)
    assert line.split(",")[header.index("bwt")] == ""


# -- leaderboard: seeds and Pareto --------------------------------------------------------------------------
def test_leaderboard_aggregates_seeds_and_flags_pareto(tmp_path):
    d = write_records(tmp_path / "d", synthetic_records())
    lb.write_all(d, plots=False)
    board = csv(d / "leaderboard.csv")
    assert list(board.columns) == lb.LEADERBOARD_COLUMNS
    a = row(board, method="a")
    assert a["n_seeds"] == 2 and a["seeds"] == "0,1" and a["n_failed"] == 0
    assert a["final_avg"] == pytest.approx((215 / 3 + 73) / 2)  # 71.667 and 73
    assert a["final_avg_std"] == pytest.approx(abs(73 - 215 / 3) / math.sqrt(2)) and a["final_avg_n"] == 2
    assert a["general_delta"] == pytest.approx(-6.5) and a["general_delta_std"] == pytest.approx(math.sqrt(2))
    assert a["intransigence"] == pytest.approx((20 / 3 + 18 / 3) / 2)  # seed 1: (85-80)+(80-70)+(95-92) = 18
    assert pd.isna(row(board, method="b")["final_avg_std"])  # one seed: no std, not 0
    assert {m: bool(row(board, method=m)["pareto"]) for m in "abcd"} == {"a": True, "b": True, "c": False,
                                                                        "d": False}
    d_row = row(board, method="d")
    assert d_row["n_seeds"] == 0 and d_row["n_failed"] == 1 and pd.isna(d_row["final_avg"])
    assert "no successful run" in d_row["final_avg_reason"]
    ref = row(board, kind="reference")  # would dominate everything, but references never enter the front
    assert not ref["pareto"] and ref["final_avg"] > a["final_avg"] and pd.isna(ref["intransigence"])
    assert list(board["method"]) == ["a", "b", "c", "d", "joint_reference"]  # methods by final_avg, then refs
    md = (d / "leaderboard.md").read_text()
    assert "| **a** * | 2 |" in md and "_joint_reference_ (reference)" in md and "0 (1 failed)" in md
    assert "72.3 ± 0.9" in md and "general_base (base model, before any training) = 62.5" in md


# -- the front with seed noise (docs/metrics.md, "Aggregation and the trade-off view") ------------------------
def one_task(method, seed, final, delta):
    """A T = 1 run with final_avg = ``final`` and general_delta = ``delta`` (one general benchmark at 50)."""
    return make_record(method, seed, [[10.0], [final]], [[50.0], [50.0 + delta]], chance=(25.0,))


def test_front_within_one_std_is_shared_and_listed(tmp_path):
    recs = [one_task("hi", 0, 70.0, 0.0), one_task("hi", 1, 72.0, 2.0),  # mean (71, 1), std (1.41, 1.41)
            one_task("lo", 0, 70.0, 0.0), one_task("lo", 1, 70.5, 0.5),  # mean (70.25, 0.25): lower on both
            one_task("far", 0, 60.0, -5.0), one_task("far", 1, 61.0, -4.0)]  # lower by > 1 std on both
    d = write_records(tmp_path / "d", recs)
    lb.write_all(d, plots=False)
    board = csv(d / "leaderboard.csv")
    # (a) hi beats lo on both means, by less than one std: both on the front, and said to be within noise
    # (b) hi beats far by more than one std on both axes: far is dominated
    assert {m: bool(row(board, method=m)["pareto"]) for m in ("hi", "lo", "far")} == {"hi": True, "lo": True,
                                                                                     "far": False}
    md = (d / "leaderboard.md").read_text()
    assert "within noise: hi ~ lo\n" in md and "far ~" not in md.split("within noise:")[1].splitlines()[0]
    assert "| **hi** * |" in md and "| **lo** * |" in md and "| far |" in md


def test_front_single_seed_rows_use_the_strict_rule():
    # (c) no std on either axis (n < 2): the plain Pareto rule (>= on both, > on one; ties all on the front)
    pts = [(70.0, -5.0), (60.0, -2.0), (65.0, -6.0), (70.0, -5.0), (None, 0.0), (80.0, None), (55.0, -2.0),
           (math.nan, 10.0), (70.0, -5.5)]
    front, within = lb.metrics.noisy_pareto_front(pts, [(None, None)] * len(pts))
    assert front == [True, True, False, True, False, False, False, False, False] and within == []
    # one row with a std: its noise is the margin of the pair (the larger defined std per axis)
    pts2, stds2 = [(71.0, 1.0), (70.0, 0.0)], [(1.5, 1.5), (None, None)]
    assert lb.metrics.noisy_pareto_front(pts2, stds2) == ([True, True], [(0, 1)])
    assert lb.metrics.noisy_pareto_front(pts2, [(0.5, 0.5), (None, None)]) == ([True, False], [])
    # an axis without a margin only needs >=; the other must clear its margin
    assert lb.metrics.dominates((72.0, 0.0), (70.0, 0.0), (1.0, None), (None, None))
    assert not lb.metrics.dominates((70.5, 0.0), (70.0, 0.0), (1.0, None), (None, None))
    assert not lb.metrics.dominates((70.0, 0.0), (70.0, 0.0))  # identical points never dominate each other
    assert lb.metrics.noisy_pareto_front([], []) == ([], [])


# -- budget columns: adapted modules and learning rate ------------------------------------------------------
def test_compact_modules():
    assert lb.compact_modules(["all"]) == "all"
    assert lb.compact_modules(["down_proj", "gate_proj", "up_proj"]) == "mlp"
    assert lb.compact_modules(lb.MODULE_GROUPS["attn"] + lb.MODULE_GROUPS["mlp"]) == "attn+mlp"
    assert lb.compact_modules(["q_proj", "v_proj"]) == "q_proj+v_proj"  # a partial group is listed
    assert lb.compact_modules(["norm", "q_proj", "k_proj", "v_proj", "o_proj"]) == "attn+norm"


def test_budget_columns_and_old_records(tmp_path):
    new = [make_record("m", s, R3, G3) for s in (0, 1)]
    for r in new:
        r.update(adapted_modules=["down_proj", "gate_proj", "up_proj"], lr=2e-3)
    full = make_record("f", 0, R3, G3)
    full.update(adapted_modules=["all"], lr=1e-4)
    old = make_record("o", 0, R3, G3)  # a record from before the budget fields
    d = write_records(tmp_path / "d", new + [full, old])
    lb.write_all(d, plots=False)
    runs, board = csv(d / "runs.csv"), text_csv(d / "leaderboard.csv")
    assert row(runs, method="m", seed=0)["adapted_modules"] == "down_proj,gate_proj,up_proj"
    assert row(runs, method="m", seed=1)["lr"] == pytest.approx(2e-3) and pd.isna(row(runs, method="o")["lr"])
    m = row(board, method="m")
    assert (m["modules"], m["adapted_modules"], float(m["lr"])) == ("mlp", "down_proj,gate_proj,up_proj", 2e-3)
    assert row(board, method="f")["modules"] == "all"
    o = row(board, method="o")
    assert o["modules"] == o["adapted_modules"] == o["lr"] == ""  # old records: empty, never a made-up value
    cols = list(board.columns)
    assert cols.index("active_params_std") + 1 == cols.index("modules") < cols.index("lr") < cols.index(
        "train_seconds")
    md = (d / "leaderboard.md").read_text()
    assert "| trainable params | active params | modules | lr | train s |" in md
    assert "| 1,000 | 500 | mlp | 0.002 | 6 |" in md and "| 1,000 | 500 | all | 0.0001 | 6 |" in md
    assert "| 1,000 | 500 |  |  | 6 |" in md


def test_budget_that_differs_over_seeds_is_left_empty_with_a_warning(tmp_path, caplog):
    recs = [make_record("m", s, R3, G3) for s in (0, 1)]
    recs[0].update(adapted_modules=["up_proj"], lr=1e-3)
    recs[1].update(adapted_modules=["up_proj"], lr=2e-3)  # e.g. train.lr changed between the seeds
    d = write_records(tmp_path / "d", recs)
    with caplog.at_level(logging.WARNING, logger="benchmark.leaderboard"):
        m = row(lb.build(lb.load_records([d])), method="m")
    assert pd.isna(m["lr"]) and m["modules"] == "up_proj"
    assert any("different lr" in r.getMessage() for r in caplog.records)


def test_method_variants_are_never_averaged_together(tmp_path):
    """Runs of one method with other options (an ablation, a merged folder) get a row of their own."""
    r0 = make_record("h", 0, R3, G3)
    r1 = make_record("h", 1, R3[:3] + [[62, 65, 92]], G3[:3] + [[47, 63]])
    for r, ranks in ((r0, "2468"), (r1, "uniform5")):
        r["method_config"] = {"ranks": ranks, "top_k": 2}
    r1["run_id"] = "h-1a2b3c4d--toy--toy@0000--seed1"
    d = write_records(tmp_path / "d", [r0, r1, make_record("c", 0, R3, G3)])
    lb.write_all(d)
    board, runs = csv(d / "leaderboard.csv"), csv(d / "runs.csv")
    assert list(board.columns) == lb.LEADERBOARD_COLUMNS and "variant" in runs.columns
    h = board[board["method"] == "h"]
    assert sorted(h["variant"]) == ["ranks=2468", "ranks=uniform5"] and list(h["n_seeds"]) == [1, 1]
    assert row(board, method="h", variant="ranks=2468")["final_avg"] == pytest.approx(215 / 3)  # r0 alone
    assert row(board, method="h", variant="ranks=uniform5")["final_avg"] == pytest.approx(73)
    assert pd.isna(row(board, method="c")["variant"])  # one configuration: no variant
    md = (d / "leaderboard.md").read_text()
    assert "h [ranks=2468]" in md and "h [ranks=uniform5]" in md


def test_partly_undefined_metric_states_how_many_seeds(tmp_path):
    nan_run = make_record("a", 1, R3[:3] + [[None, 65, 92]], G3)  # a missing final cell on task 1
    d = write_records(tmp_path / "d", [make_record("a", 0, R3, G3), nan_run])
    a = row(lb.build(lb.load_records([d])), method="a")
    assert a["final_avg"] == pytest.approx(215 / 3) and a["final_avg_n"] == 1
    assert a["final_avg_reason"].startswith("1 of 2 seeds undefined") and "R[3][0]" in a["final_avg_reason"]


# -- routing diagnostics ------------------------------------------------------------------------------------
def test_routing_csv_flattens_numeric_diagnostics(tmp_path):
    recs = synthetic_records()
    rows = routing_rows(RunRecord.from_dict(recs[0]))
    got = {(r["stage"], r["diagnostic"]): r["value"] for r in rows}
    assert got[(2, "expert_load[1]")] == 0.75 and got[(2, "routing_entropy")] == 0.56
    assert got[(0, "layers.l0.load[0]")] == 0.5 and got[(3, "layers.l0.tokens")] == 12.0
    assert not any("note" in k or "identity_share" in k for _, k in got)  # text and None are left out
    assert len(rows) == 4 * 6 and routing_rows(RunRecord.from_dict(recs[2])) == []  # a method without diagnostics: no rows
    d = write_records(tmp_path / "d", recs)
    lb.write_all(d, plots=False)
    routing = csv(d / "routing.csv")
    assert list(routing.columns) == ROUTING_COLUMNS and set(routing["run_id"]) == {recs[0]["run_id"]}


# -- schema -------------------------------------------------------------------------------------------------
def test_every_row_carries_schema_version_and_sequence_id(tmp_path):
    d = write_records(tmp_path / "d", synthetic_records())
    lb.write_all(d, plots=False)
    for name in ("scores.csv", "runs.csv", "leaderboard.csv", "routing.csv"):
        df = csv(d / name)
        assert len(df) and (df["schema_version"].astype(str) == SCHEMA_VERSION).all(), name
        assert (df["sequence_id"] == "toy@0000").all(), name
    scores = csv(d / "scores.csv")
    assert list(scores.columns) == SCORE_COLUMNS
    assert set(scores.loc[scores["kind"] == "reference", "stage_task"]) == {"base", "joint"}


def _documented(column: str, doc: str) -> bool:
    if f"`{column}`" in doc:
        return True
    for name in lb.METRIC_NAMES:
        if column.startswith(name + "_") and f"`<metric>{column[len(name):]}`" in doc:
            return True
    return any(column == f"{c}_std" and "`<cost>_std`" in doc for c in lb.COST)


def test_schema_is_documented_in_results_readme():
    doc = (ROOT / "results" / "README.md").read_text()
    assert f"version {SCHEMA_VERSION}" in doc
    for col in SCORE_COLUMNS + lb.RUN_COLUMNS + lb.LEADERBOARD_COLUMNS + ROUTING_COLUMNS:
        assert _documented(col, doc), col
    for field in make_record("a", 0, R3, G3, kind="reference"):
        assert f"`{field}`" in doc, field


def test_empty_results_directory_writes_headers(tmp_path):
    (tmp_path / "d" / "runs").mkdir(parents=True)
    assert main(["-q", "leaderboard", "--results", str(tmp_path / "d")]) == 0
    assert list(csv(tmp_path / "d" / "leaderboard.csv").columns) == lb.LEADERBOARD_COLUMNS
    assert "No runs" in (tmp_path / "d" / "leaderboard.md").read_text()
    assert main(["-q", "leaderboard", "--results", str(tmp_path / "nope")]) == 2


# -- plots ------------------------------------------------------------------------------------------------
def test_plots_one_per_group_and_per_run(tmp_path):
    one = make_record("a", 0, [[30], [70]], [[], []], sequence_id="one@1111", chance=())  # T = 1, M = 0
    d = write_records(tmp_path / "d", synthetic_records() + [one])
    lb.write_all(d)
    plots = d / "plots"
    names = sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*.png"))
    assert "tradeoff--toy--toy_0000.png" in names and "general--toy--toy_0000.png" in names
    assert "tradeoff--toy--one_1111.png" not in names  # no general benchmarks: nothing to trade off
    assert len([n for n in names if n.startswith("heatmaps/")]) == 7  # every run, the failed one included
    for p in plots.rglob("*.png"):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p


# -- merging and the real pipeline ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_dir(tmp_path_factory, cache_dir):
    """One real tiny run (full_ft, seed 0) with the joint reference, through the CLI."""
    out = tmp_path_factory.mktemp("real")
    argv = ["-q", "run", "--methods", "full_ft", "--seeds", "0", "--reference", "joint", "--output", str(out)]
    for s in TINY_RUN:
        argv += ["--set", s]
    assert main(argv) == 0
    return out


def test_real_run_with_joint_reference(real_dir):
    ref = json.loads((real_dir / "runs" / "joint_reference--tiny-world--tiny-world--seed0.json").read_text())
    assert ref["kind"] == "reference" and ref["status"] == "success" and ref["method"] == "joint_reference"
    assert len(ref["R"]) == 2 and len(ref["R"][1]) == 3 and ref["stages"][0]["task"] == "joint"
    assert ref["stages"][0]["steps"] == 9  # sum of the three stages' steps (3 each with train.max_steps=3)
    runs = csv(real_dir / "runs.csv")
    ft = row(runs, method="full_ft")
    assert ft["reference_runs"] == 1 and not pd.isna(ft["intransigence"])
    assert ft["sequence_id"].startswith("tiny-world@") and ft["version_torch"]
    for f in ("leaderboard.csv", "leaderboard.md", "scores.csv", "routing.csv", "report.html"):
        assert (real_dir / f).is_file(), f
    assert (real_dir / "plots" / "heatmaps" / "full_ft--tiny-world--tiny-world--seed0.png").is_file()


def test_bad_reference_is_a_one_line_error(tmp_path, capsys):
    assert main(["run", "--reference", "jiont", "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "invalid reference: 'jiont'; valid: joint" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _rows_of(df: pd.DataFrame, key: str, values) -> pd.DataFrame:
    sub = df[df[key].isin(set(values))]
    return sub.sort_values(list(sub.columns)).reset_index(drop=True)


def test_merging_two_directories_reproduces_each(tmp_path, real_dir, caplog):
    synth = write_records(tmp_path / "synth", synthetic_records())
    own = {}
    for name, d in (("synth", synth), ("real", real_dir)):
        lb.write_all(tmp_path / f"own-{name}", [d], plots=False)
        own[name] = d
    merged = tmp_path / "merged"
    argv = ["-q", "leaderboard", "--results", str(synth), str(real_dir), str(synth), "--output", str(merged)]
    assert main(argv) == 0
    for f, key in (("leaderboard.csv", "sequence_id"), ("runs.csv", "run_id"), ("scores.csv", "run_id"),
                   ("routing.csv", "run_id")):
        m = text_csv(merged / f)
        parts = []
        for name in own:
            mine = text_csv(tmp_path / f"own-{name}" / f)
            pd.testing.assert_frame_equal(_rows_of(m, key, mine[key]), _rows_of(mine, key, mine[key]))
            parts.append(len(mine))
        assert len(m) == sum(parts), f  # nothing duplicated (synth was given twice), nothing lost
    # the same run id with other content: the first directory wins, with a warning
    other = synthetic_records()[2]
    other["R"][3] = [0, 0, 0]
    clash = write_records(tmp_path / "clash", [other])
    with caplog.at_level(logging.WARNING, logger="benchmark.records"):
        df = lb.write_all(tmp_path / "m2", [synth, clash], plots=False)
    assert row(df, method="b")["final_avg"] == pytest.approx(175 / 3)
    assert any("appears twice" in r.getMessage() for r in caplog.records)


# -- the publication script -------------------------------------------------------------------------------
def _publish():
    spec = importlib.util.spec_from_file_location("publish_results", ROOT / "scripts" / "publish_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_publish_script_dry_run_and_readme_block(tmp_path, capsys):
    pub = _publish()
    assert pub.main(["--dry-run", "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "--methods full_ft" in out and "--seeds 0,1,2" in out and "--reference joint" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    d = write_records(tmp_path / "res", synthetic_records())
    lb.write_all(d)
    readme = tmp_path / "README.md"
    text = "# title\n\nintro\n"
    block = pub.results_block(d, readme, "0,1", 1)
    assert "seeds 0,1, `num_threads=1`" in block  # the thread count moves tiny-world scores: say it
    once = pub.update_readme(text, block)
    assert once.startswith(text.rstrip("\n")) and pub.START in once and pub.END in once
    assert "](res/plots/tradeoff--toy--toy_0000.png)" in once and "| **a** * |" in once
    assert pub.update_readme(once, block) == once  # idempotent: the block is replaced, not appended again
    assert re.search(r"intro\n\n## Published results\n\n<!-- results:start -->", once)
    with pytest.raises(ValueError, match="only one of the markers"):
        pub.update_readme(text + pub.START, block)
