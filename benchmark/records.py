"""Run records (one JSON per run) and the tidy tables derived from them; every write is atomic.

The columns of every CSV are declared here (``*_COLUMNS``) and documented in ``results/README.md``; bump
:data:`SCHEMA_VERSION` whenever a column or a record field changes meaning, is added or is removed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1.5"  # 1.1: ``variant`` column in runs.csv and leaderboard.csv; 1.2: ``base_model_hash``;
# 1.3: ``precision`` (the resolved train.precision policy); 1.4: per-sample files ``samples/`` named by
# ``base_samples`` and ``stages[].samples``; 1.5: measured floors ``general_floor`` (replaces ``general_chance``)
# and ``task_floors`` in run records, metric ``plasticity_floor_margin``
SCORE_COLUMNS = ["schema_version", "run_id", "kind", "method", "model", "sequence", "sequence_id", "seed", "status",
                 "stage", "stage_task", "task", "task_group", "metric", "value", "n_examples", "eval_batch_size"]
ROUTING_COLUMNS = ["schema_version", "run_id", "kind", "method", "model", "sequence_id", "seed", "stage",
                   "diagnostic", "value"]
SCORE_INTS, SCORE_FLOATS = ["seed", "stage", "n_examples", "eval_batch_size"], ["value"]
ROUTING_INTS, ROUTING_FLOATS = ["seed", "stage"], ["value"]
KINDS = ("method", "reference")  # a record without "kind" is a method run
_UMASK = os.umask(0o022)  # read the process umask once (os.umask can only be read by setting it)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are meant to be shared like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


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
    for pkg in ("torch", "transformers", "peft", "lm_eval", "datasets", "accelerate", "tokenizers", "numpy",
                "forgetbench"):
        try:
            versions[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"versions": versions, "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            # CPU kernels are chosen by instruction set (AVX2, AVX512, ...): their float sums can differ
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def typed_frame(rows: list[dict[str, Any]] | pd.DataFrame, columns: list[str], ints: list[str] = (),
                floats: list[str] = ()) -> pd.DataFrame:
    """A table with exactly ``columns``, integer columns as nullable ints and float columns as floats.

    Fixing the types makes a cell's text independent of the other rows (``55`` is written ``55.0`` in a float
    column whatever else is merged in, and an integer column with a gap does not turn into ``10.0``).
    """
    df = pd.DataFrame(rows, columns=columns) if not isinstance(rows, pd.DataFrame) else rows[columns].copy()
    for c in ints:
        df[c] = pd.to_numeric(df[c], errors="coerce").round().astype("Int64")
    for c in floats:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def kind(rec: dict[str, Any]) -> str:
    """``method`` (a continual run) or ``reference`` (e.g. the joint-training upper bound)."""
    return rec.get("kind") or "method"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":")) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def method_variants(records: list[dict[str, Any]]) -> dict[str, str]:
    """run id -> what sets its method configuration apart from other runs of that method (``""`` if nothing).

    Runs of one method, model and sequence made with different method options (an ablation, or folders merged
    from machines with other settings) must never be averaged together: the variant names the option values that
    differ within the group (``ranks=uniform5``), and the leaderboard keeps one row per variant.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((kind(r), r.get("method"), r.get("model"), r.get("sequence_id")), []).append(r)
    out: dict[str, str] = {}
    for recs in groups.values():
        cfgs = [r.get("method_config") if isinstance(r.get("method_config"), dict) else {} for r in recs]
        keys = sorted({k for c in cfgs for k in c})
        differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in cfgs}) > 1]
        for r, c in zip(recs, cfgs):
            out[r["run_id"]] = ",".join(f"{k}={_short(c.get(k))}" for k in differ)
    return out


def display_name(method: Any, variant: Any) -> str:
    """``method`` or ``method [variant]`` for tables and plot legends."""
    return f"{method} [{variant}]" if isinstance(variant, str) and variant else str(method)


def load_records(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """All run records under ``DIR/runs/*.json`` of each directory, de-duplicated by run id (first wins).

    A run id seen twice with different content (e.g. the same run repeated on two machines) keeps the first
    directory's record and logs a warning, so merging never silently averages a run in twice.
    """
    seen: dict[str, dict[str, Any]] = {}
    source: dict[str, str] = {}
    for d in dirs:
        for p in sorted(Path(d, "runs").glob("*.json")):
            try:
                rec = read_json(p)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                logger.warning("skipping unreadable run record %s", p)
                continue  # a foreign or damaged file never breaks a leaderboard
            rid = rec.get("run_id") if isinstance(rec, dict) else None
            if not rid:
                logger.warning("skipping %s: not a run record (no run_id)", p)
            elif rid not in seen:
                seen[rid], source[rid] = rec, str(d)
            elif seen[rid] != rec:
                logger.warning("run %s appears twice with different content; keeping the one from %s, not %s",
                               rid, source[rid], d)
    return list(seen.values())


def _number_or_none(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def general_floor(rec: dict[str, Any]) -> list[float]:
    """Floor f_j (points) of each general benchmark of a run record, for the normalised general metrics.

    ``general_floor`` (schema 1.5), else ``general_chance`` (the declared chance of older records), else zeros.
    An unknown floor (None: an lm-eval built-in task) counts as 0, as the 0.0 older records stored for them did.
    """
    values = rec.get("general_floor")
    if values is None:
        values = rec.get("general_chance")
    if not values:
        return [0.0] * len(rec.get("general_tasks") or [])
    return [0.0 if (v := _number_or_none(x)) is None else v for x in values]


def task_floors(rec: dict[str, Any]) -> list[float | None]:
    """Floor f_i (points) of each downstream task of a run record; None where unknown (records before 1.5)."""
    values = rec.get("task_floors")
    if values is None:
        return [None] * len(rec.get("tasks") or [])
    return [_number_or_none(x) for x in values]


def _stage_names(rec: dict[str, Any]) -> list[str]:
    """``base`` then what each stage trained on (the task, or ``joint`` for a joint reference)."""
    names = {s.get("stage"): s.get("task") for s in rec.get("stages", []) if isinstance(s, dict)}
    tasks = rec.get("tasks", [])
    n = max(len(rec.get("R") or []), len(rec.get("G") or []))
    return ["base"] + [names.get(t) or (tasks[t - 1] if t - 1 < len(tasks) else str(t)) for t in range(1, n)]


def _identity(rec: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "run_id": rec["run_id"], "kind": kind(rec), "method": rec.get("method"),
            "model": rec.get("model"), "sequence": rec.get("sequence"), "sequence_id": rec.get("sequence_id"),
            "seed": rec.get("seed")}


def score_rows(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Tidy rows (one per stage x task) of one run record: every measured cell of R and G."""
    rows = []
    tasks, general = rec.get("tasks", []), rec.get("general_tasks", [])
    order = _stage_names(rec)
    n_ex = rec.get("n_examples") or {}
    ident = _identity(rec)
    batch = (rec.get("config") or {}).get("eval", {}).get("batch_size")
    for group, names, matrix in (("downstream", tasks, rec.get("R") or []), ("general", general, rec.get("G") or [])):
        for stage, row in enumerate(matrix):
            for name, value in zip(names, row):
                rows.append({**ident, "status": rec.get("status"), "stage": stage, "stage_task": order[stage],
                             "task": name, "task_group": group,
                             "metric": rec.get("metric_names", {}).get(name, "score"), "value": value,
                             "n_examples": n_ex.get(name), "eval_batch_size": batch})
    return rows


def flatten(value: Any, prefix: str) -> list[tuple[str, float]]:
    """Numeric leaves of a diagnostics value: ``a.b`` for mappings, ``a[i]`` for lists; other leaves dropped."""
    if isinstance(value, bool):
        return [(prefix, float(value))]
    if isinstance(value, (int, float)):
        return [] if math.isnan(value) else [(prefix, float(value))]
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, (list, tuple)):
        return [kv for i, v in enumerate(value) for kv in flatten(v, f"{prefix}[{i}]")]
    return []  # None (not measured), strings: not a number to tabulate


def routing_rows(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Tidy rows (one per stage x numeric diagnostic) of ``rec["diagnostics"]``; none for methods without any."""
    ident = {k: v for k, v in _identity(rec).items() if k in ROUTING_COLUMNS}
    rows = []
    for entry in rec.get("diagnostics") or []:
        if not isinstance(entry, dict):
            continue
        stage = entry.get("stage")
        for name, value in flatten({k: v for k, v in entry.items() if k != "stage"}, ""):
            rows.append({**ident, "stage": stage, "diagnostic": name, "value": value})
    return rows
