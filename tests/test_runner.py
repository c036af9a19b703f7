"""End to end on a tiny tiny-world recipe: records, tidy scores, leaderboard, shared base evaluation."""

from __future__ import annotations

import json

import pandas as pd

from benchmark.cli import main
from tests.conftest import TINY_RUN


def _run(out, methods="full_ft,lora", seeds="0"):
    argv = ["-q", "run", "--methods", methods, "--seeds", seeds, "--output", str(out)]
    for s in TINY_RUN:
        argv += ["--set", s]
    return main(argv)


def test_run_writes_records_scores_and_leaderboard(tmp_path, cache_dir):
    out = tmp_path / "out"
    assert _run(out) == 0
    runs = sorted((out / "runs").glob("*.json"))
    assert [p.name for p in runs] == ["full_ft--tiny-world--tiny-world--seed0.json",
                                      "lora--tiny-world--tiny-world--seed0.json"]
    rec = json.loads(runs[1].read_text())
    assert rec["status"] == "success" and rec["error"] is None
    assert len(rec["R"]) == 4 and all(len(r) == 3 for r in rec["R"])  # (T+1) x T
    assert len(rec["G"]) == 4 and all(len(g) == 4 for g in rec["G"])
    assert rec["costs"]["trainable_params"] > 0 and rec["env"]["versions"]["torch"]
    assert rec["sequence_id"].startswith("tiny-world@")
    # stage 0 is shared: both methods start from the identical base row
    other = json.loads(runs[0].read_text())
    assert other["R"][0] == rec["R"][0] and other["G"][0] == rec["G"][0]
    assert len(list((out / "cache").glob("base-eval-*.json"))) == 1

    scores = pd.read_csv(out / "scores.csv")
    assert set(scores["task_group"]) == {"downstream", "general"}
    assert len(scores) == 2 * 4 * (3 + 4)  # runs x stages x tasks
    board = pd.read_csv(out / "leaderboard.csv")
    for col in ["method", "model", "sequence", "n_seeds", "final_avg", "plasticity", "bwt", "forgetting",
                "general_base", "general_final", "general_delta", "trainable_params", "train_seconds"]:
        assert col in board.columns
    assert set(board["method"]) == {"full_ft", "lora"}
    assert "full_ft" in (out / "leaderboard.md").read_text()
