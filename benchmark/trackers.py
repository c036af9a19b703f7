"""Experiment trackers (``--report-to tensorboard|wandb|mlflow``) through accelerate's tracking API.

Each run is one tracker run named by its run id, under ``OUTPUT/trackers/``: the training loop logs every
optimiser step's loss (and the method's auxiliary loss), the stage loop every stage's downstream and general
scores. Offline by default: wandb runs in offline mode unless ``WANDB_MODE`` is set, and mlflow writes to
``OUTPUT/trackers/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set. A tracker whose package is missing is a
one-line error before any work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmark.errors import UserError

def check_trackers(names: list[str]) -> None:
    """Every asked-for tracker is installed (accelerate's own availability checks)."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    missing = [n for n in names if not available[n]()]
    if missing:
        # each tracker's pip package has the tracker's name
        raise UserError(f"report_to: {', '.join(missing)} is not installed; pip install {' '.join(missing)}")


def tracker_kwargs(names: list[str], output: str | Path) -> dict[str, Any]:
    """The ``Accelerator`` arguments for ``names`` (none when empty), with the offline defaults set."""
    if not names:
        return {}
    root = Path(output).expanduser().resolve() / "trackers"
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine unless the user says so
        os.environ.setdefault("WANDB_DIR", str(root))
    if "mlflow" in names:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
    return {"log_with": list(names), "project_dir": str(root)}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"train.lr": 0.001, ...}`` with scalar values (what every tracker accepts)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def start_run(accelerator: Any, run_id: str, config: dict[str, Any]) -> None:
    """Open a tracker run for one benchmark run (no-op without trackers)."""
    if accelerator.log_with:
        accelerator.init_trackers(run_id, config=flat_config(config))


def finish_run(accelerator: Any) -> None:
    """Close this run's trackers; ``end_training`` is not used because it also ends the process group."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
