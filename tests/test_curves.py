"""Training curves: per-step losses in the run record (downsampled past 1 000 points), the loss plot per run,
and ``--report-to`` through accelerate's trackers (tensorboard, read back from its event files)."""

from __future__ import annotations

import json

import pytest

from benchmark.cli import main
from benchmark.train import downsample
from tests.conftest import TINY_RUN


def test_downsample_keeps_every_step_up_to_the_limit_then_chunk_means():
    assert downsample([3.0, 2.0, 1.0], max_points=3) == [[1, 3.0], [2, 2.0], [3, 1.0]]
    # 10 steps into 4 chunks: bounds round(0, 2.5, 5, 7.5, 10) = 0, 2, 5, 8, 10 (numpy rounds half to even)
    values = [float(v) for v in range(1, 11)]
    assert downsample(values, max_points=4) == [[2, 1.5], [5, 4.0], [8, 7.0], [10, 9.5]]
    assert len(downsample([1.0] * 5000)) == 1000


def _run(out, extra=()):
    argv = ["-q", "run", "--methods", "lora,loramoe", "--output", str(out), *extra]
    for s in TINY_RUN:
        argv += ["--set", s]
    return main(argv)


def test_records_hold_loss_curves_the_report_plots_them_and_tensorboard_gets_them(tmp_path, cache_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert _run(tmp_path, ["--report-to", "tensorboard"]) == 0
    rec = json.loads((tmp_path / "runs" / "loramoe--tiny-world--tiny-world--seed0.json").read_text())
    for stage in rec["stages"]:
        curve = stage["loss_curve"]
        assert [p[0] for p in curve] == list(range(1, stage["steps"] + 1))
        assert curve[-1][1] == stage["final_loss"]
        assert len(stage["aux_loss_curve"]) == stage["steps"]  # LoRAMoE's balance loss, on its own
    lora = json.loads((tmp_path / "runs" / "lora--tiny-world--tiny-world--seed0.json").read_text())
    assert all("aux_loss_curve" not in s for s in lora["stages"])  # no aux loss: nothing recorded

    assert (tmp_path / "plots" / "losses" / "loramoe--tiny-world--tiny-world--seed0.png").is_file()
    assert "Training loss per run" in (tmp_path / "report.html").read_text()

    events = EventAccumulator(str(tmp_path / "trackers" / "loramoe--tiny-world--tiny-world--seed0")).Reload()
    loss = events.Scalars("train/loss")
    total = sum(s["steps"] for s in rec["stages"])
    assert [e.step for e in loss] == list(range(1, total + 1))  # one axis across the stages
    assert loss[-1].value == pytest.approx(rec["stages"][-1]["final_loss"])
    assert len(events.Scalars("train/aux_loss")) == total
    assert [e.step for e in events.Scalars("eval/tw_add")] == [sum(s["steps"] for s in rec["stages"][:k + 1])
                                                              for k in range(len(rec["stages"]))]


def test_bad_or_missing_trackers_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert _run(tmp_path / "a", ["--report-to", "tensorbord"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'tensorbord'" in err and "valid: tensorboard, wandb, mlflow" in err and len(err.splitlines()) == 1
    monkeypatch.setattr("accelerate.utils.is_wandb_available", lambda: False)
    assert _run(tmp_path / "b", ["--report-to", "wandb", "--dry-run"]) == 2
    assert "wandb is not installed; pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
