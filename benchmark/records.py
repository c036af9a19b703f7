"""Run records (one JSON per run) and the tidy ``scores.csv`` derived from them; every write is atomic."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1.0"
SCORE_COLUMNS = ["schema_version", "run_id", "method", "model", "sequence", "sequence_id", "seed", "status",
                 "stage", "stage_task", "task", "task_group", "metric", "value", "n_examples", "eval_batch_size"]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def git_info() -> dict[str, Any]:
    """Commit SHA and whether the work tree is dirty (None outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def environment() -> dict[str, Any]:
    """Package versions and machine facts that can change a number."""
    from importlib import metadata

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "lm_eval", "datasets", "accelerate", "forgetbench"):
        try:
            versions[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"versions": versions, "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def load_records(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """All run records under ``DIR/runs/*.json`` of each directory, de-duplicated by run id (first wins)."""
    seen: dict[str, dict[str, Any]] = {}
    for d in dirs:
        for p in sorted(Path(d, "runs").glob("*.json")):
            try:
                rec = read_json(p)
            except (OSError, json.JSONDecodeError):
                continue  # a foreign or damaged file never breaks a leaderboard
            rid = rec.get("run_id")
            if rid and rid not in seen:
                seen[rid] = rec
    return list(seen.values())


def score_rows(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Tidy rows (one per stage x task x metric) of one run record."""
    rows = []
    tasks, general = rec.get("tasks", []), rec.get("general_tasks", [])
    order = ["base"] + tasks
    n_ex = rec.get("n_examples", {})
    for group, names, matrix in (("downstream", tasks, rec.get("R") or []), ("general", general, rec.get("G") or [])):
        for stage, row in enumerate(matrix):
            for name, value in zip(names, row):
                rows.append({
                    "schema_version": SCHEMA_VERSION, "run_id": rec["run_id"], "method": rec["method"],
                    "model": rec["model"], "sequence": rec["sequence"], "sequence_id": rec.get("sequence_id"),
                    "seed": rec["seed"], "status": rec.get("status"), "stage": stage, "stage_task": order[stage],
                    "task": name, "task_group": group, "metric": rec.get("metric_names", {}).get(name, "score"),
                    "value": value, "n_examples": n_ex.get(name),
                    "eval_batch_size": rec.get("config", {}).get("eval", {}).get("batch_size"),
                })
    return rows
