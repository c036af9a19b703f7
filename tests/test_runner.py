"""End to end on a tiny tiny-world recipe: records, tidy scores, leaderboard, shared base evaluation."""

from __future__ import annotations

import json

import pandas as pd
import pytest

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
    assert rec["precision"] == "fp32" and rec["config"]["train"]["precision"] == "auto"  # auto on a CPU
    # stage 0 is shared: both methods start from the identical base row
    other = json.loads(runs[0].read_text())
    assert other["R"][0] == rec["R"][0] and other["G"][0] == rec["G"][0]
    assert len(rec["base_model_hash"]) == 64 and other["base_model_hash"] == rec["base_model_hash"]
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


@pytest.mark.slow
def test_ablation_shares_a_folder_with_the_default_run(tmp_path, cache_dir):
    """Other method options -> a run id of its own (no 'other settings' refusal) and a leaderboard row of its own."""
    from benchmark.config import make_config
    from benchmark.plan import make_plan, run_id

    out = tmp_path / "out"
    assert _run(out, methods="lora") == 0
    argv = ["-q", "run", "--methods", "lora", "--seeds", "0", "--output", str(out), "--set", "methods.lora.r=4"]
    for s in TINY_RUN:
        argv += ["--set", s]
    assert main(argv) == 0
    names = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert len(names) == 2 and names[0] == "lora--tiny-world--tiny-world--seed0.json"
    assert names[1].startswith("lora-") and len(names[1].split("--")[0]) == len("lora-") + 8
    board = pd.read_csv(out / "leaderboard.csv")
    assert sorted(board["variant"]) == ["r=4", "r=8"] and list(board["n_seeds"]) == [1, 1]
    # the default configuration, spelled out or not, keeps the plain id (published results stay addressable)
    explicit = make_plan(make_config({"methods": ["lora", "hilo"]}, ["methods.lora.r=8", "methods.hilo.ranks=2468"]))
    assert run_id(explicit, "lora", 0) == "lora--tiny-world--tiny-world--seed0"
    assert run_id(explicit, "hilo", 2) == "hilo--tiny-world--tiny-world--seed2"


def test_pretraining_runs_at_the_recipes_thread_count(tmp_path, monkeypatch):
    """CPU results move with the thread count: the base is built at the recipe's, whatever the caller uses."""
    import torch

    from benchmark import models
    from benchmark.config import PretrainConfig

    seen = []
    monkeypatch.setattr(models, "_pretrain", lambda cfg, specs, out, quiet: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        models.pretrain_tinyworld(PretrainConfig(), [], tmp_path)
        models.pretrain_tinyworld(PretrainConfig(num_threads=3), [], tmp_path)
        assert seen == [1, 3] and torch.get_num_threads() == 2, "pinned while pretraining, restored after"
    finally:
        torch.set_num_threads(before)
    # the thread count is part of the recipe, hence of the cache key
    assert models.recipe_hash(PretrainConfig(), []) != models.recipe_hash(PretrainConfig(num_threads=2), [])
