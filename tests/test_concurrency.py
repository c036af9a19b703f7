"""Two processes writing into one results directory at once: every run done once, nothing corrupted."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.locks import RunLock
from benchmark.paths import lock_path
from tests.conftest import TINY_RUN

pytestmark = pytest.mark.slow  # end-to-end runs of minutes (see pyproject's markers)

ROOT = Path(__file__).resolve().parent.parent
SETS = [a for s in TINY_RUN for a in ("--set", s)]
RUNS = {m: f"{m}--tiny-world--tiny-world--seed0" for m in ("full_ft", "lora")}


@pytest.fixture
def base_model(cache_dir):
    """Build the tiny base model once here, so the two processes don't both pretrain it."""
    from benchmark.config import make_config
    from benchmark.plan import make_plan
    from benchmark.runner import base_model_path

    base_model_path(make_plan(make_config({}, TINY_RUN)), quiet=True)
    return cache_dir


def test_two_processes_share_one_results_directory(tmp_path, base_model):
    out = tmp_path / "shared"
    env = dict(os.environ, FORGETBENCH_CACHE=str(base_model), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # the same two runs, listed in opposite orders: each process starts on a different run, then meets the
    # other's run either in progress (locked: skipped) or finished (skipped)
    procs = [subprocess.Popen([sys.executable, "-m", "benchmark", "run", "--methods", methods, "--output", str(out),
                               *SETS], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for methods in ("full_ft,lora", "lora,full_ft")]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)

    for method, rid in RUNS.items():
        ran = [bool(re.search(rf"\[{method} seed 0\] stage 3/3", log)) for log in logs]
        assert sum(ran) == 1, f"{rid} must be trained by exactly one process, got {ran}"
        other = logs[ran.index(False)]
        assert re.search(rf"\[{method} seed 0\] skipped: (another process is running|already finished)", other)
        rec = json.loads((out / "runs" / f"{rid}.json").read_text())
        assert rec["status"] == "success" and len(rec["R"]) == 4 and len(rec["G"]) == 4

    board = pd.read_csv(out / "leaderboard.csv")
    assert set(board["method"]) == {"full_ft", "lora"} and (board["n_seeds"] == 1).all()
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores["run_id"]) == set(RUNS.values()) and len(scores) == 2 * 4 * (3 + 4)
    leftovers = [str(p.relative_to(out)) for p in out.rglob(".*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    assert not any((out / "checkpoints").iterdir())


def test_a_run_locked_by_another_process_is_skipped(tmp_path, cache_dir, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    with RunLock(lock_path(out, RUNS["lora"])) as lock:  # what another process working on this run holds
        assert lock.acquire()
        assert not RunLock(lock_path(out, RUNS["lora"])).acquire(), "the lock excludes a second holder"
        assert main(["run", "--methods", "lora", "--output", str(out), *SETS]) == 0
    assert "[lora seed 0] skipped: another process is running" in caplog.text
    assert not (out / "runs" / f"{RUNS['lora']}.json").exists() and not (out / "checkpoints").exists()
    with RunLock(lock_path(out, RUNS["lora"])) as again:
        assert again.acquire(), "released with the holder"
