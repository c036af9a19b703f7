"""Two CPU processes over gloo (``torchrun --standalone --nproc_per_node 2``) against a one-process run.

``accelerate launch --cpu --num_processes 2`` silently starts one process, so the test uses torchrun. The
distributed run must give records with the same structure as the single-process run, its processes must hold
identical trainable weights after every stage, and only rank 0 may write files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import OFFLINE_VARS, main
from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent


def _args(out: Path) -> list[str]:
    argv = ["-q", "run", "--methods", "lora", "--seeds", "0", "--output", str(out)]
    for s in TINY_RUN + ["eval.limit=2"]:  # the structure is what is compared: two documents per task suffice
        argv += ["--set", s]
    return argv


@pytest.mark.slow
def test_two_processes_match_one_process_and_stay_in_sync(tmp_path, monkeypatch):
    one, two, cache = tmp_path / "one", tmp_path / "two", tmp_path / "fbcache"
    monkeypatch.setenv("FORGETBENCH_CACHE", str(cache))  # empty: rank 0 builds the base while rank 1 waits
    env = {**os.environ, **OFFLINE_VARS, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "benchmark"] + _args(two)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(cache.glob("tinyworld-*"))) == 1  # built once, by rank 0
    assert main(_args(one)) == 0  # the one-process run finds that base in the cache
    assert len(list(cache.glob("tinyworld-*"))) == 1

    (rec1_path,) = list((one / "runs").glob("*.json"))
    rec2_paths = list((two / "runs").glob("*.json"))
    assert [p.name for p in rec2_paths] == [rec1_path.name]  # one record, written once (rank 0 only)
    assert not [p for p in two.rglob("*") if p.name.startswith(".")]  # no half-written temporary files
    rec1, rec2 = json.loads(rec1_path.read_text()), json.loads(rec2_paths[0].read_text())

    assert rec2["status"] == "success", rec2.get("error")
    for key in ("tasks", "general_tasks", "metric_names", "sequence_id"):
        assert rec2[key] == rec1[key], key
    assert [len(r) for r in rec2["R"]] == [len(r) for r in rec1["R"]]
    assert [len(g) for g in rec2["G"]] == [len(g) for g in rec1["G"]]
    assert rec2["R"][0] == rec1["R"][0] and rec2["G"][0] == rec1["G"][0]  # same base model, evaluated on rank 0
    for s1, s2 in zip(rec1["stages"], rec2["stages"]):
        assert set(s2) == set(s1) and s2["steps"] == s1["steps"]
        assert len(s1["rank_model_keys"]) == 1
        assert len(s2["rank_model_keys"]) == 2 and len(set(s2["rank_model_keys"])) == 1  # replicas identical
        assert s2["rank_model_keys"][0] == s2["model_key"]
        # each process trains on half of every batch and DDP averages: the same loss up to float rounding
        assert s2["final_loss"] == pytest.approx(s1["final_loss"], rel=1e-3)
    assert (two / "leaderboard.csv").is_file()
