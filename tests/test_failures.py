"""Failure isolation: a diverging method, an out-of-memory error and a crash are recorded; the sweep goes on."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from torch import nn

from benchmark.cli import main
from methods import METHODS
from methods.base import Method, MethodConfig, TaskInfo
from tests.conftest import TINY_RUN

SETS = [a for s in TINY_RUN for a in ("--set", s)]


@dataclass
class OomConfig(MethodConfig):
    pass


class OomAtStage2(Method):
    """Trains the norm scales; runs out of (simulated) GPU memory when the second stage starts."""

    config_cls = OomConfig

    def wrap(self, model: nn.Module) -> nn.Module:
        for n, p in model.named_parameters():
            p.requires_grad_("norm" in n)
        return model

    def on_task_start(self, model: nn.Module, task: TaskInfo) -> None:
        if task.stage == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.fixture
def oom_method():
    METHODS.register("oom_test", OomAtStage2, origin="test")
    yield "oom_test"
    METHODS.unregister("oom_test")


def _record(out, method):
    """The seed-0 record of ``method`` (its run id carries a config hash when its options are not the defaults)."""
    found = [r for r in map(json.loads, (p.read_text() for p in (out / "runs").glob("*--seed0.json")))
             if r["method"] == method]
    assert len(found) == 1, [r["run_id"] for r in found]
    return found[0]


@pytest.mark.slow
def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path, cache_dir, oom_method, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    argv = ["run", "--methods", f"full_ft,{oom_method},lora", "--output", str(out), *SETS,
            "--set", "methods.full_ft.lr=1e30"]
    assert main(argv) == 1, "any failed run makes the exit code non-zero"

    diverged = _record(out, "full_ft")
    assert diverged["status"] == "failed" and diverged["failed_stage"] == 1
    # reported at the step where it happened (the first update already blows the weights up)
    assert re.fullmatch(r"DivergenceError: non-finite loss (nan|inf|-inf) at step [23] of full_ft s0 tw_add",
                        diverged["error"]), diverged["error"]
    assert len(diverged["R"]) == 1, "the base row is kept; nothing after the failure"

    oom = _record(out, oom_method)
    assert oom["status"] == "failed" and oom["failed_stage"] == 2
    assert oom["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert len(oom["R"]) == 2 and len(oom["G"]) == 2, "rows of the finished stage are kept"
    assert "Traceback" in oom["traceback"]

    ok = _record(out, "lora")
    assert ok["status"] == "success" and ok["error"] is None and len(ok["R"]) == 4

    board = pd.read_csv(out / "leaderboard.csv").set_index("method")
    assert board.loc["full_ft", "n_failed"] == 1 and board.loc[oom_method, "n_failed"] == 1
    assert board.loc["lora", "n_failed"] == 0 and board.loc["lora", "n_seeds"] == 1
    assert "failed" in (out / "leaderboard.md").read_text()
    assert "2 of 3 runs failed" in caplog.text

    # the failed run kept its last checkpoint: running the same command again retries it from there
    assert (out / "checkpoints" / f"{oom_method}--tiny-world--tiny-world--seed0" / "stage-1").is_dir()
    caplog.clear()
    assert main(argv) == 1
    assert f"[{oom_method} seed 0] resuming after stage 1/3" in caplog.text
    assert "[lora seed 0] skipped: already finished" in caplog.text
    assert _record(out, oom_method)["resumed_from"] == [1]

    # --force redoes a finished run from scratch
    first = _record(out, "lora")
    caplog.clear()
    assert main(["run", "--methods", "lora", "--output", str(out), *SETS, "--force"]) == 0
    assert "skipped" not in caplog.text
    again = _record(out, "lora")
    assert again["status"] == "success" and again["R"] == first["R"] and again["G"] == first["G"]
    assert [s["model_key"] for s in again["stages"]] == [s["model_key"] for s in first["stages"]]
    assert "stage 1 evaluation: cache hit" in caplog.text, "same weights: the evaluation is served from cache"


def test_crash_before_the_first_stage_is_isolated(tmp_path, cache_dir, caplog):
    """A method whose wrap leaves nothing to train: the run fails at stage 1 with the error in its record."""

    @dataclass
    class FrozenConfig(MethodConfig):
        pass

    class Frozen(Method):
        config_cls = FrozenConfig

        def wrap(self, model: nn.Module) -> nn.Module:
            for p in model.parameters():
                p.requires_grad_(False)
            return model

    with METHODS.registered("frozen_test", Frozen):
        out = tmp_path / "out"
        rc = main(["run", "--methods", "frozen_test", "--output", str(out), *SETS])
    assert rc == 1
    rec = _record(out, "frozen_test")
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: the method left no trainable parameter"
    assert rec["failed_stage"] == 1 and len(rec["R"]) == 1
    assert pd.read_csv(out / "leaderboard.csv").loc[0, "n_failed"] == 1
